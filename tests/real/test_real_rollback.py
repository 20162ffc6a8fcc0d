"""A real ComfyUI host whose gated upgrade fails is rolled back exactly: the real ComfyUI-nunchaku
moved v1.0.2 -> v1.1.0 together with a package pin that swaps the real PyYAML for a stand-in
(ComfyUI then dies at `import yaml`). The snapshot before the change keeps the real PyYAML wheel
it replaces, fetched from the source it came from and checked against the RECORD pip wrote; the
gate rolls the host back from it, and the tree, `pip freeze --all` and the plugin commit are the
snapshot's again."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import upstream
from lab import Lab
from realhost import RealHost

pytestmark = pytest.mark.real
PACKAGES = ["diffusers>=0.35", "peft>=0.17", "transformers>=4.54", "accelerate>=1.10"]   # profiles/base.yaml's


def state(host: RealHost) -> dict[str, str]:
    """What "exactly the snapshot's" compares: both checkouts' HEAD and status, and pip freeze --all."""
    def git(where: Path, *args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, check=True).stdout
    freeze = subprocess.run([str(host.venv / "bin" / "python"), "-m", "pip", "freeze", "--all",
                             "--disable-pip-version-check"], capture_output=True, text=True, check=True).stdout
    return {"comfyui": git(host.comfy, "rev-parse", "HEAD"), "comfyui status": git(host.comfy, "status", "--porcelain",
                                                                                 "--untracked-files=no"),
            "plugin": git(host.plugin, "rev-parse", "HEAD"), "plugin status": git(host.plugin, "status", "--porcelain"),
            "freeze": freeze}


def test_a_real_host_whose_gated_upgrade_fails_is_rolled_back_to_exactly_the_snapshot(
        real_lab: Lab, real_host: Callable[..., RealHost], real_wheelhouse: Path, plugin_repo: Path) -> None:
    host = real_host("v0.3.64")
    # The real venv's distributions come from the real wheelhouse, the stand-ins from the lab's; with
    # ComfyUI's log, a death at start-up ends the readiness wait with its exception at once.
    sources: dict[str, Any] = {"pip": {"no_index": True,
                                       "find_links": [str(real_lab.world.wheelhouse), str(real_wheelhouse)]},
                               "comfyui": {**host.provision_vars()["comfyui"],
                                           "log_file": str(host.service / "comfyui.log")}}
    real_lab.overlays[host.name] = {"plugin": {"tag": "v1.0.2"}, **sources}
    real_lab.write()
    host.wait_ready()
    code, out = real_lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    host.wait_ready()
    before = state(host)
    assert before["plugin"].strip() == upstream.git("-C", str(plugin_repo), "rev-parse", "v1.0.2^{commit}")
    assert "PyYAML==6.0.4" in before["freeze"] and before["plugin status"] == before["comfyui status"] == ""

    real_lab.overlays[host.name] = {"plugin": {"tag": "v1.1.0"}, "packages": [*PACKAGES, "pyyaml==6.0.2"], **sources}
    real_lab.write()
    code, out = real_lab.run("apply", "--limit", host.name, "--verify-gate")
    print(out)
    assert code == 1, out
    assert "the snapshot keeps the wheels of PyYAML 6.0.4, which they replace" in out
    assert "cannot reinstall" not in out
    assert "verify gate: rolling back to snapshot" in out and "1 rolled back" in out
    assert "ModuleNotFoundError: No module named 'yaml'" in out
    assert "(1 from the wheels the snapshot kept)" in out and "PyYAML 6.0.2 -> 6.0.4" in out
    host.wait_ready()
    assert state(host) == before                       # both trees, pip freeze --all, the plugin's commit
    (kept,) = (host.comfy / ".provision" / "snapshots" / "wheels").glob("*/pyyaml-6.0.4-*.whl")
    assert kept.read_bytes() == next(real_wheelhouse.glob("pyyaml-6.0.4-*.whl")).read_bytes()
