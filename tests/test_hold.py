"""The hold program (remote/hold.py), run by a real venv's own interpreter: it writes the constraints
file from what that venv holds at that moment, so a pip install after it cannot move torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from provisioner.config.model import build_profile
from provisioner.resources.hold import hold_step
from provisioner.sandbox.wheels import build_torch_wheel, build_torchvision_wheel, build_wheel


def test_hold_writes_the_venvs_torch_family_as_installed_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "ComfyUI"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    wheels = [build_torch_wheel(tmp_path / "w", "2.8.0+cu128", "12.8"), build_torchvision_wheel(tmp_path / "w", "2.8.0+cu128"),
              build_wheel(tmp_path / "w", "nvidia-cudnn-cu12", "9.10.2.21", {"nvidia/cudnn.py": ""}),
              build_wheel(tmp_path / "w", "Triton", "3.4.0", {"triton/__init__.py": ""}),
              build_wheel(tmp_path / "w", "diffusers", "0.35.2", {"diffusers/__init__.py": ""})]
    python = root / "venv" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    *map(str, wheels)], check=True, capture_output=True)
    profile = build_profile({"comfyui": {"root": str(root)}}, name="t", file="/p/t.yaml")
    step, path = hold_step(profile)
    assert step.argv[0] == str(python) and path == f"{root}/.provision/constraints.txt"
    subprocess.run(step.argv, input=step.stdin, check=True, capture_output=True)
    assert Path(path).read_text().splitlines()[1:] == [
        "nvidia-cudnn-cu12==9.10.2.21", "torch==2.8.0+cu128", "torchvision==0.23.0+cu128", "triton==3.4.0"]
    assert not [p for p in Path(path).parent.iterdir() if p.name != "constraints.txt"]   # no temporary left

    # pip honours it: a requirement that would move torch is refused, torch stays as installed.
    newer = build_torch_wheel(tmp_path / "newer", "2.9.1+cu128", "12.8")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
                           "--find-links", str(newer.parent), "-c", path, "torch>=2.9"], capture_output=True, text=True)
    assert proc.returncode != 0 and "Cannot install torch>=2.9" in proc.stderr
    assert "constraint" in proc.stdout and next(root.glob("venv/lib/*/site-packages/torch-2.8.0+cu128.dist-info"))
