"""Facts and apply against real ComfyUI and the real ComfyUI-nunchaku repository."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import upstream
from realhost import RealHost, http_json
from lab import Lab, mtimes, tree_state

pytestmark = pytest.mark.real


def test_facts_read_the_real_comfyui_version_and_torch(real_lab: Lab, real_host: Callable[..., RealHost],
                                                      comfyui_repo: Path) -> None:
    host = real_host("v0.3.64")
    host.wait_ready()
    code, out = real_lab.run("facts", "--json", "--limit", host.name)
    assert code == 0, out
    facts = json.loads(out[out.index("{"):])[host.name]
    # The venv's own torch says what it is: the facts must say the same, without importing it.
    torch = subprocess.run([str(host.venv / "bin" / "python"), "-c",
                            "import torch; print(torch.__version__, torch.version.cuda)"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert (facts["env"]["torch"], facts["env"]["torch_cuda"]) == (torch[0], torch[1])
    assert facts["env"]["torch"].startswith("2.9.1")
    assert facts["comfyui_version"] == "0.3.64"
    checkout = facts["git"][str(host.comfy)]
    assert checkout["tags"] == ["v0.3.64"]
    assert checkout["head"] == upstream.git("-C", str(comfyui_repo), "rev-parse", "v0.3.64^{commit}")
    assert facts["http"][f"{host.url}/system_stats"] == 200      # real ComfyUI answers


def test_real_plugin_v110_applies_and_a_second_apply_changes_nothing(
        real_lab: Lab, real_host: Callable[..., RealHost], plugin_repo: Path) -> None:
    host = real_host("v0.3.64")
    before = host.wait_ready()
    old_pid = host.pid()
    assert "NunchakuWheelInstaller" not in http_json(host.url + "/object_info")

    code, out = real_lab.run("plan", "--limit", host.name)
    assert code == 2, out
    assert f"clone ComfyUI-nunchaku v1.1.0 into {host.plugin}" in out
    assert "nunchaku (none) -> 1.2.1+cu12.8torch2.9" in out, out     # the real venv's torch decides

    code, out = real_lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    assert "1 changed, 0 unchanged, 0 failed" in out
    assert "handler: restarted ComfyUI" in out
    # The plugin is the real repository's v1.1.0, detached, clean.
    assert host.git("rev-parse", "HEAD") == upstream.git("-C", str(plugin_repo), "rev-parse", "v1.1.0^{commit}")
    assert host.git("status", "--porcelain") == ""
    # The restart returned before ComfyUI listened; once it does, it is a new process that loaded
    # the real plugin (without a working backend it registers only these two of its nodes).
    stats = host.wait_ready()
    assert host.pid() != old_pid
    assert stats["system"]["comfyui_version"] == before["system"]["comfyui_version"] == "0.3.64"
    info = http_json(host.url + "/object_info")
    plugin_nodes = sorted(k for k, v in info.items() if v["python_module"] == "custom_nodes.ComfyUI-nunchaku")
    assert plugin_nodes == ["NunchakuDepthPreprocessor", "NunchakuWheelInstaller"]
    assert "ComfyUI-nunchaku version: 1.1.0" in host.log()

    # Converged: the second apply reads the host once and writes nothing, not even the lock.
    before_tree = tree_state(host.comfy, skip=("venv", "__pycache__"))
    before_mtimes = mtimes(host.comfy)
    since = host.sshd.log_size()
    code, out = real_lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 0, out
    assert "0 changed, 1 unchanged, 0 failed" in out
    assert tree_state(host.comfy, skip=("venv", "__pycache__")) == before_tree
    assert mtimes(host.comfy) == before_mtimes
    assert host.sshd.wait_counts(1, 1, since=since) == (1, 1)        # one connection, one exec
    assert host.pid() is not None and http_json(host.url + "/system_stats")  # and no restart


def test_an_apply_whose_restart_returns_before_comfyui_listens_verifies_once_it_is_ready(
        real_lab: Lab, real_host: Callable[..., RealHost]) -> None:
    host = real_host("v0.3.64")
    host.wait_ready()
    old_pid = host.pid()
    code, out = real_lab.run("apply", "--limit", host.name)
    assert code == 2, out
    assert "1 changed, 0 unchanged, 0 failed" in out
    assert "handler: restarted ComfyUI" in out
    # The service runner's restart returned at once; real ComfyUI took seconds more to listen
    # (torch, then every custom node, before the port opens), and the handler waited it out.
    waited = re.search(r"ComfyUI answers after (\d+) s, (\d+) node classes registered", out)
    assert waited, out
    assert int(waited.group(1)) >= 1 and int(waited.group(2)) > 400
    assert host.pid() != old_pid
    # Then the verification ran against the new process, and every check passed.
    said = " ".join(out.split())
    for check in ("comfyui_reachable", "nodes_registered", "workflow_accepted", "comfyui_ready",
                  "generation", "images_ok"):
        assert f"PASS {check}" in said, out
    assert "FAIL" not in said and "Traceback" not in out
