"""A host with no ComfyUI at all brought to a verified REAL ComfyUI in one apply: the real ComfyUI
repository cloned at v0.3.60, a venv made with the host's python3 and filled from the real wheelhouse
(torch 2.9.1+cu128, ComfyUI's requirements.txt with torch held), provision's unit run by the service
manager standing in for systemd, ComfyUI bound to 127.0.0.1; a second apply changes nothing; moving
comfyui.version to v0.3.64 is one change with one restart. Verified with a model-free workflow
(LoadImage -> ImageInvert -> SaveImage, `verify.family_nodes: false`): no nunchaku backend runs on CPU."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import upstream
from lab import Lab, mtimes, tree_state
from realhost import BareRealHost
from sshd import listening

from provisioner.sandbox.wheels import build_package_wheelhouse

pytestmark = pytest.mark.real
TEMPLATES = Path(__file__).with_name("templates")
# What the packages resource installs beside ComfyUI's own requirements (nunchaku 1.2.1's Requires-Dist
# that ComfyUI does not bring): stand-ins, as the tier's other hosts get them; nothing imports them.
STAND_INS = ("diffusers", "peft", "accelerate", "protobuf")


def overlay(host: BareRealHost, version: str, comfyui_repo: Path, wheels: Path, stand_ins: Path) -> dict[str, Any]:
    return {
        "comfyui": {**host.provision_vars()["comfyui"], "version": version, "repo": str(comfyui_repo),
                    "torch": {"version": "2.9.1", "cuda": "12.8", "index_url": None, "find_links": [str(wheels)]},
                    "ready_timeout_s": 600},
        "pip": {"no_index": True, "find_links": [str(wheels), str(stand_ins)]},
        "packages": ["diffusers>=0.35", "peft>=0.17", "accelerate>=1.10", "requests"],   # 0.3.64 imports requests
        "workflow": {"template_dir": str(TEMPLATES), "templates": ["invert.json.j2"]},
        "verify": {"family_nodes": False, "warm_runs": 1},
    }


def test_a_bare_host_gets_real_comfyui_in_one_apply_then_moves_it_as_one_change(
        real_lab: Lab, bare_host: Callable[..., BareRealHost], comfyui_repo: Path, real_wheelhouse: Path,
        tmp_path: Path) -> None:
    host = bare_host()
    stand_ins = build_package_wheelhouse(tmp_path / "stand-ins", STAND_INS)
    real_lab.overlays[host.name] = overlay(host, "v0.3.60", comfyui_repo, real_wheelhouse, stand_ins)
    real_lab.write()

    code, out = real_lab.run("apply", "--limit", host.name)
    assert code == 2, out
    assert "1 changed, 0 unchanged, 0 failed" in out
    git = ["git", "-C", str(host.comfy)]
    assert subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() == \
        upstream.git("-C", str(comfyui_repo), "rev-parse", "v0.3.60^{commit}")
    torch = subprocess.run([str(host.comfy / "venv" / "bin" / "python"), "-c",
                            "import torch; print(torch.__version__, torch.version.cuda)"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert torch == ["2.9.1+cu128", "12.8"]
    assert (host.unit_dir / "multi-user.target.wants" / "comfyui.service").is_symlink()
    assert listening(host.port) == ["0100007F"]                    # 127.0.0.1 only
    for check in ("comfyui_reachable", "nodes_registered", "workflow_accepted", "generation", "images_ok"):
        assert f"{host.name} PASS {check}" in out
    assert host.journal().count("Started comfyui.service - ") == 1

    roots = (host.comfy, host.unit_dir)
    before = [tree_state(r, skip=("output", "user", "__pycache__", "temp")) for r in roots]
    stamps = [mtimes(r) for r in (host.unit_dir, host.comfy / "venv" / "bin")]
    code, out = real_lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 0, out
    assert "0 changed, 1 unchanged, 0 failed" in out
    assert [tree_state(r, skip=("output", "user", "__pycache__", "temp")) for r in roots] == before
    assert [mtimes(r) for r in (host.unit_dir, host.comfy / "venv" / "bin")] == stamps

    real_lab.overlays[host.name] = overlay(host, "v0.3.64", comfyui_repo, real_wheelhouse, stand_ins)
    real_lab.write()
    code, out = real_lab.run("plan", "--limit", host.name)
    assert code == 2, out
    assert "1 host: 1 to change (1 change)" in out
    assert "~ core checkout ComfyUI v0.3.60 -> v0.3.64; pip install comfyui-frontend-package==1.27.10" in out
    code, out = real_lab.run("apply", "--limit", host.name)
    assert code == 2, out
    assert host.journal().count("Started comfyui.service - ") == 2   # one restart
    assert f"{host.name} PASS comfyui_reachable: ComfyUI 0.3.64 answers" in out
    assert f"{host.name} PASS generation" in out
    assert real_lab.run("plan", "--limit", host.name)[0] == 0
