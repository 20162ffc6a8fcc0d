"""The hold program (remote/hold.py), run by a real venv's own interpreter: it writes the constraints
file from what that venv holds at that moment, then runs the install in the same interpreter, so
the pip install cannot move torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from provisioner import remote
from provisioner.config.model import build_profile
from provisioner.resources.hold import held_install
from provisioner.sandbox.wheels import build_torch_wheel, build_torchvision_wheel, build_wheel


def test_a_held_install_writes_the_venvs_torch_family_as_installed_then_pip_honours_it(tmp_path: Path) -> None:
    root = tmp_path / "ComfyUI"
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    wheels = [build_torch_wheel(tmp_path / "w", "2.8.0+cu128", "12.8"), build_torchvision_wheel(tmp_path / "w", "2.8.0+cu128"),
              build_wheel(tmp_path / "w", "nvidia-cudnn-cu12", "9.10.2.21", {"nvidia/cudnn.py": ""}),
              build_wheel(tmp_path / "w", "Triton", "3.4.0", {"triton/__init__.py": ""}),
              build_wheel(tmp_path / "w", "diffusers", "0.35.2", {"diffusers/__init__.py": ""})]
    python = root / "venv" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    *map(str, wheels)], check=True, capture_output=True)
    profile = build_profile({"comfyui": {"root": str(root)}}, name="t", file="/p/t.yaml")
    newer = build_torch_wheel(tmp_path / "newer", "2.9.1+cu128", "12.8")
    extra = build_wheel(tmp_path / "newer", "peft", "0.17.1", {"peft/__init__.py": ""})
    path = root / ".provision" / "constraints.txt"

    # A requirement that would move torch: the file is written first, then pip refuses it.
    step = held_install(profile, "--no-index", "--find-links", str(newer.parent), "torch>=2.9",
                        what="pip install torch>=2.9", timeout=60)
    assert step.argv[0] == str(python) and step.argv[3:] == (
        "install", "--disable-pip-version-check", "--no-warn-conflicts", "-c", str(path),
        "--no-index", "--find-links", str(newer.parent), "torch>=2.9")
    assert remote.kind(step.argv) == "pip install" and step.what.startswith("pip install torch>=2.9")
    proc = subprocess.run(step.argv, input=step.stdin, capture_output=True)
    assert proc.returncode == 1 and b"Cannot install torch>=2.9" in proc.stderr
    assert path.read_text().splitlines()[1:] == [
        "nvidia-cudnn-cu12==9.10.2.21", "torch==2.8.0+cu128", "torchvision==0.23.0+cu128", "triton==3.4.0"]
    assert not [p for p in path.parent.iterdir() if p.name != "constraints.txt"]   # no temporary left
    assert next(root.glob("venv/lib/*/site-packages/torch-2.8.0+cu128.dist-info"))

    # One that fits: installed by the same interpreter, which exits with pip's 0.
    step = held_install(profile, "--no-index", "--no-deps", str(extra), what="pip install peft", timeout=60)
    assert subprocess.run(step.argv, input=step.stdin, capture_output=True).returncode == 0
    assert next(root.glob("venv/lib/*/site-packages/peft-0.17.1.dist-info"))


def test_a_held_install_into_a_venv_without_pip_says_so_as_python_m_pip_does(tmp_path: Path) -> None:
    root = tmp_path / "ComfyUI"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    profile = build_profile({"comfyui": {"root": str(root)}}, name="t", file="/p/t.yaml")
    step = held_install(profile, "peft", what="pip install peft", timeout=60)
    proc = subprocess.run(step.argv, input=step.stdin, capture_output=True)
    assert proc.returncode == 1 and proc.stderr.decode().strip().endswith("No module named pip"), proc.stderr
    assert (root / ".provision" / "constraints.txt").read_text().splitlines()[1:] == []
