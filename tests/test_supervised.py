"""Every command on a host runs under remote/supervise.py: timeouts stop its whole process group on the
host, a controller that is killed, stopped (a partition) or aborted leaves nothing running and no lock
held, a frozen host is found out by the heartbeat, signals are named, and nothing outside the
command's frame is taken for its output. Over real sshd servers, the local transport and docker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from provisioner import remote
from provisioner.config.inventory import Host
from provisioner.connection import ConnectOptions, open_connection
from provisioner.connection.base import Connection, Frame, Result
from provisioner.connection.supervised import GRACE_S, Lines
from provisioner.errors import CommandError, ConnectError
from sshd import SshdHost, install_docker_standin, processes_with, wait_until

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 0.5                           # dead after 3 missed: 1.5 s


def sleeper(marker: str, seconds: int = 300) -> list[str]:
    """A long command whose processes carry `marker` on their command line."""
    return [sys.executable, "-c", "import sys, time; time.sleep(float(sys.argv[1]))", str(seconds), marker]


def gone(marker: str) -> Callable[[], bool]:
    def check() -> bool:
        """every process of the command is gone"""
        return not processes_with(marker)
    return check


def running_on_a_thread(conn: Connection, marker: str) -> tuple[threading.Thread, list[Result | BaseException]]:
    """`conn.run` of a long command (`sleeper(marker)`) on a thread of its own, returned once the
    command runs on the host, with the list its Result or its error will be put in."""
    outcome: list[Result | BaseException] = []

    def run() -> None:
        try:
            outcome.append(conn.run(sleeper(marker)))
        except BaseException as err:  # noqa: BLE001 - what the test looks at
            outcome.append(err)

    worker = threading.Thread(target=run)
    worker.start()
    wait_until(lambda: bool(processes_with(marker)), 10)
    return worker, outcome


@pytest.fixture(params=["ssh", "local", "docker"])
def connect(request: pytest.FixtureRequest, sshd_hosts: Callable[..., list[SshdHost]], tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Connection]]:
    """Factory: a connection of each transport with a short heartbeat (docker: the stand-in CLI, locally)."""
    opened: list[Connection] = []
    if request.param == "ssh":
        server, = sshd_hosts(1)
        host, options = server.host(), server.options(heartbeat_s=HEARTBEAT_S)
    else:
        options = ConnectOptions(heartbeat_s=HEARTBEAT_S)
        host = Host(name="box", transport="local")
        if request.param == "docker":
            bin_dir = tmp_path / "bin"
            bin_dir.mkdir()
            install_docker_standin(bin_dir, tmp_path / "containers", {"comfy": "127.0.0.1"})
            monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
            host = Host(name="box", transport="docker", via="local", container="comfy")

    def make() -> Connection:
        conn = open_connection(host, options)
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.close()


# -- timeouts ------------------------------------------------------------------------------------

def test_a_timeout_stops_the_whole_process_group_on_the_host(connect: Callable[[], Connection]) -> None:
    conn, marker = connect(), f"provision-test-{uuid.uuid4()}"
    # A child in the background and one that ignores SIGTERM: both are the group's, both must go.
    script = ('"$@" & trap "" TERM; "$@"; wait')
    started = time.monotonic()
    result = conn.run(["sh", "-c", script, "sh", *sleeper(marker)], timeout=1.0, check=False)
    took = time.monotonic() - started
    assert result.exit_code == 124 and result.stopped == "timed out after 1s (its process group was stopped)"
    assert took < 1.0 + GRACE_S + 3                  # SIGTERM at 1 s, SIGKILL for the one ignoring it
    assert gone(marker)()
    with pytest.raises(CommandError, match=r"`sleep 30` timed out after 0.3s \(its process group was stopped\)$"):
        conn.run(["sleep", "30"], timeout=0.3)


def test_a_command_silent_past_its_idle_timeout_is_stopped(connect: Callable[[], Connection]) -> None:
    conn, marker = connect(), f"provision-test-{uuid.uuid4()}"
    result = conn.run(["sh", "-c", 'echo one; exec "$@"', "sh", *sleeper(marker)], idle_timeout=1.0, check=False)
    assert (result.exit_code, result.stdout) == (124, "one\n")
    assert result.stopped == "printed nothing for 1s (stopped, with its process group)"
    wait_until(gone(marker), 2)
    # One that keeps talking runs as long as it needs.
    talking = conn.run(["sh", "-c", "for i in 1 2 3 4 5 6; do echo $i; sleep 0.3; done"], idle_timeout=1.0)
    assert talking.stdout.split() == ["1", "2", "3", "4", "5", "6"]


# -- what a command cost the host ----------------------------------------------------------------

def test_a_command_says_what_it_cost_the_host(connect: Callable[[], Connection]) -> None:
    """Its supervisor measures the command's CPU (children it waited for included) and its own:
    what a fleet on shared cores pays per host, by kind of command."""
    conn = connect()
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    result = conn.run(["python3", "-I", "-S", "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {busy!r}])"])
    assert result.host_cpu_s is not None and 0.3 <= result.host_cpu_s < 5, result.host_cpu_s
    idle = conn.run(["sleep", "0.3"])
    assert idle.host_cpu_s is not None and idle.host_cpu_s < 0.25, idle.host_cpu_s   # waiting costs nothing
    assert [kind for kind, _ in conn.stats.host_cpu[-2:]] == ["python3", "sleep"]


# -- signals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["SIGKILL", "SIGTERM"])
def test_a_command_killed_by_a_signal_says_which(connect: Callable[[], Connection], name: str) -> None:
    conn = connect()
    result = conn.run(["sh", "-c", f"echo dying >&2; kill -{name[3:]} $$"], check=False)
    number = signal.Signals[name].value
    assert (result.signal, result.exit_code, result.stderr) == (name, 128 + number, "dying\n")
    with pytest.raises(CommandError, match=f"`sh -c kill -{name[3:]} \\$\\$` killed by {name}: "):
        conn.run(["sh", "-c", f"kill -{name[3:]} $$"])


def test_a_supervisor_killed_by_a_signal_says_which(connect: Callable[[], Connection]) -> None:
    """The supervisor itself killed (by the OOM killer, say): ssh's exit-signal, which paramiko drops,
    a local process's negative return code, or docker's relay say which signal."""
    conn = connect()
    result = conn.run(["sh", "-c", "kill -KILL $PPID; sleep 5"], check=False)
    assert (result.signal, result.exit_code) == ("SIGKILL", 137)



def test_a_burst_of_signals_stops_the_supervisor_and_its_command_at_once() -> None:
    """sshd's SIGHUP, a user's SIGTERM and Ctrl-C can land together: a handler that took a lock the
    interrupted code held would deadlock the supervisor and leave its command running."""
    marker = f"provision-test-{uuid.uuid4()}"
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", remote.BOOT], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert proc.stdin is not None
        proc.stdin.write(remote.supervise_request(sleeper(marker), nonce="n", mode="hold", grace=1.0))
        proc.stdin.flush()                   # stdin stays open: only the signals end it
        wait_until(lambda: bool(processes_with(marker)), 10)     # its handlers are in place before it starts
        until = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < until:      # signals until it has ended
            for number in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                os.kill(proc.pid, number)
        code = proc.poll()
        proc.kill()
        proc.stdin.close()
        assert code == 128 + signal.SIGTERM, attempt      # it stopped its command (SIGTERM) and said so
        wait_until(gone(marker), 10)


# -- the controller goes -------------------------------------------------------------------------

CONTROLLER = r"""
import json, os, threading, time
from provisioner.config.inventory import Host
from provisioner.connection import ConnectOptions, open_connection
spec = json.loads(os.environ["PROVISION_TEST_SPEC"])   # not in argv: it holds the marker
options = ConnectOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["options"].items()})
conn = open_connection(Host(**spec["host"]), options)
threading.Thread(target=conn.run, args=(spec["long"],), kwargs={"check": False}, daemon=True).start()
with conn.hold(["flock", "-n", spec["lock"], "sh", "-c", "echo locked; cat >/dev/null"]) as lines:
    print(next(lines), flush=True)
    time.sleep(600)
"""


@pytest.fixture(params=["ssh", "local"])
def controller(request: pytest.FixtureRequest, sshd_hosts: Callable[..., list[SshdHost]],
               tmp_path: Path) -> Iterator[Callable[[], tuple[subprocess.Popen[str], str, str]]]:
    """Factory: another provision process that holds a lock on the host and runs a long command
    there; returns it, the lock's path and the command's marker."""
    procs: list[subprocess.Popen[str]] = []
    if request.param == "ssh":
        server, = sshd_hosts(1)
        host = {"name": server.name}
        options = {"known_hosts": [str(server.known_hosts)], "ssh_config": str(server.ssh_config),
                   "heartbeat_s": HEARTBEAT_S}
    else:
        host, options = {"name": "box", "transport": "local"}, {"heartbeat_s": HEARTBEAT_S}

    def start() -> tuple[subprocess.Popen[str], str, str]:
        marker, lock = f"provision-test-{uuid.uuid4()}", str(tmp_path / f"lock-{len(procs)}")
        spec = {"host": host, "options": options, "long": sleeper(marker), "lock": lock}
        proc = subprocess.Popen([sys.executable, "-c", CONTROLLER], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO), "PROVISION_TEST_SPEC": json.dumps(spec)})
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        wait_until(lambda: bool(processes_with(marker)), 10)
        assert not lock_free(lock)
        return proc, lock, marker

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


def lock_free(path: str) -> bool:
    return subprocess.run(["flock", "-n", path, "true"]).returncode == 0


def test_a_killed_controller_leaves_nothing_running_and_no_lock(controller: Callable[..., tuple]) -> None:
    proc, lock, marker = controller()
    proc.kill()                                      # SIGKILL: nothing of ours runs after it
    proc.wait()
    wait_until(gone(marker), 5)
    wait_until(lambda: lock_free(lock), 5)


def test_a_partitioned_controller_leaves_nothing_running_and_no_lock(controller: Callable[..., tuple]) -> None:
    """SIGSTOP: its connection stays open, as behind a network partition, but it says nothing more.
    The host lets go once the heartbeat stops, not when TCP would give up (many minutes)."""
    proc, lock, marker = controller()
    proc.send_signal(signal.SIGSTOP)
    dead_after = 3 * HEARTBEAT_S
    took = wait_until(lambda: lock_free(lock), dead_after + GRACE_S + 3)
    wait_until(gone(marker), GRACE_S + 3)
    # Not before the heartbeat was missed: 3 beats after the last one, which came at most a beat ago.
    assert took >= dead_after - HEARTBEAT_S - 0.2


def test_abort_stops_what_runs_and_every_later_call(connect: Callable[[], Connection]) -> None:
    conn, marker = connect(), f"provision-test-{uuid.uuid4()}"
    worker, outcome = running_on_a_thread(conn, marker)
    conn.abort("box: interrupted (Ctrl-C)")
    worker.join(10)
    assert not worker.is_alive()
    (error,) = outcome
    assert isinstance(error, ConnectError) and str(error) == "box: interrupted (Ctrl-C)"
    wait_until(gone(marker), GRACE_S + 3)
    with pytest.raises(ConnectError, match=r"^box: interrupted \(Ctrl-C\)$"):
        conn.run(["true"])


# -- the host freezes ----------------------------------------------------------------------------

def test_a_frozen_host_is_found_out_by_the_heartbeat(sshd_hosts: Callable[..., list[SshdHost]]) -> None:
    """Its sshd stopped (SIGSTOP) with the TCP connection open: paramiko's keepalive, which asks for
    no answer, would wait for TCP to give up. The heartbeat must be answered."""
    server, = sshd_hosts(1)
    conn = open_connection(server.host(), server.options(heartbeat_s=HEARTBEAT_S))
    marker = f"provision-test-{uuid.uuid4()}"
    worker, outcome = running_on_a_thread(conn, marker)
    try:
        with server.frozen() as pids:
            assert pids
            started = time.monotonic()
            worker.join(3 * HEARTBEAT_S + 5)
            took = time.monotonic() - started
            assert not worker.is_alive(), "the run still waits on a frozen host"
            # ... and on the host, the command's supervisor stopped it: our heartbeat no longer came.
            wait_until(gone(marker), 3 * HEARTBEAT_S + GRACE_S + 3)
        (error,) = outcome
        assert isinstance(error, ConnectError)
        assert str(error).startswith(f"{server.name}: no answer to the heartbeat for ")
        assert "the host stopped responding" in str(error)
        assert took < 3 * HEARTBEAT_S + 5                # seconds, not the minutes TCP would take
        with pytest.raises(ConnectError, match="no answer to the heartbeat"):
            conn.run(["true"])
    finally:
        conn.close()


def test_a_slow_command_on_a_live_host_is_no_dead_peer(sshd_hosts: Callable[..., list[SshdHost]]) -> None:
    server, = sshd_hosts(1)
    with open_connection(server.host(), server.options(heartbeat_s=HEARTBEAT_S)) as conn:
        assert conn.run(["sh", "-c", "sleep 3; echo done"]).stdout == "done\n"


# -- framing -------------------------------------------------------------------------------------

def test_output_outside_the_frame_is_not_the_commands() -> None:
    frame = Frame()
    end = frame.end + b'{"exit": 0}\n'
    assert frame.cut(b"Welcome to the host!" + frame.start + b"out\n" + end + b"bye\n") == (b"out\n", {"exit": 0})
    assert frame.cut(b"rc\n" + frame.start + b"partial" + end) == (b"partial", {"exit": 0})
    assert frame.cut(b"rc\n" + frame.start + b"cut short") == (b"cut short", None)
    assert frame.cut(b"never started") is None
    # Another supervisor's markers (a relay's, a forged one) are data to this frame.
    other = Frame()
    assert frame.cut(frame.start + other.end + b'{"exit": 9}\n' + end) == (other.end + b'{"exit": 9}\n',
                                                                            {"exit": 0})


def test_lines_come_only_from_inside_the_frame_whatever_the_chunks() -> None:
    frame = Frame()
    stream = (b"greeting\nno newline" + frame.start + b"one\ntwo\nthree" + frame.end + b'{"exit": 0}\n'
              b"after\n")
    for size in (1, 2, 7, len(stream)):
        got: list[str] = []
        lines = Lines(frame, got.append)
        for i in range(0, len(stream), size):
            lines.feed(stream[i:i + size])
        lines.close()
        assert got == ["one", "two", "three"], size
