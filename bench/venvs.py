"""The peers live in their own virtualenvs under bench/.venvs/, installed from the package registry once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

VENVS = Path(__file__).resolve().parent / ".venvs"
# Pinned so that re-runs compare like with like; bump deliberately and re-run the whole bench.
PINS = {"ansible": "ansible-core==2.19.14", "pyinfra": "pyinfra==3.10.0"}
EXECUTABLE = {"ansible": "ansible-playbook", "pyinfra": "pyinfra"}


def tool_venv(tool: str) -> Path:
    """bench/.venvs/<tool> with the pinned peer installed (created on first use)."""
    venv = VENVS / tool
    if (venv / "bin" / EXECUTABLE[tool]).exists():
        return venv
    print(f"installing {PINS[tool]} into {venv} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", PINS[tool]], check=True)
    return venv


def tool_version(tool: str) -> str:
    """The installed peer's version, as its package metadata says."""
    name = PINS[tool].split("==")[0]
    out = subprocess.run([str(tool_venv(tool) / "bin" / "python"), "-c",
                          f"import importlib.metadata as m; print(m.version({name!r}))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()
