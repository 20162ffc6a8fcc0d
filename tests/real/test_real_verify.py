"""`provision verify` through an SSH tunnel against real ComfyUI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import upstream
from lab import Lab
from realhost import RealHost

pytestmark = pytest.mark.real


def test_verification_of_the_real_plugin_without_its_backend_fails_nodes_registered(
        real_lab: Lab, real_host: Callable[..., RealHost], plugin_repo: Path) -> None:
    host = real_host("v0.3.64", start=False)
    # The plugin cloned by hand, the backend never installed: what a half-done set-up looks like.
    upstream.git("clone", "--quiet", "--no-checkout", str(plugin_repo), str(host.plugin))
    upstream.git("-C", str(host.plugin), "checkout", "--quiet", "--detach", "v1.1.0")
    host.start()
    host.wait_ready()
    code, out = real_lab.run("verify", "--limit", host.name)
    assert code == 1, out
    assert ("FAIL nodes_registered: NunchakuQwenImageDiTLoader is not registered: ComfyUI-nunchaku "
            "loaded without its nunchaku backend (it registered only NunchakuDepthPreprocessor, "
            "NunchakuWheelInstaller)") in " ".join(out.split())
    assert "PASS comfyui_reachable: ComfyUI 0.3.64" in out             # reached through the tunnel
    assert "Traceback" not in out
