"""The seed's layout: ComfyUI in a container (`comfyui-qwen`) on a host reached over ssh. Every
command goes through `docker exec`, and the restart handler runs `docker restart` beside the
container, on the host. There is no Docker daemon here: the host's `docker` is the stand-in CLI
of tests/sshd.py, which runs exec'd commands with the container's name and environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from lab import open_lab
from sshd import install_docker_standin, write_script


pytestmark = pytest.mark.slow


def test_apply_through_docker_exec_converges_and_restarts_the_container(tmp_path: Path) -> None:
    with open_lab(tmp_path) as lab:
        (host,) = lab.add(1)
        containers = tmp_path / "containers"
        install_docker_standin(host.sandbox.bin_dir, containers, {"comfyui-qwen": None})
        restarted = tmp_path / "restarted"
        write_script(containers / "comfyui-qwen" / "on-restart",
                     f"#!/bin/sh\necho restart >> {restarted}\nexec {sys.executable} -m "
                     f"provisioner.sandbox.comfyui_process restart {host.comfy}\n")
        lab.host_vars[host.name] = {"provision_container": "comfyui-qwen"}
        lab.overlays[host.name] = {"comfyui": {"root": str(host.comfy), "port": host.port,
                                               "restart": {"docker": "comfyui-qwen"}}}
        lab.write()
        since = host.sshd.log_size()
        code, out = lab.run("apply")
        assert code == 2, out
        assert "handler: restarted ComfyUI (docker restart comfyui-qwen)" in out
        assert restarted.read_text() == "restart\n"                 # once, beside the container
        assert f"{host.name} PASS nodes_registered" in out          # the restart loaded the plugin
        assert host.sshd.count_connections(since) == 1              # one ssh connection for it all
        code, out = lab.run("apply", "--no-verify")
        assert code == 0, out
        assert restarted.read_text() == "restart\n"                 # no change, no restart

        # A ComfyUI that never comes back: the wait ran in the container, the log is `docker logs`.
        (containers / "comfyui-qwen" / "log").symlink_to(host.comfy / ".provision-sandbox" / "comfyui.log")
        host.comfyui_args("--hang-at-start")
        lab.overlays[host.name]["comfyui"]["ready_timeout_s"] = 3
        lab.write()
        subprocess.run([str(host.sandbox.python), "-m", "pip", "uninstall", "-q", "-y", "peft"], check=True)
        code, out = lab.run("apply")
        assert code == 1, out
        assert f"ComfyUI at 127.0.0.1:{host.port} did not answer within 3 s" in out
        assert "docker logs --tail 40 comfyui-qwen:" in out and "ComfyUI-nunchaku Initialization" in out
        assert restarted.read_text() == "restart\nrestart\n"
