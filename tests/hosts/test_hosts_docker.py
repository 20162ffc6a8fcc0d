"""Provision against REAL Docker, the seed's shape: real ComfyUI v0.3.64 on CPU running in a
container (`comfyui-qwen`, started with `--init`, host network) of a real dockerd, on a host reached
over sshd, the inventory naming it with `provision_container`. The facts are read, the plan made and
the apply run through `docker exec`; `docker restart` beside the container, then the readiness
wait inside it; verification through the SSH tunnel; a second apply changes nothing; a rollback
puts the container's ComfyUI back as it was. The tests share the container and run in file order.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import upstream
from lab import Lab, service_port
from machines import LABEL, Dockerd
from sshd import SshdHost, wait_until

pytestmark = pytest.mark.hosts
CONTAINER = "comfyui-qwen"
ROOT = "/opt/ComfyUI"
PLUGIN = f"{ROOT}/custom_nodes/ComfyUI-nunchaku"
# ComfyUI answers on its port (run inside the container: its python3 has no requests).
READY = ("import urllib.request\ntry: print(urllib.request.urlopen('http://127.0.0.1:%d/system_stats', "
         "timeout=5).status)\nexcept OSError: print(0)")


@dataclass
class DockerHost:
    """A lab host whose ComfyUI runs in `CONTAINER` of `daemon`, reached over `sshd` (this machine's
    sshd, its sessions given the daemon's DOCKER_HOST)."""

    name: str
    sshd: SshdHost
    daemon: Dockerd
    port: int

    def provision_vars(self) -> dict[str, Any]:
        return {"comfyui": {"root": ROOT, "port": self.port, "restart": {"docker": CONTAINER}}}

    def stop(self) -> None:
        self.sshd.stop()

    def exec(self, *argv: str) -> str:
        """A command in the container, as `docker exec` runs it."""
        return self.daemon.docker("exec", CONTAINER, *argv).stdout

    def started_at(self) -> str:
        return self.daemon.docker("inspect", "-f", "{{.State.StartedAt}}", CONTAINER).stdout.strip()

    def freeze(self) -> list[str]:
        return sorted(self.exec(f"{ROOT}/venv/bin/python", "-m", "pip", "freeze", "--all").split())


@pytest.fixture(scope="module")
def host(hosts_lab: Lab, dockerd: Dockerd, comfyui_image: str, real_cache: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerHost]:
    port = service_port()
    base = tmp_path_factory.getbasetemp()
    dockerd.docker("run", "-d", "--init", "--network", "host", "--name", CONTAINER, "--label", LABEL,
                   "-v", f"{base}:{base}:ro", "-v", f"{real_cache}:{real_cache}:ro", comfyui_image,
                   "venv/bin/python", "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                   "--disable-auto-launch")
    (sshd,) = hosts_lab.fleet.add(1, names=[f"docker-{os.getpid()}"], env={"DOCKER_HOST": dockerd.host})
    made = DockerHost(sshd.name, sshd, dockerd, port)
    hosts_lab.attach(made)
    hosts_lab.host_vars[made.name] = {"provision_container": CONTAINER}
    hosts_lab.overlays[made.name] = {"comfyui": {**made.provision_vars()["comfyui"], "ready_timeout_s": 600}}
    hosts_lab.write()
    yield made
    dockerd.docker("rm", "-f", CONTAINER, check=False)
    sshd.stop()


def run(lab: Lab, verb: str, host: DockerHost, *args: str) -> tuple[int, str]:
    return lab.run(verb, "--limit", host.name, *args)


def test_facts_and_plan_through_docker_exec(hosts_lab: Lab, host: DockerHost, comfyui_repo: Path) -> None:
    wait_until(lambda: host.exec("python3", "-c", READY % host.port).strip() == "200", 600)
    code, out = run(hosts_lab, "facts", host, "--json")
    assert code == 0, out
    facts = json.loads(out[out.index("{"):])[host.name]
    assert not Path(ROOT).exists()                                         # only the container has it
    assert (facts["env"]["python"], facts["env"]["torch"]) == (f"{ROOT}/venv/bin/python", "2.9.1+cu128")
    assert facts["env"]["version"] == host.exec(f"{ROOT}/venv/bin/python", "-c",
                                                "import platform; print(platform.python_version())").strip()
    assert facts["comfyui_version"] == "0.3.64"
    checkout = facts["git"][ROOT]
    assert checkout["head"] == upstream.git("-C", str(comfyui_repo), "rev-parse", "v0.3.64^{commit}")
    code, out = run(hosts_lab, "plan", host)
    assert code == 2, out
    assert f"+ plugin clone ComfyUI-nunchaku v1.1.0 into {PLUGIN}" in out
    assert "backend nunchaku (none) -> 1.2.1" in out, out
    assert host.exec("cat", "/proc/1/cmdline").startswith("/sbin/docker-init")   # --init: PID 1 passes signals on


def test_apply_through_docker_exec_restarts_the_container_and_verifies(hosts_lab: Lab, host: DockerHost) -> None:
    before = host.started_at()
    freeze = host.freeze()
    code, out = run(hosts_lab, "apply", host)
    assert code == 2, out
    assert f"handler: restarted ComfyUI (docker restart {CONTAINER})" in out
    assert host.started_at() != before                              # the container restarted, once
    assert host.exec("git", "-C", PLUGIN, "describe", "--tags").strip() == "v1.1.0"
    assert host.freeze() != freeze
    for check in ("comfyui_reachable", "nodes_registered", "workflow_accepted", "generation", "images_ok"):
        assert f"{host.name} PASS {check}" in out
    host.before_apply = freeze                                      # type: ignore[attr-defined]


def test_a_second_apply_changes_nothing(hosts_lab: Lab, host: DockerHost) -> None:
    started = host.started_at()
    code, out = run(hosts_lab, "apply", host, "--no-verify")
    assert code == 0, out
    assert "0 changed, 1 unchanged, 0 failed" in out
    assert host.started_at() == started


def test_a_rollback_inside_the_container(hosts_lab: Lab, host: DockerHost) -> None:
    started = host.started_at()
    code, out = run(hosts_lab, "rollback", host)
    assert code == 2, out
    assert host.started_at() != started
    assert host.exec("ls", f"{ROOT}/custom_nodes").split().count("ComfyUI-nunchaku") == 0
    assert host.freeze() == host.before_apply                       # type: ignore[attr-defined]
    assert f"{host.name} PASS comfyui_reachable" in out
    assert run(hosts_lab, "rollback", host, "--check")[0] == 0


def test_a_container_whose_comfyui_dies_at_start_fails_the_apply_at_once(hosts_lab: Lab, host: DockerHost) -> None:
    """A package ComfyUI imports at start is broken: after `docker restart` it dies, the container
    exits, and the wait beside it says so with the exception line (not after the 600 s timeout)."""
    package = host.exec(f"{ROOT}/venv/bin/python", "-c", "import aiohttp; print(aiohttp.__file__)").strip()
    host.exec("sh", "-c", f"echo 'raise RuntimeError(\"aiohttp broken on purpose\")' >> {package}")
    code, out = run(hosts_lab, "apply", host, "--no-verify")
    assert code == 1, out
    state = host.daemon.docker("inspect", "-f", "{{.State.Status}}", CONTAINER).stdout.strip()
    assert state == "exited", out
    said = re.search(r"ComfyUI died during start-up after (\d+) s: RuntimeError: aiohttp broken on purpose "
                     rf"\(container {CONTAINER} exited with code 1\)", out)
    assert said and int(said.group(1)) < 60, out
    assert "raise comfyui.ready_timeout_s" not in out
