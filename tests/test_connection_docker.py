"""The docker transport over ssh and over local, against a stand-in `docker` CLI (no daemon here)."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

import provisioner.connection.base as base
from provisioner.connection import open_connection
from provisioner.connection.docker import DockerConnection
from provisioner.errors import CommandError, ConnectError
from provisioner.config.inventory import Host
from sshd import SshdHost, install_docker_standin

PRINT_ARGV = "import sys, json; print(json.dumps(sys.argv[1:]))"


@pytest.fixture(params=["ssh", "local"])
def make(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
         sshd_hosts: Callable[..., list[SshdHost]]) -> Callable[[str], DockerConnection]:
    """Factory: a DockerConnection to container `name` (comfy: own IP, hostnet: host network)."""
    via = request.param
    containers = tmp_path / "containers"
    if via == "ssh":
        host, = sshd_hosts(1)
        install_docker_standin(host.bin_dir, containers, {"comfy": "127.0.0.1", "hostnet": None})
        opts = host.options()
    else:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        install_docker_standin(bin_dir, containers, {"comfy": "127.0.0.1", "hostnet": None})
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        opts = None

    def connect(container: str) -> DockerConnection:
        name = "gpu-01" if via == "ssh" else "box"
        c = open_connection(Host(name=name, transport="docker", via=via, container=container), opts)
        assert isinstance(c, DockerConnection)
        request.addfinalizer(c.close)
        return c

    return connect


def test_run_inside_the_container_with_env_and_quoting(make: Callable[[str], DockerConnection],
                                                      tmp_path: Path) -> None:
    c = make("comfy")
    marker = tmp_path / "pwned"
    hostile = ["a b", "it's", f"$(touch {marker})", "diffusers>=0.35", "x\ny", ""]
    r = c.run(["python3", "-c", PRINT_ARGV, *hostile])
    assert json.loads(r.stdout) == hostile and not marker.exists()
    r = c.run(["sh", "-c", 'pwd; printf "%s|%s" "$HOSTNAME" "$PROVISION_X"'],
              env={"PROVISION_X": "v a'l"})
    assert r.stdout.endswith("/containers/comfy\ncomfy|v a'l")
    lines: list[str] = []
    r = c.run(["cat"], stdin=b"through the\nexec stream", stdout_callback=lines.append)
    assert r.stdout == "through the\nexec stream" and lines == ["through the", "exec stream"]
    assert c.stats.execs == 3 and c.stats.history[0][0] == "python3"
    assert c.inner.stats.history[0][:4] == ("docker", "exec", "-i", "comfy")


def test_failures_carry_the_container_commands_result(make: Callable[[str], DockerConnection]) -> None:
    c = make("comfy")
    with pytest.raises(CommandError) as err:
        c.run(["sh", "-c", "echo boom >&2; exit 5"])
    assert err.value.result.argv == ("sh", "-c", "echo boom >&2; exit 5")
    assert str(err.value).endswith("exited 5: boom")
    gone = make("no-such-container").run(["true"], check=False)
    assert gone.exit_code == 1 and "No such container: no-such-container" in gone.stderr


def test_put_binary_exact_and_atomic(make: Callable[[str], DockerConnection],
                                         tmp_path: Path) -> None:
    c = make("comfy")
    dest = tmp_path / "in container" / "models" / "w.bin"
    content = bytes(range(256)) * 100
    c.put(content, str(dest), mode=0o600)
    assert dest.read_bytes() == content and dest.stat().st_mode & 0o777 == 0o600
    assert os.listdir(dest.parent) == ["w.bin"]


def test_put_file_in_chunks_appears_only_when_complete(make: Callable[[str], DockerConnection],
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "STDIN_PART", 256 * 1024)  # several appends, then one rename
    c = make("comfy")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1024 * 1024 + 17))
    dest = tmp_path / "dest" / "src.bin"
    sizes: list[int] = []

    def progress(done: int, total: int) -> None:
        sizes.append(dest.stat().st_size if dest.exists() else -1)

    c.put_file(str(src), str(dest), progress=progress)
    assert sizes == [-1] * 5  # never visible while parts are still arriving
    assert dest.read_bytes() == src.read_bytes()
    assert c.stats.bytes_put == src.stat().st_size


@pytest.mark.parametrize("container", ["comfy", "hostnet"])
def test_tunnel_reaches_the_container_address(make: Callable[[str], DockerConnection],
                                              http_port: int, container: str) -> None:
    c = make(container)
    with c.tunnel(http_port) as port:
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read() == b"hello from /"
    assert c.ip() == "127.0.0.1"  # comfy's own IP from inspect; hostnet has none: loopback
    inspects = [a for a in c.inner.stats.history if a[:2] == ("docker", "inspect")]
    assert len(inspects) == 1 and inspects[0][-1] == container


def test_hold_runs_in_the_container_until_the_block_exits(make: Callable[[str], DockerConnection],
                                                          tmp_path: Path) -> None:
    c = make("comfy")
    lock = str(tmp_path / "lock")
    with c.hold(["flock", "-n", lock, "sh", "-c", "echo locked; cat >/dev/null"]) as lines:
        assert next(lines) == "locked"
        assert c.run(["flock", "-n", lock, "true"], check=False).exit_code == 1
    assert c.run(["flock", "-n", lock, "true"], check=False).exit_code == 0


def test_docker_host_without_container_name_is_refused() -> None:
    with pytest.raises(ConnectError, match="box: transport docker needs a container name"):
        open_connection(Host(name="box", transport="docker", via="local"))
