"""The docker stand-in (tests/sshd.py's `docker`, what the fast suite's container hosts run) held
against a real dockerd: the commands provision runs (`exec -i`, `inspect -f`, `restart`, `logs
--tail`, and what the wait beside a container asks), the same on both, their answers compared. docs/testing.md lists what this found."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from machines import LABEL, Dockerd
from sshd import install_docker_standin

from provisioner.connection.docker import INSPECT_IP

pytestmark = pytest.mark.hosts
NAME = "standin-probe"
Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def sequence(docker: Runner) -> list[tuple[str, object]]:
    """What provision sends and reads, step by step: exit codes and output."""
    seen: list[tuple[str, object]] = []

    def look(label: str, *args: str, stdin: str = "", keep: Callable[[str], object] = str.strip) -> None:
        proc = docker(*args, stdin=stdin)
        seen.append((label, (proc.returncode, keep(proc.stdout), shape(proc.stderr))))

    look("exec reads stdin", "exec", "-i", NAME, "/bin/sh", "-c", "cat; echo done", stdin="in\n")
    look("exec without -i has no stdin", "exec", NAME, "/bin/sh", "-c", "cat; echo done", stdin="in\n")
    look("exec's hostname (host network)", "exec", NAME, "/bin/sh", "-c", 'echo "$HOSTNAME"')
    look("exec -e", "exec", "-e", "PROBE=a b", NAME, "/bin/sh", "-c", 'echo "$PROBE"')
    look("exec a missing command", "exec", NAME, "no-such-command")
    look("exec's exit status", "exec", NAME, "/bin/sh", "-c", "exit 7")
    look("exec in a missing container", "exec", "no-such-container", "true")
    look("inspect the address (host network)", "inspect", "-f", INSPECT_IP, NAME)
    look("restart", "restart", NAME)
    look("logs --tail", "logs", "--tail", "2", NAME)
    # What the readiness wait beside a container asks (remote/ready.py): its state, its log since it
    # started, and an exec once it is not running.
    state = "{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}} {{.State.StartedAt}}"
    look("inspect the state (running)", "inspect", "-f", state, NAME, keep=lambda out: out.split()[:3])
    look("logs --since --tail", "logs", "--since", "2000-01-01T00:00:00Z", "--tail", "2", NAME)
    look("stop", "stop", "-t", "1", NAME)
    look("inspect the state (stopped)", "inspect", "-f", state, NAME, keep=lambda out: out.split()[:1])
    look("exec in a stopped container", "exec", "-i", NAME, "true")
    return seen


def shape(stderr: str) -> str:
    """stderr with container ids made neutral."""
    return re.sub(r"\b[0-9a-f]{64}\b", "ID", stderr.strip())


@pytest.fixture
def real(dockerd: Dockerd, base_image: str) -> Iterator[Runner]:
    dockerd.docker("run", "-d", "--init", "--network", "host", "--name", NAME, "--label", LABEL, "--workdir", "/root",
                   base_image, "/bin/sh", "-c", "echo line one; echo line two; echo line three; exec sleep infinity")

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "--host", dockerd.host, *args], input=stdin, capture_output=True,
                              text=True, timeout=120)
    yield run
    dockerd.docker("rm", "-f", NAME, check=False)


def test_the_docker_stand_in_answers_as_real_docker(real: Runner, tmp_path: Path) -> None:
    want = sequence(real)
    containers = tmp_path / "containers"
    (tmp_path / "bin").mkdir()
    docker = install_docker_standin(tmp_path / "bin", containers, {NAME: None})
    (containers / NAME / "log").write_text("line one\nline two\nline three\n")

    def stand_in(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(docker), *args], input=stdin, capture_output=True, text=True, timeout=60,
                              cwd=tmp_path)
    got = sequence(stand_in)
    differences = [f"{label}: real docker {a!r}, the stand-in {b!r}" for (label, a), (_, b) in zip(want, got) if a != b]
    assert not differences, "\n".join(differences)
