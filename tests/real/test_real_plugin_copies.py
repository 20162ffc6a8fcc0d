"""The real ComfyUI-nunchaku installed as ComfyUI-Manager and the Comfy Registry install it
(`custom_nodes/comfyui-nunchaku`: a clone, or a folder with `.tracking` and the real pyproject.toml),
beside a real ComfyUI core: found whatever its name, refused as a second copy, adopted in place."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from lab import Lab
from realhost import RealHost

pytestmark = pytest.mark.real


def test_a_manager_or_registry_copy_of_the_real_plugin_is_found_and_adopted(
        real_lab: Lab, real_host: Callable[..., RealHost], plugin_repo: Path) -> None:
    host = real_host("v0.3.64", start=False)          # a plan reads files; ComfyUI need not run
    nodes = host.comfy / "custom_nodes"
    manager = nodes / "comfyui-nunchaku"
    subprocess.run(["git", "clone", "-q", "--branch", "v1.0.2", str(plugin_repo), str(manager)], check=True,
                   capture_output=True)
    code, out = real_lab.run("plan", "--limit", host.name)
    assert code == 1, out
    assert f"the plugin is already installed as {manager} (origin " in out
    assert "set plugin.name: comfyui-nunchaku and plugin.adopt: true" in out

    # The Registry's copy instead: no git, its `.tracking`, upstream's own pyproject.toml name.
    shutil.rmtree(manager / ".git")
    (manager / ".tracking").write_text("__init__.py\n")
    code, out = real_lab.run("facts", "--json", "--limit", host.name)
    packs = json.loads(out[out.index("{"):])[host.name]["node_packs"][str(nodes)]
    assert {"name": "comfyui-nunchaku", "path": str(manager), "enabled": True, "origin": None,
            "project": "ComfyUI-nunchaku", "registry": True} in packs
    real_lab.overlays[host.name] = {"plugin": {"name": "comfyui-nunchaku", "adopt": True}}
    real_lab.write()
    try:
        code, out = real_lab.run("plan", "--limit", host.name)
        assert code == 2, out
        assert f"adopt {manager} (pyproject.toml name ComfyUI-nunchaku): clone comfyui-nunchaku v1.1.0 in its place" in out
    finally:
        real_lab.overlays.pop(host.name, None)
        real_lab.write()
    # Disabled as ComfyUI-Manager does it: loaded by nobody, only noted.
    (nodes / ".disabled").mkdir()
    manager.rename(nodes / ".disabled" / "comfyui-nunchaku@1.0.2")
    code, out = real_lab.run("plan", "--limit", host.name)
    assert code == 2 and "disabled copies of the plugin, not loaded by ComfyUI" in out, out


def test_real_comfyui_that_crashes_after_a_restart_command_is_not_waited_out(
        real_lab: Lab, real_host: Callable[..., RealHost]) -> None:
    """Real ComfyUI, restarted by a command (no service manager), dies at start-up of a
    ModuleNotFoundError: the wait ends at once and the exception is the reason, not
    "raise comfyui.ready_timeout_s"."""
    import time

    host = real_host("v0.3.64")
    host.wait_ready()
    main = host.comfy / "main.py"
    main.write_text("import av_missing_for_this_test\n" + main.read_text())   # a dependency gone
    real_lab.overlays[host.name] = {"comfyui": {**host.provision_vars()["comfyui"], "ready_timeout_s": 600,
                                                "log_file": str(host.service / "comfyui.log")}}
    real_lab.write()
    try:
        began = time.monotonic()
        code, out = real_lab.run("apply", "--limit", host.name, "--no-verify")
        assert code == 1, out
        assert time.monotonic() - began < 300, out
        assert "ComfyUI died during start-up after " in out
        assert ": ModuleNotFoundError: No module named 'av_missing_for_this_test' (" in out
        assert "raise comfyui.ready_timeout_s" not in out
    finally:
        real_lab.overlays.pop(host.name, None)
        real_lab.write()
