"""`provision verify` through an SSH tunnel against real ComfyUI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import upstream
from lab import Lab
from realhost import RealHost, http_json

pytestmark = pytest.mark.real


def test_verification_of_the_real_plugin_without_its_backend_fails_nodes_registered(
        real_lab: Lab, real_host: Callable[..., RealHost], plugin_repo: Path) -> None:
    host = real_host("v0.3.64", start=False)
    # The model family's nodes are what this test is about: required again for this host.
    real_lab.overlays[host.name] = {"verify": {"family_nodes": True}}
    real_lab.write()
    # The plugin cloned by hand, the backend never installed: what a half-done set-up looks like.
    upstream.git("clone", "--quiet", "--no-checkout", str(plugin_repo), str(host.plugin))
    upstream.git("-C", str(host.plugin), "checkout", "--quiet", "--detach", "v1.1.0")
    host.start()
    host.wait_ready()
    code, out = real_lab.run("verify", "--limit", host.name)
    assert code == 1, out
    said = " ".join(out.split())
    assert ("FAIL nodes_registered: NunchakuQwenImageDiTLoader is not registered: ComfyUI-nunchaku "
            "loaded without its nunchaku backend (it registered only NunchakuDepthPreprocessor, "
            "NunchakuWheelInstaller)") in said
    # Why, in ComfyUI's own words: the plugin's import failure as real ComfyUI logged it, read over
    # HTTP from its /internal/logs (the host's profile names no log file, unit or container).
    assert ("ComfyUI logged: Node `NunchakuQwenImageDiTLoader` import failed: "
            "ModuleNotFoundError: No module named 'nunchaku'") in said
    logs = http_json(host.url + "/internal/logs")
    assert "Node `NunchakuQwenImageDiTLoader` import failed:" in logs
    assert "PASS comfyui_reachable: ComfyUI 0.3.64" in out             # reached through the tunnel
    assert "Traceback" not in out


def test_the_model_free_workflow_passes_every_check_timed_by_comfyuis_own_history(
        real_lab: Lab, real_host: Callable[..., RealHost], tmp_path: Path) -> None:
    host = real_host("v0.3.64")                 # a bare real ComfyUI: no plugin, no backend
    host.wait_ready()
    report = tmp_path / "report"
    code, out = real_lab.run("verify", "--limit", host.name, "--report", str(report))
    assert code == 0, out
    (entry,) = json.loads((report / "report.json").read_text())["hosts"]
    checks = {c["name"]: c for c in entry["checks"]}
    assert all(c["passed"] for c in checks.values()), checks
    assert {"comfyui_reachable", "device", "nodes_registered", "workflow_accepted", "comfyui_ready",
            "generation", "images_ok", "cold_time", "warm_time", "vram_peak"} <= set(checks)
    assert "ComfyUI runs on cpu" in checks["device"]["detail"]
    assert "workflow's 4 classes too" in checks["nodes_registered"]["detail"]
    runs = entry["runs"]
    assert [r["kind"] for r in runs] == ["cold", "warm", "warm"]
    # Each run's time is ComfyUI's own: its /history timestamps, read here independently.
    for run in runs:
        history = http_json(f"{host.url}/history/{run['prompt_id']}")[run["prompt_id"]]
        stamps = dict(history["status"]["messages"])
        assert history["status"]["status_str"] == "success"
        assert run["seconds_comfy"] == (stamps["execution_success"]["timestamp"]
                                        - stamps["execution_start"]["timestamp"]) / 1000
        (image,) = history["outputs"]["4"]["images"]
        assert image["subfolder"] == "provision_verify"           # the verification's own prefix
        # The picture is the checkout's example.png inverted, at its size.
        assert (run["image"]["width"], run["image"]["height"]) == (768, 768) and run["image"]["ok"]
    assert entry["figures"]["cold_s"] == round(runs[0]["seconds_comfy"], 3)
