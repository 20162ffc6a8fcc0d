"""The SSH transport against real OpenSSH servers on loopback (tests/sshd.py)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest
import yaml
from paramiko.common import cMSG_CHANNEL_DATA

from provisioner.connection import ConnectOptions, open_connection
from provisioner.connection.channel import send_if_open, send_all, send_eof
from provisioner.connection.ssh import SshConnection
from provisioner.errors import CommandError, ConnectError
from provisioner.config.inventory import Host, load_inventory
from sshd import SshdHost, fingerprint, inventory_for, keygen, write_script

PRINT_ARGV = "import sys, json; print(json.dumps(sys.argv[1:]))"


@pytest.fixture(scope="module")
def conn(sshd_host: SshdHost) -> Iterator[SshConnection]:
    c = open_connection(sshd_host.host(), sshd_host.options())
    assert isinstance(c, SshConnection)
    yield c
    c.close()


# -- running commands ---------------------------------------------------------------------------

def test_run_returns_exit_code_stdout_and_stderr(conn: SshConnection) -> None:
    r = conn.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (3, "out\n", "err\n", False)
    assert conn.run(["true"]).ok


def test_failed_command_raises_one_line_command_error(conn: SshConnection) -> None:
    with pytest.raises(CommandError) as err:
        conn.run(["sh", "-c", "echo first >&2; echo 'no such thing' >&2; exit 7"])
    assert str(err.value).startswith("shared-01: `sh -c")
    assert str(err.value).endswith("exited 7: no such thing")
    assert err.value.result.exit_code == 7


def test_stdin_and_large_output_do_not_deadlock(conn: SshConnection) -> None:
    text = ("0123456789abcdef" * 64 + "\n") * 3000  # ~3 MB each way, beyond any pipe buffer
    # stderr is flooded before stdin is read: needs stdin fed and both streams drained at once
    r = conn.run(["sh", "-c", "head -c 4000000 /dev/zero >&2; cat"], stdin=text.encode())
    assert r.stdout == text and len(r.stderr) == 4_000_000


def test_binary_stdin_arrives_exactly(conn: SshConnection) -> None:
    data = os.urandom(1024 * 1024)
    assert conn.run(["sha256sum"], stdin=data).stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_env_reaches_the_command_quoted(conn: SshConnection, tmp_path: Path) -> None:
    marker = tmp_path / "pwned-env"
    value = f"a'b \"c\" $(touch {marker}) ; d"
    r = conn.run(["sh", "-c", 'printf %s "$PROVISION_X"'], env={"PROVISION_X": value})
    assert r.stdout == value
    assert not marker.exists()


def test_hostile_argv_survives_quoting_exactly(conn: SshConnection, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = ["path with spaces/x", "it's", 'say "hi"', f"$(touch {marker})", f"`touch {marker}`",
               f"; touch {marker}", "line1\nline2", "diffusers>=0.35", "peft>=0.17", "*", "~",
               "$HOME", "back\\slash", "-n", "", "a|b&c", "tab\there", "ünï©ode"]
    r = conn.run(["python3", "-c", PRINT_ARGV, *hostile])
    assert json.loads(r.stdout) == hostile
    assert not marker.exists()
    home = conn.run(["sh", "-c", 'printf %s "$HOME"']).stdout
    assert not Path(home, "=0.35").exists()  # the seed's unquoted `>=0.35` made this file


def test_timeout_reports_124_and_raises_when_checked(conn: SshConnection) -> None:
    start = time.monotonic()
    r = conn.run(["sh", "-c", "echo started; sleep 30"], timeout=0.5, check=False)
    assert time.monotonic() - start < 5
    assert r.exit_code == 124 and r.stdout == "started\n" and r.stopped.startswith("timed out after 0.5s")
    with pytest.raises(CommandError, match=r"`sleep 30` timed out after 0.3s \(its process group was stopped\)$"):
        conn.run(["sleep", "30"], timeout=0.3)
    assert conn.run(["echo", "still usable"]).stdout == "still usable\n"


def test_each_host_gets_its_own_bin_dir_first_on_path(sshd_hosts: Callable[..., list[SshdHost]],
                                                     tmp_path: Path) -> None:
    bins = [tmp_path / "bin-a", tmp_path / "bin-b"]
    for b, gpu in zip(bins, ["RTX 3090", "RTX 4090"]):
        b.mkdir()
        write_script(b / "nvidia-smi", f"#!/bin/sh\necho '{gpu}, 24576'\n")
    hosts = sshd_hosts(2, bin_dirs=bins)
    out = []
    for h in hosts:
        with open_connection(h.host(), h.options()) as c:
            out.append(c.run(["nvidia-smi"]).stdout.strip())
    assert out == ["RTX 3090, 24576", "RTX 4090, 24576"]


def test_stdout_callback_gets_lines_as_they_arrive(conn: SshConnection) -> None:
    got: list[tuple[str, float]] = []
    start = time.monotonic()
    r = conn.run(["sh", "-c", "echo one; sleep 0.4; printf 'two\\nthree'"],
                 stdout_callback=lambda line: got.append((line, time.monotonic() - start)))
    assert [line for line, _ in got] == ["one", "two", "three"]  # unfinished last line too
    assert got[0][1] < got[1][1] - 0.3  # "one" came before the sleep ended, not at exit
    assert r.stdout == "one\ntwo\nthree"


# -- files --------------------------------------------------------------------------------------

def test_put_creates_parents_sets_mode_and_replaces(conn: SshConnection, tmp_path: Path) -> None:
    dest = tmp_path / "a b" / "c'd" / "file.bin"
    content = bytes(range(256)) * 10
    before = conn.stats.bytes_put
    conn.put(content, str(dest), mode=0o600)
    assert dest.read_bytes() == content
    assert dest.stat().st_mode & 0o777 == 0o600
    assert conn.stats.bytes_put - before == len(content)
    conn.put(b"second", str(dest))  # replaces
    assert dest.read_bytes() == b"second"
    assert [p.name for p in dest.parent.iterdir()] == ["file.bin"]  # no temporary left behind


def test_put_into_an_unwritable_place_is_a_command_error(conn: SshConnection, tmp_path: Path) -> None:
    blocker = tmp_path / "plainfile"
    blocker.write_text("x")
    with pytest.raises(CommandError, match="put"):
        conn.put(b"x", str(blocker / "under" / "file"))


def test_put_file_is_atomic_and_reports_progress(conn: SshConnection, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(24 * 1024 * 1024))
    dest = tmp_path / "remote" / "big.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    seen: set[int] = set()
    stop = threading.Event()

    def poll() -> None:  # a reader must only ever see the old file or the complete new one
        while not stop.is_set():
            try:
                seen.add(dest.stat().st_size)
            except FileNotFoundError:
                seen.add(-1)

    progress: list[tuple[int, int]] = []
    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        conn.put_file(str(src), str(dest), progress=lambda done, total: progress.append((done, total)))
    finally:
        stop.set()
        watcher.join()
    assert seen <= {3, src.stat().st_size}
    assert dest.read_bytes() == src.read_bytes()
    assert progress[-1] == (src.stat().st_size, src.stat().st_size)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert os.listdir(dest.parent) == ["big.bin"]


def test_a_large_push_goes_through_the_system_scp_atomically(conn: SshConnection, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Above scp.SYSTEM_COPY_MIN (made small here) the bytes go through OpenSSH's scp, to a
    temporary name, then chmod and rename over SFTP: the same atomic, mode-setting put."""
    from provisioner.connection import scp

    monkeypatch.setattr(scp, "SYSTEM_COPY_MIN", 1 << 20)
    used: list[list[str]] = []
    real_argv = scp.argv
    monkeypatch.setattr(scp, "argv", lambda *a: used.append(real_argv(*a)) or used[-1])
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    dest = tmp_path / "remote" / "dir with space" / "model.bin"
    progress: list[tuple[int, int]] = []
    conn.put_file(str(src), str(dest), mode=0o600, progress=lambda d, t: progress.append((d, t)))
    assert dest.read_bytes() == src.read_bytes() and (dest.stat().st_mode & 0o777) == 0o600
    assert os.listdir(dest.parent) == ["model.bin"]
    assert progress[-1] == (src.stat().st_size,) * 2
    (cmd,) = used
    assert cmd[0] == "scp" and "StrictHostKeyChecking=yes" in cmd and "GlobalKnownHostsFile=/dev/null" in cmd
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    conn.put_file(str(small), str(dest.with_name("small.bin")))
    assert len(used) == 1             # a small file stays on the SFTP channel


def test_scp_only_trusts_the_key_paramiko_verified(sshd_host: SshdHost, tmp_path: Path) -> None:
    """The push is pinned to the host key the connection checked: offered another key, scp refuses
    (and the put then goes over the verified SFTP channel instead)."""
    import paramiko

    from provisioner.connection import scp
    from provisioner.connection.options import load_ssh_config, resolve

    options = sshd_host.options()
    target = resolve(sshd_host.name, load_ssh_config(options), sshd_host.host())
    src = tmp_path / "f.bin"
    src.write_bytes(b"data")
    impostor = paramiko.Ed25519Key.from_private_key_file(str(sshd_host.client_key))  # not the host's key
    failed = scp.push(target, str(sshd_host.client_key), impostor, 10, str(src), str(tmp_path / "out"),
                      4, lambda: None, None)
    assert failed is not None and "verification failed" in failed.lower()
    assert not (tmp_path / "out").exists()


def test_a_host_with_an_rsa_key_gets_its_large_push_through_scp(sshd_hosts: Callable[..., list[SshdHost]],
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An RSA host key is named `ssh-rsa`, which OpenSSH >= 8.8 refuses as a signature: scp is
    pinned to rsa-sha2-512/256 and copies the file (it fell back to SFTP before, unsaid)."""
    from provisioner.connection import scp

    (host,) = sshd_hosts(1, key_type="rsa")
    monkeypatch.setattr(scp, "SYSTEM_COPY_MIN", 1 << 20)
    used: list[list[str]] = []
    real_argv = scp.argv
    monkeypatch.setattr(scp, "argv", lambda *a: used.append(real_argv(*a)) or used[-1])
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(2 * 1024 * 1024))
    with open_connection(host.host(), host.options()) as c:
        assert c._transport.get_remote_server_key().get_name() == "ssh-rsa"
        c.put_file(str(src), str(tmp_path / "out" / "model.bin"))
        assert c.stats.fallbacks == []
    (cmd,) = used
    assert "HostKeyAlgorithms=rsa-sha2-512,rsa-sha2-256" in cmd
    assert (tmp_path / "out" / "model.bin").read_bytes() == src.read_bytes()


def test_a_failed_scp_is_said_with_its_reason_before_sftp_copies_the_file(
        sshd_host: SshdHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from provisioner.connection import scp

    monkeypatch.setattr(scp, "SYSTEM_COPY_MIN", 1 << 20)
    real_argv = scp.argv
    # scp refuses the host key (a changed one, as an impostor would show): the verified SFTP copies.
    monkeypatch.setattr(scp, "argv", lambda *a: [*real_argv(*a)[:1], "-o", "HostKeyAlgorithms=ssh-rsa",
                                                 *real_argv(*a)[1:]])
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(2 * 1024 * 1024))
    with open_connection(sshd_host.host(), sshd_host.options()) as c:
        c.put_file(str(src), str(tmp_path / "out" / "model.bin"))
        (why,) = c.stats.fallbacks
    assert why == "scp of model.bin failed (scp: Connection closed): copied over SFTP instead"
    assert (tmp_path / "out" / "model.bin").read_bytes() == src.read_bytes()


def test_aborting_the_connection_kills_a_running_scp(sshd_host: SshdHost, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C aborts every host's connection (plan/fleet.py); a push in scp stops with it."""
    from provisioner.connection import scp

    monkeypatch.setattr(scp, "SYSTEM_COPY_MIN", 1 << 20)
    real_argv = scp.argv
    # A real scp that cannot finish soon: its ssh runs a 60 s sleep before the transfer starts.
    monkeypatch.setattr(scp, "argv", lambda *a: [*real_argv(*a)[:1], "-S", str(slow_ssh), *real_argv(*a)[1:]])
    slow_ssh = tmp_path / "slow-ssh"
    slow_ssh.write_text("#!/bin/sh\nsleep 60\nexec ssh \"$@\"\n")
    slow_ssh.chmod(0o755)
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(2 * 1024 * 1024))
    c = open_connection(sshd_host.host(), sshd_host.options())
    assert isinstance(c, SshConnection)
    errors: list[BaseException] = []

    def push() -> None:
        try:
            c.put_file(str(src), str(tmp_path / "out" / "model.bin"))
        except BaseException as err:
            errors.append(err)
    worker = threading.Thread(target=push)
    worker.start()
    deadline = time.monotonic() + 10
    while not c._children and time.monotonic() < deadline:
        time.sleep(0.05)
    (proc,) = list(c._children)
    started = time.monotonic()
    c.abort("interrupted")
    worker.join(10)
    assert not worker.is_alive() and time.monotonic() - started < 5
    assert proc.poll() is not None
    assert len(errors) == 1 and isinstance(errors[0], ConnectError) and "interrupted" in str(errors[0])
    c.close()


# -- a channel's last words ---------------------------------------------------------------------

def _ended(transport: paramiko.Transport) -> paramiko.Channel:
    """A session whose command ended and whose CLOSE both sides have sent."""
    chan = transport.open_session()
    chan.exec_command("true")
    deadline = time.monotonic() + 10
    while not chan.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert chan.closed
    return chan


def test_data_or_eof_after_a_channel_closed_never_drops_the_connection(sshd_host: SshdHost) -> None:
    """paramiko sends a message it built before a CLOSE after it (its issues #1115, #1705), and
    OpenSSH then drops the whole connection: every later command failed "SSH session not active".
    channel.py's sends read the channel's state under the transport's send lock."""
    c = open_connection(sshd_host.host(), sshd_host.options())
    assert isinstance(c, SshConnection)
    try:
        transport = c._transport
        chan = _ended(transport)
        late = paramiko.Message()           # built as paramiko's send() built it, before the CLOSE
        late.add_byte(cMSG_CHANNEL_DATA)
        late.add_int(chan.remote_chanid)
        late.add_string(b"heartbeat\n")
        with pytest.raises(OSError):
            send_all(chan, b"heartbeat\n")
        send_eof(chan)
        assert not send_if_open(chan, late)
        assert c.run(["true"]).ok and transport.is_active()
        # The hazard itself: the same message sent the way paramiko sends it, once a round trip
        # has let sshd free what closed (it frees channels between reads, not within one).
        transport.global_request("keepalive@openssh.com", wait=True)
        transport._send_user_message(late)
        deadline = time.monotonic() + 10
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not transport.is_active()
        assert "referred to nonexistent channel" in sshd_host.log_text()
        # The loss is said as the host said it, not as paramiko's "SSH session not active".
        with pytest.raises(ConnectError, match="connection lost: the host ended the connection: "
                                               "data packet referred to nonexistent channel"):
            c.run(["true"])
    finally:
        c.close()


# -- tunnel and hold ----------------------------------------------------------------------------

def test_tunnel_forwards_http_and_closes_on_exit(conn: SshConnection, http_port: int) -> None:
    with conn.tunnel(http_port) as port:
        assert port != http_port
        bodies = [urllib.request.urlopen(f"http://127.0.0.1:{port}/p{i}", timeout=5).read()
                  for i in range(3)]
    assert bodies == [b"hello from /p0", b"hello from /p1", b"hello from /p2"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_tunnel_closed_while_data_streams_in_leaves_the_connection_alive(
        conn: SshConnection, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that hangs up while the far end is still sending (a websocket's progress messages
    after verification is done): closing its channel must not end the connection. paramiko makes
    a channel selectable with a pipe that close() closes while the transport's thread may still
    write into it, and that write's EBADF ended the transport ("Socket exception: Bad file
    descriptor"); the relay reads each channel in a thread of its own and never asks for one."""
    def no_pipe(self: paramiko.Channel) -> int:
        raise AssertionError("the tunnel made a channel selectable (Channel.fileno)")
    monkeypatch.setattr(paramiko.Channel, "fileno", no_pipe)
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def flood() -> None:                # every client gets data without end, until it hangs up
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=client: _send_until_gone(c), daemon=True).start()

    threading.Thread(target=flood, daemon=True).start()
    try:
        with conn.tunnel(server.getsockname()[1]) as port:
            for _ in range(40):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                    assert client.recv(4096)
        assert conn.run(["echo", "still here"]).stdout == "still here\n"
    finally:
        stop.set()
        server.close()


def _send_until_gone(client: socket.socket) -> None:
    chunk = b"x" * 65536
    try:
        while True:
            client.sendall(chunk)
    except OSError:
        client.close()


def test_hold_keeps_a_lock_until_the_block_exits(conn: SshConnection, tmp_path: Path) -> None:
    lock = str(tmp_path / "apply.lock")
    holder = ["flock", "-n", lock, "sh", "-c", "echo locked; cat >/dev/null"]
    with conn.hold(holder) as lines:
        assert next(lines) == "locked"
        assert conn.run(["flock", "-n", lock, "true"], check=False).exit_code == 1
    assert conn.run(["flock", "-n", lock, "true"], check=False).exit_code == 0


def test_held_lock_goes_when_the_holding_process_dies(sshd_host: SshdHost, conn: SshConnection,
                                                     tmp_path: Path) -> None:
    lock = str(tmp_path / "apply.lock")
    code = (f"from provisioner.connection import open_connection, ConnectOptions\n"
            f"from provisioner.config.inventory import Host\n"
            f"c = open_connection(Host(name={sshd_host.name!r}), ConnectOptions("
            f"known_hosts=({str(sshd_host.known_hosts)!r},), ssh_config={str(sshd_host.ssh_config)!r}))\n"
            f"with c.hold(['flock', '-n', {lock!r}, 'sh', '-c', 'echo locked; cat']) as lines:\n"
            f"    print(next(lines), flush=True)\n"
            f"    import time; time.sleep(60)\n")
    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert conn.run(["flock", "-n", lock, "true"], check=False).exit_code == 1
    finally:
        holder.kill()  # SIGKILL: no cleanup runs; sshd sees the connection drop
        holder.wait()
    deadline = time.monotonic() + 5
    while conn.run(["flock", "-n", lock, "true"], check=False).exit_code != 0:
        assert time.monotonic() < deadline, "lock still held after its holder died"
        time.sleep(0.1)


# -- connects, execs and the sshd log -----------------------------------------------------------

def test_one_connect_and_one_session_per_exec_in_stats_and_sshd_log(
        sshd_hosts: Callable[..., list[SshdHost]]) -> None:
    host, = sshd_hosts(1)
    mark = host.log_size()
    with open_connection(host.host(), host.options()) as c:
        for i in range(5):
            c.run(["echo", str(i)])
        assert (c.stats.connects, c.stats.execs) == (1, 5)
        assert c.stats.history == [("echo", str(i)) for i in range(5)]
    assert host.wait_counts(1, 5, since=mark) == (1, 5)
    time.sleep(0.2)  # nothing more arrives late
    assert (host.count_connections(mark), host.count_sessions(mark)) == (1, 5)


def test_inventory_fields_override_ssh_config(sshd_hosts: Callable[..., list[SshdHost]],
                                             tmp_path: Path) -> None:
    a, b = sshd_hosts(2)
    write_script(b.bin_dir / "whoami-host", "#!/bin/sh\necho b\n")
    # alias gpu-01 in ssh_config, but the inventory says port = b's: b is reached
    with open_connection(Host(name=a.name, port=b.port), a.options()) as c:
        assert c.run(["whoami-host"]).stdout == "b\n"
    # no ssh_config at all: address/port/user/key_file from the inventory alone
    empty = tmp_path / "empty_config"
    empty.write_text("")
    opts = b.options(ssh_config=str(empty), allow_agent=False, look_for_keys=False)
    with open_connection(b.host(via_config=False), opts) as c:
        assert c.run(["whoami-host"]).stdout == "b\n"


@pytest.mark.parametrize("via_config", [False, True])
def test_inventory_for_loads_and_connects(sshd_hosts: Callable[..., list[SshdHost]],
                                          tmp_path: Path, via_config: bool) -> None:
    hosts = sshd_hosts(2)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inventory_for(hosts, via_config=via_config,
                                                 provision_note="x")))
    loaded = load_inventory(path).select("all")
    assert [h.name for h in loaded] == ["gpu-01", "gpu-02"]
    for host, server in zip(loaded, hosts):
        with open_connection(host, server.options()) as c:
            assert c.run(["printenv", "PATH"]).stdout.startswith(str(server.bin_dir) + ":")


# -- failures to connect ------------------------------------------------------------------------

def test_host_down_is_a_fast_connect_error(sshd_hosts: Callable[..., list[SshdHost]]) -> None:
    host, = sshd_hosts(1)
    # A port held bound and never listening: nothing there answers, and no other process can take
    # it meanwhile (a stopped sshd's port could be anyone's by the time the test connects).
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(ConnectError) as err:
            open_connection(host.host(via_config=False, port=port), host.options())
        assert time.monotonic() - start < 2
    assert str(err.value) == (f"gpu-01: connection to 127.0.0.1:{port} refused "
                              f"(is sshd running there, on that port?)")


@pytest.mark.parametrize("address", ["..", "127.0.0.1..", "\u202e;touch x", "a" * 300])
def test_a_host_name_no_resolver_can_encode_is_a_connect_error(address: str) -> None:
    """These were UnicodeErrors from the idna codec: an internal error for the host (found by the
    injection corpus, tests/reliability)."""
    host = Host("gpu-01", address=address, port=22, user="u")
    with pytest.raises(ConnectError, match=r"^gpu-01: cannot connect to '.*' port 22: .*idna"):
        open_connection(host, ConnectOptions(known_hosts=(), connect_timeout=2, ssh_config="/dev/null"))


def test_silent_server_times_out_at_connect_timeout(sshd_host: SshdHost) -> None:
    with socket.create_server(("127.0.0.1", 0)) as mute:  # accepts TCP, never says a word
        port = mute.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(ConnectError, match=f"handshake with 127.0.0.1:{port} failed"):
            open_connection(Host(name="mute", address="127.0.0.1", port=port),
                            sshd_host.options(connect_timeout=0.5))
        assert time.monotonic() - start < 5


def test_a_failed_handshake_prints_nothing_but_the_error() -> None:
    code = ("import socket\n"
            "from provisioner.connection import open_connection, ConnectOptions\n"
            "from provisioner.config.inventory import Host\n"
            "from provisioner.errors import ConnectError\n"
            "mute = socket.create_server(('127.0.0.1', 0))\n"
            "try:\n"
            "    open_connection(Host(name='mute', address='127.0.0.1', port=mute.getsockname()[1]),"
            " ConnectOptions(connect_timeout=0.3, known_hosts=()))\n"
            "except ConnectError as err:\n"
            "    print(err)\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.stderr == ""  # no paramiko traceback under the one-line error
    assert done.stdout.startswith("mute: SSH handshake with 127.0.0.1:")


def test_wrong_key_is_an_authentication_error(sshd_hosts: Callable[..., list[SshdHost]],
                                             tmp_path: Path) -> None:
    host, = sshd_hosts(1)
    stranger = tmp_path / "stranger"
    keygen(stranger)
    empty = tmp_path / "empty_config"
    empty.write_text("")
    opts = host.options(ssh_config=str(empty), allow_agent=False, look_for_keys=False)
    with pytest.raises(ConnectError) as err:
        open_connection(host.host(via_config=False, key_file=str(stranger)), opts)
    message = str(err.value)
    assert message.startswith(f"gpu-01: authentication as {host.user}@127.0.0.1:{host.port} failed")
    assert str(stranger) in message and "\n" not in message


def test_match_exec_in_ssh_config_runs_its_command_and_a_run_without_one_never_imports_invoke(
        sshd_host: SshdHost, tmp_path: Path) -> None:
    """paramiko runs `Match exec` commands through invoke, which provision imports only for a
    config that has one (a quarter of paramiko's import otherwise). In a process of its own: invoke
    hands the command the terminal's stdin, as paramiko has it, which pytest's capture refuses."""
    flag = tmp_path / "on-the-vpn"
    config = tmp_path / "ssh_config"
    config.write_text(f'Match host gpu-exec exec "test -e {flag}"\n  HostName 127.0.0.1\n  Port {sshd_host.port}\n'
                      f"  User {sshd_host.user}\n  IdentityFile {sshd_host.client_key}\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def python(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                              stdin=subprocess.DEVNULL).stdout
    reach = ("import sys\nfrom provisioner.config.inventory import Host\n"
             "from provisioner.connection import ConnectOptions, open_connection\n"
             f"options = ConnectOptions(ssh_config={str(config)!r}, known_hosts=({str(sshd_host.known_hosts)!r},),"
             " connect_timeout=5)\n"
             "try:\n    print(open_connection(Host(name='gpu-exec'), options).run(['echo', 'reached']).stdout, end='')\n"
             "except Exception as err:\n    print(type(err).__name__)\n")
    flag.touch()
    assert python(reach) == "reached\n"
    flag.unlink()
    assert python(reach) == "ConnectError\n"           # the command failed: gpu-exec is no address
    imports = "import sys, provisioner.commands, provisioner.connection.ssh, paramiko; print(sys.modules.get('invoke'))"
    assert python(imports) == "None\n"


def test_missing_ssh_config_file_is_named(sshd_host: SshdHost, tmp_path: Path) -> None:
    with pytest.raises(ConnectError, match="ssh config .*nope does not exist"):
        open_connection(sshd_host.host(), sshd_host.options(ssh_config=str(tmp_path / "nope")))


# -- host keys ----------------------------------------------------------------------------------

def test_unknown_host_key_is_refused_with_its_fingerprint(
        sshd_hosts: Callable[..., list[SshdHost]]) -> None:
    host, = sshd_hosts(1, trusted=False)
    with pytest.raises(ConnectError) as err:
        open_connection(host.host(), host.options())
    message = str(err.value)
    assert message.startswith(f"gpu-01 ([127.0.0.1]:{host.port}): unknown host key ssh-ed25519 "
                              f"{host.fingerprint};")
    assert f"ssh-keyscan -p {host.port} 127.0.0.1 >> {host.known_hosts}" in message
    assert "--accept-new-host-keys" in message and "\n" not in message
    assert host.count_connections() == 0  # refused before any authentication


def test_accept_new_records_the_key_then_strict_accepts_it(
        sshd_hosts: Callable[..., list[SshdHost]]) -> None:
    host, = sshd_hosts(1, trusted=False)
    with open_connection(host.host(), host.options(host_key_policy="accept-new")) as c:
        assert c.run(["true"]).ok
    assert host.known_hosts.read_text() == host.known_hosts_line
    with open_connection(host.host(), host.options()) as c:  # strict now knows it
        assert c.run(["true"]).ok


def test_changed_host_key_is_refused_with_both_fingerprints(
        sshd_hosts: Callable[..., list[SshdHost]]) -> None:
    host, = sshd_hosts(1)
    old = host.fingerprint
    new = host.replace_host_key()
    for policy in ("strict", "accept-new"):
        with pytest.raises(ConnectError) as err:
            open_connection(host.host(), host.options(host_key_policy=policy))
        message = str(err.value)
        assert message.startswith(f"gpu-01 ([127.0.0.1]:{host.port}): HOST KEY CHANGED: "
                                  f"known ssh-ed25519 {old}, server now offers {new};")
        assert f"ssh-keygen -R '[127.0.0.1]:{host.port}'" in message and "\n" not in message
    assert new not in host.known_hosts.read_text()


def test_hashed_known_hosts_entries_are_understood(sshd_hosts: Callable[..., list[SshdHost]]) -> None:
    host, = sshd_hosts(1)
    subprocess.run(["ssh-keygen", "-H", "-f", str(host.known_hosts)], check=True,
                   capture_output=True)
    assert host.known_hosts.read_text().startswith("|1|")
    with open_connection(host.host(), host.options()) as c:
        assert c.run(["true"]).ok


def _other_key(tmp_path: Path, name: str) -> str:
    keygen(tmp_path / name)
    return (tmp_path / f"{name}.pub").read_text().split(maxsplit=2)[:2]  # type: ignore[return-value]


def test_cert_authority_lines_do_not_lock_the_fleet_out(sshd_hosts: Callable[..., list[SshdHost]],
                                                        tmp_path: Path) -> None:
    """One @cert-authority line made every host an internal error (paramiko cannot read it)."""
    host, = sshd_hosts(1)
    kind, blob = _other_key(tmp_path, "ca")
    host.known_hosts.write_text(f"@cert-authority *.example.internal {kind} {blob} ca\n"
                                f"# a comment, and a line no ssh can read:\n@cert-authority\n{host.known_hosts_line}")
    with open_connection(host.host(), host.options()) as c:
        assert c.run(["true"]).ok


def test_a_host_only_a_cert_authority_covers_is_unknown_and_says_why(
        sshd_hosts: Callable[..., list[SshdHost]], tmp_path: Path) -> None:
    host, = sshd_hosts(1, trusted=False)
    kind, blob = _other_key(tmp_path, "ca")
    host.known_hosts.write_text(f"@cert-authority [127.0.0.1]:* {kind} {blob}\n")
    with pytest.raises(ConnectError) as err:
        open_connection(host.host(), host.options())
    message = str(err.value)
    assert "unknown host key" in message and "\n" not in message
    assert f"only a certificate authority vouches for it ({host.known_hosts}:1, @cert-authority)" in message


@pytest.mark.parametrize("policy", ["strict", "accept-new"])
def test_a_revoked_key_is_refused_even_when_also_listed(sshd_hosts: Callable[..., list[SshdHost]],
                                                       policy: str) -> None:
    host, = sshd_hosts(1)
    kind, blob = host.host_key_pub.read_text().split()[:2]
    host.known_hosts.write_text(f"{host.known_hosts_line}@revoked * {kind} {blob}\n")
    with pytest.raises(ConnectError) as err:
        open_connection(host.host(), host.options(host_key_policy=policy))  # type: ignore[arg-type]
    assert str(err.value) == (f"gpu-01 ([127.0.0.1]:{host.port}): host key {kind} {host.fingerprint} is "
                              f"REVOKED ({host.known_hosts}:2); refused. The host needs a new key, verified "
                              "before it is trusted")
    assert host.count_connections() == 0
    host.known_hosts.write_text(f"@revoked * {kind} {blob}\n")  # not listed: accept-new must not add it
    with pytest.raises(ConnectError, match="REVOKED"):
        open_connection(host.host(), host.options(host_key_policy=policy))  # type: ignore[arg-type]
    assert "@revoked" in host.known_hosts.read_text() and host.known_hosts.read_text().count("\n") == 1


def test_revoking_another_key_changes_nothing(sshd_hosts: Callable[..., list[SshdHost]], tmp_path: Path) -> None:
    host, = sshd_hosts(1)
    kind, blob = _other_key(tmp_path, "old")
    host.known_hosts.write_text(f"@revoked * {kind} {blob}\n{host.known_hosts_line}")
    with open_connection(host.host(), host.options()) as c:
        assert c.run(["true"]).ok


def test_wildcard_and_negated_patterns(sshd_hosts: Callable[..., list[SshdHost]]) -> None:
    host, = sshd_hosts(1)
    kind, blob = host.host_key_pub.read_text().split()[:2]
    host.known_hosts.write_text(f"[127.0.0.?]:* {kind} {blob}\n")
    with open_connection(host.host(), host.options()) as c:
        assert c.run(["true"]).ok
    host.known_hosts.write_text(f"[127.0.0.?]:*,![127.0.0.1]:{host.port} {kind} {blob}\n")
    with pytest.raises(ConnectError, match="unknown host key"):
        open_connection(host.host(), host.options())


def test_fingerprint_matches_ssh_keygen(sshd_host: SshdHost) -> None:
    import paramiko

    from provisioner.connection.hostkeys import fingerprint as ours

    key = paramiko.PKey.from_path(str(sshd_host.host_key))
    assert ours(key) == fingerprint(sshd_host.host_key_pub)


# -- ProxyJump ----------------------------------------------------------------------------------

def test_proxyjump_from_ssh_config(sshd_hosts: Callable[..., list[SshdHost]]) -> None:
    make = sshd_hosts
    bastion, target = make(2, names=["bastion", "gpu-behind"])
    make.fleet.write_ssh_config({"gpu-behind": "  ProxyJump bastion\n"})  # type: ignore[attr-defined]
    mark = bastion.log_size()
    with open_connection(target.host(), target.options()) as c:
        assert c.run(["echo", "through"]).stdout == "through\n"
        assert c.stats.connects == 2  # bastion + target
    assert bastion.wait_counts(1, 0, since=mark) == (1, 0)  # reached through; it ran nothing


def test_proxyjump_from_the_inventory_with_the_targets_key(
        sshd_hosts: Callable[..., list[SshdHost]], tmp_path: Path) -> None:
    bastion, target = sshd_hosts(2)
    empty = tmp_path / "empty_config"
    empty.write_text("")
    opts = target.options(ssh_config=str(empty), allow_agent=False, look_for_keys=False)
    jump = f"{bastion.user}@127.0.0.1:{bastion.port}"
    with open_connection(target.host(via_config=False, jump=jump), opts) as c:
        assert c.run(["true"]).ok and c.stats.connects == 2
    assert bastion.wait_counts(1, 0)[0] == 1


def test_unknown_bastion_key_is_refused_too(sshd_hosts: Callable[..., list[SshdHost]]) -> None:
    make = sshd_hosts
    bastion, = make(1, names=["bastion"], trusted=False)
    target, = make(1, names=["gpu-behind"])
    make.fleet.write_ssh_config({"gpu-behind": "  ProxyJump bastion\n"})  # type: ignore[attr-defined]
    with pytest.raises(ConnectError, match=rf"^bastion \(\[127.0.0.1\]:{bastion.port}\): unknown host key"):
        open_connection(target.host(), target.options())
    assert target.count_connections() == 0


def test_connect_options_reject_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="host_key_policy"):
        ConnectOptions(host_key_policy="yolo")  # type: ignore[arg-type]
