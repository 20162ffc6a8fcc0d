"""The local transport: subprocess without a shell, atomic writes, hold via Popen."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from provisioner.connection import open_connection
from provisioner.connection.local import LocalConnection
from provisioner.errors import CommandError
from provisioner.config.inventory import Host

PRINT_ARGV = "import sys, json; print(json.dumps(sys.argv[1:]))"


@pytest.fixture
def conn() -> LocalConnection:
    c = open_connection(Host(name="here", transport="local"))
    assert isinstance(c, LocalConnection)
    return c


def test_run_exit_code_streams_and_stats(conn: LocalConnection) -> None:
    r = conn.run(["sh", "-c", "echo out; echo err >&2; exit 4"], check=False)
    assert (r.exit_code, r.stdout, r.stderr) == (4, "out\n", "err\n")
    conn.run(["true"])
    assert (conn.stats.connects, conn.stats.execs) == (0, 2)
    assert conn.stats.history[-1] == ("true",)
    with pytest.raises(CommandError, match=r"^here: `false` exited 1: \(no stderr\)$"):
        conn.run(["false"])


def test_argv_is_execd_without_a_shell(conn: LocalConnection, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = [f"$(touch {marker})", "a b", "it's", "diffusers>=0.35", "x\ny", "*", ""]
    r = conn.run([sys.executable, "-c", PRINT_ARGV, *hostile])
    assert json.loads(r.stdout) == hostile and not marker.exists()


def test_stdin_env_merge_and_missing_command(conn: LocalConnection,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVISION_OUTER", "kept")
    r = conn.run(["sh", "-c", 'cat; printf "%s %s" "$PROVISION_OUTER" "$PROVISION_X"'],
                 stdin=b"in:", env={"PROVISION_X": "$(not run)"})
    assert r.stdout == "in:kept $(not run)"
    missing = conn.run(["provision-no-such-command"], check=False)
    assert missing.exit_code == 127 and "No such file" in missing.stderr


def test_timeout_is_124_and_kills_the_children_too(conn: LocalConnection) -> None:
    start = time.monotonic()
    r = conn.run(["sh", "-c", "echo started; sleep 30"], timeout=0.3, check=False)
    assert time.monotonic() - start < 5  # `sleep` held stdout open: it had to die as well
    assert r.exit_code == 124 and r.stdout == "started\n" and r.stopped.startswith("timed out after 0.3s")


def test_stdout_callback_gets_lines_as_they_arrive(conn: LocalConnection) -> None:
    got: list[tuple[str, float]] = []
    start = time.monotonic()
    r = conn.run(["sh", "-c", "echo one; sleep 0.4; printf 'two\\nthree'"],
                 stdout_callback=lambda line: got.append((line, time.monotonic() - start)))
    assert [line for line, _ in got] == ["one", "two", "three"]
    assert got[0][1] < got[1][1] - 0.3
    assert r.stdout == "one\ntwo\nthree"


def test_put_is_atomic_and_creates_parents(conn: LocalConnection, tmp_path: Path) -> None:
    dest = tmp_path / "new dir" / "file"
    conn.put(b"\x00binary\xff", str(dest), mode=0o640)
    assert dest.read_bytes() == b"\x00binary\xff"
    assert dest.stat().st_mode & 0o777 == 0o640
    assert os.listdir(dest.parent) == ["file"]
    assert conn.stats.bytes_put == 8


def test_put_file_streams_with_progress_and_never_shows_a_partial_file(
        conn: LocalConnection, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(8 * 1024 * 1024 + 3))
    dest = tmp_path / "out" / "dest.bin"
    seen: set[int] = set()
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            seen.add(dest.stat().st_size if dest.exists() else -1)

    progress: list[tuple[int, int]] = []
    watcher = threading.Thread(target=poll)
    watcher.start()
    conn.put_file(str(src), str(dest), progress=lambda d, t: progress.append((d, t)))
    stop.set()
    watcher.join()
    size = src.stat().st_size
    assert seen <= {-1, size} and dest.read_bytes() == src.read_bytes()
    assert len(progress) == 9 and progress[-1] == (size, size)


def test_put_over_a_file_in_the_way_is_a_command_error(conn: LocalConnection, tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    with pytest.raises(CommandError, match="put .*plain/sub/f"):
        conn.put(b"x", str(tmp_path / "plain" / "sub" / "f"))


def test_tunnel_to_loopback_is_the_port_itself(conn: LocalConnection) -> None:
    with conn.tunnel(8188) as port:
        assert port == 8188


def test_hold_keeps_a_lock_until_the_block_exits(conn: LocalConnection, tmp_path: Path) -> None:
    lock = str(tmp_path / "lock")
    with conn.hold(["flock", "-n", lock, "sh", "-c", "echo locked; cat >/dev/null"]) as lines:
        assert next(lines) == "locked"
        assert conn.run(["flock", "-n", lock, "true"], check=False).exit_code == 1
    assert conn.run(["flock", "-n", lock, "true"], check=False).exit_code == 0


def test_a_held_command_let_go_early_ends_its_lines_at_once(conn: LocalConnection) -> None:
    """`end()` from another thread: the command's stdin ends, it stops, and the lines run out without
    waiting for a line it would only print much later (verify's nvidia-smi stream)."""
    import threading
    import time

    with conn.hold(["sh", "-c", "echo first; cat >/dev/null; echo after-stdin"]) as lines:
        assert next(lines) == "first"
        started = time.monotonic()
        threading.Timer(0.1, lines.end).start()
        rest = list(lines)
        took = time.monotonic() - started
    assert rest == ["after-stdin"] and took < 2.0, (rest, took)


def test_commands_run_with_the_hosts_environment_not_the_control_venvs(monkeypatch: pytest.MonkeyPatch,
                                                                          conn: LocalConnection) -> None:
    """An activated control venv (its bin/ first on PATH, VIRTUAL_ENV) does not leak into the host's
    commands: `python3` is the machine's, so facts never report provision's own venv as the system python."""
    from provisioner.config.model import ComfySpec, Profile
    from provisioner.facts.gather import base_probe, gather

    assert sys.prefix != sys.base_prefix, "the tests run from the control venv"
    venv_bin = os.path.join(sys.prefix, "bin")
    monkeypatch.setenv("PATH", os.pathsep.join([venv_bin, os.environ["PATH"]]))
    monkeypatch.setenv("VIRTUAL_ENV", sys.prefix)
    seen = conn.run(["sh", "-c", 'command -v python3; echo "${VIRTUAL_ENV:-none}"; echo "$PATH"'])
    python3, virtual_env, path = seen.stdout.splitlines()
    assert not python3.startswith(sys.prefix) and virtual_env == "none"
    assert venv_bin not in path.split(os.pathsep) and "/usr/bin" in path.split(os.pathsep)
    import socket

    with socket.socket() as s:               # a port nothing answers on: the facts' HTTP probe is quick
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile = Profile(name="t", file="t.yaml", inventory=None, hosts="all",
                      comfyui=ComfySpec(root="/nonexistent/ComfyUI", venv="/nonexistent/ComfyUI/venv", port=port))
    facts = gather(conn, profile, base_probe(profile))
    assert sys.prefix not in facts.system_python
