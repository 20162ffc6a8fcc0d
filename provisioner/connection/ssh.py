"""The SSH transport: one paramiko Transport per host, shared by execs, SFTP and tunnels.

paramiko directly rather than Fabric's Connection: Fabric forces AutoAddPolicy and never reads
known_hosts, and paramiko's SSHClient hides the window size big uploads need, so reach.py drives
a Transport itself (ssh_config via options.py, host keys via hostkeys.py).
"""

from __future__ import annotations

import io
import os
import posixpath
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, BinaryIO

import paramiko
from paramiko.common import MSG_CHANNEL_REQUEST

from provisioner.connection import scp, supervised
from provisioner.connection.channel import Upstream, send_all, send_eof
from provisioner.connection.base import (LOGIN_LINE, Frame, ProgressCallback, Result, Stats, copy_stream,
                                         put_through_stdin)
from provisioner.connection.forward import forward
from provisioner.connection.options import ConnectOptions, load_ssh_config, resolve
from provisioner.connection.reach import PACKET, TRANSPORT_ERRORS, WINDOW, Reacher, reason
from provisioner.connection.base import Connection, Heartbeat, Held
from provisioner.errors import CommandError, ConnectError
from provisioner.config.inventory import Host

CHUNK = 1024 * 1024             # read size of put_file and of a command's output
# paramiko's 32768-byte SFTP writes plus their header overflow one 32 KB SSH packet, so every
# request went out as two packets; a request that fits one packet is ~20% faster on loopback.
SFTP_WRITE = PACKET - 128


class SshConnection:
    """A connected SSH host. Opening it connects (and checks the host key) at once."""

    become: Connection | None = None   # the host's become user (connection/become.py), when set
    owner: Connection | None = None    # the root's owner through sudo, when facts/gather.py chose it

    def __init__(self, host: Host, options: ConnectOptions) -> None:
        self.name = host.name
        self.stats = Stats()
        self._options = options
        self._config = load_ssh_config(options)
        self._target = resolve(host.name, self._config, host)
        self._reacher = Reacher(self._config, options)
        self._sftp: paramiko.SFTPClient | None = None
        self._no_sftp = False
        self._lock = threading.Lock()
        self._aborted: str | None = None
        self._children: set[subprocess.Popen[bytes]] = set()   # a running scp: abort kills it
        self.heartbeat = Heartbeat(options.heartbeat_s)
        try:
            self._transport = self._reacher.reach(self._target)
        except BaseException:
            self._reacher.close()  # jump hosts already reached
            raise
        self.stats.connects = len(self._reacher.opened)  # the target and each jump host
        _keep_exit_signals(self._transport)
        _keep_disconnect_reason(self._transport)
        self._watchdog = Watchdog(self._transport, self.heartbeat, lambda silent: self.abort(
            f"{self.name}: no answer to the heartbeat for {silent:.0f}s: the host stopped responding "
            "(frozen, or the network between is down); its commands stop by themselves"))

    @property
    def machine(self) -> SshConnection:
        return self

    # -- commands ---------------------------------------------------------------------------

    def launch(self, argv: Sequence[str]) -> tuple[_ChannelPipe, tuple[Frame, ...]]:
        """A session running the supervisor (the login line: the same for every command)."""
        self.stats.execs += 1
        self.stats.history.append(tuple(argv))
        self._check()
        try:
            chan = self._transport.open_session(timeout=self._options.connect_timeout)
            chan.exec_command(LOGIN_LINE)
        except TRANSPORT_ERRORS as err:
            raise ConnectError(self.lost() or f"{self.name}: connection lost: {self._ended(err)}") from None
        return _ChannelPipe(chan), ()

    def _ended(self, err: BaseException) -> str:
        """Why the transport is gone, not paramiko's "SSH session not active": the error its reader
        thread kept (the host closed the connection, a reset, a protocol error)."""
        if self._transport.is_active():
            return reason(err)
        said = getattr(self._transport, "disconnect_reason", None)
        if said is not None:
            return f"the host ended the connection: {said}"
        kept = self._transport.get_exception()
        if isinstance(kept, EOFError):
            return "the host closed the connection"
        return reason(kept) if kept is not None else reason(err)

    def run(self, argv: Sequence[str], **options: Any) -> Result:
        return supervised.run(self, argv, **options)

    def hold(self, argv: Sequence[str]) -> AbstractContextManager[Held]:
        return supervised.hold(self, argv)

    def abort(self, reason: str) -> None:
        """Close the connection under everything running on it: sshd ends each supervisor's stdin,
        and the supervisors stop their commands; every later call raises with `reason`."""
        with self._lock:
            self._aborted = self._aborted or reason
        for child in list(self._children):
            scp.stop(child)
        self._watchdog.stop()
        self._reacher.close()

    def lost(self) -> str | None:
        """Why this connection is gone (aborted, or its peer stopped answering), or None."""
        return self._aborted

    def _check(self) -> None:
        if self._aborted:
            raise ConnectError(self._aborted)

    # -- files ------------------------------------------------------------------------------

    def _sftp_client(self) -> paramiko.SFTPClient | None:
        """The connection's SFTP session; None where there is none to be had: sshd starts an
        `sftp-server` subsystem through the user's login shell, and what its rc file prints
        garbles the stream (OpenSSH's FAQ); files then go through a command's stdin instead."""
        with self._lock:
            if self._sftp is None and not self._no_sftp:
                try:
                    chan = self._transport.open_session(window_size=WINDOW, max_packet_size=PACKET,
                                                        timeout=self._options.connect_timeout)
                    chan.invoke_subsystem("sftp")
                except TRANSPORT_ERRORS as err:
                    raise ConnectError(self.lost() or f"{self.name}: cannot open SFTP: {reason(err)}") from None
                try:
                    self._sftp = paramiko.SFTPClient(chan)
                except (paramiko.SFTPError, *TRANSPORT_ERRORS):
                    _close(chan)
                    self._check()
                    self._no_sftp = True
            return self._sftp

    def put(self, content: bytes, dest: str, *, mode: int = 0o644) -> None:
        self._upload(io.BytesIO(content), len(content), dest, mode, None)

    def put_file(self, local_path: str, dest: str, *, mode: int = 0o644,
                 progress: ProgressCallback | None = None) -> None:
        with open(local_path, "rb") as src:
            self._upload(src, os.fstat(src.fileno()).st_size, dest, mode, progress)

    def _upload(self, src: BinaryIO, size: int, dest: str, mode: int,
                progress: ProgressCallback | None) -> None:
        """Write to a hidden temporary name beside `dest`, then rename over it (atomic)."""
        self._check()
        sftp = self._sftp_client()
        if sftp is None:
            put_through_stdin(self, src, size, dest, mode, progress)
            return
        parent, base = posixpath.split(dest)
        tmp = posixpath.join(parent, f".{base}.{secrets.token_hex(4)}.provision-tmp")
        try:
            _makedirs(sftp, parent)
            if not self._system_copy(src, size, tmp, progress):
                with sftp.open(tmp, "wb") as f:
                    f.set_pipelined(True)  # don't wait for each write's ack: keeps the pipe full
                    f.MAX_REQUEST_SIZE = SFTP_WRITE
                    copy_stream(src, f.write, size, self.stats, progress, CHUNK)
            sftp.chmod(tmp, mode)
            sftp.posix_rename(tmp, dest)
        except OSError as err:  # paramiko maps SFTP status codes to IOError
            if self._aborted:
                raise ConnectError(self._aborted) from None
            _quiet_remove(sftp, tmp)
            raise CommandError(self.name, Result(("put", dest), 1, "", f"{dest}: {reason(err)}"),
                               f"put {dest}") from None
        except (paramiko.SSHException, EOFError) as err:
            raise ConnectError(self.lost() or f"{self.name}: connection lost writing {dest}: {reason(err)}") from None
        if progress and size == 0:
            progress(0, 0)

    def _system_copy(self, src: BinaryIO, size: int, tmp: str, progress: ProgressCallback | None) -> bool:
        """A large file goes through the system's scp (scp.py says why and how it stays as strict);
        False: not done that way (small, not a plain file, no scp, or scp failed: SFTP then)."""
        name = getattr(src, "name", None)
        identity = self._reacher.identity
        if size < scp.SYSTEM_COPY_MIN or not isinstance(name, str) or not scp.usable(self._target, identity):
            return False
        assert identity is not None and self._sftp is not None
        sftp = self._sftp

        def remote_size() -> int | None:
            try:
                return sftp.stat(tmp).st_size
            except (OSError, *TRANSPORT_ERRORS):
                return None

        failed = scp.push(self._target, identity, self._transport.get_remote_server_key(),
                          self._options.connect_timeout, name, tmp, size, remote_size, progress,
                          self._children)
        if failed is None:
            self.stats.bytes_put += size
            return True
        self._check()
        self.stats.fallbacks.append(f"scp of {posixpath.basename(name)} failed ({failed}): "
                                    "copied over SFTP instead")
        _quiet_remove(sftp, tmp)
        return False

    # -- tunnels and teardown ---------------------------------------------------------------

    def tunnel(self, remote_port: int, remote_host: str = "127.0.0.1") -> AbstractContextManager[int]:
        def open_upstream(client: tuple[str, int]) -> Upstream:
            return Upstream(self._transport.open_channel("direct-tcpip", (remote_host, remote_port), client,
                                                         timeout=self._options.connect_timeout))
        return forward(open_upstream)

    def close(self) -> None:
        self._watchdog.stop()
        if self._sftp is not None:
            try:
                self._sftp.close()
            except TRANSPORT_ERRORS:  # the connection is already gone: nothing left to close
                pass
            self._sftp = None
        self._reacher.close()

    def __enter__(self) -> SshConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close(chan: paramiko.Channel) -> None:
    """Close a channel; on a transport that is going away, paramiko raises EOFError from close()."""
    try:
        chan.close()
    except TRANSPORT_ERRORS:
        pass


class _ChannelPipe:
    """A session running the supervisor, as supervised.py drives it."""

    def __init__(self, chan: paramiko.Channel) -> None:
        self.chan = chan

    def send(self, data: bytes) -> None:
        try:
            send_all(self.chan, data)
        except TRANSPORT_ERRORS as err:
            raise BrokenPipeError(reason(err)) from None

    def close_stdin(self) -> None:
        try:
            send_eof(self.chan)
        except TRANSPORT_ERRORS:
            pass

    def read(self, stream: int) -> bytes:
        try:
            return self.chan.recv(CHUNK) if stream == 1 else self.chan.recv_stderr(CHUNK)
        except TRANSPORT_ERRORS:
            return b""

    def wait(self, timeout: float | None) -> bool:
        return self.chan.status_event.wait(timeout)

    def status(self) -> tuple[int | None, str | None]:
        signal = getattr(self.chan, "exit_signal", None)
        code = self.chan.exit_status
        return (code if code >= 0 and not signal else None), signal

    def close(self) -> None:
        _close(self.chan)


def _keep_exit_signals(transport: paramiko.Transport) -> None:
    """paramiko drops the `exit-signal` request sshd sends for a command killed by a signal
    (channel.py `_handle_request`), leaving exit_status -1; keep its name on the channel."""
    table = getattr(transport, "_channel_handler_table", None)
    if not isinstance(table, dict) or MSG_CHANNEL_REQUEST not in table:
        return                          # another paramiko: signals show as "connection lost"
    handle = table[MSG_CHANNEL_REQUEST]

    def handle_request(chan: paramiko.Channel, m: paramiko.Message) -> None:
        if m.get_text() == "exit-signal":
            m.get_boolean()             # want_reply: never, for exit-signal (RFC 4254 6.10)
            name = m.get_text()
            chan.exit_signal = name if name.startswith("SIG") else "SIG" + name
            return
        m.rewind()
        m.get_int()                     # the channel number, as the transport read it
        handle(chan, m)

    transport._channel_handler_table = {**table, MSG_CHANNEL_REQUEST: handle_request}


def _keep_disconnect_reason(transport: paramiko.Transport) -> None:
    """paramiko only logs why the server ended the connection (its DISCONNECT message) and then
    says "SSH session not active" to every caller; keep the reason on the transport."""
    parse = getattr(transport, "_parse_disconnect", None)
    if parse is None:
        return                          # another paramiko: the loss is said without its reason

    def parse_and_keep(m: paramiko.Message) -> None:
        m.get_int()                     # the reason code; its text says more
        transport.disconnect_reason = m.get_text()[:300]  # type: ignore[attr-defined]
        m.rewind()
        parse(m)

    transport._parse_disconnect = parse_and_keep  # type: ignore[method-assign]


class Watchdog:
    """An application-level heartbeat: `keepalive@openssh.com` global requests that sshd must
    answer. paramiko's own keepalive asks for no reply, so a peer that froze with its TCP
    connection open (a stopped sshd, a partition) would go unnoticed until TCP gives up, minutes
    later. Here, no answer within `heartbeat.dead_after` calls `dead(seconds)` once."""

    def __init__(self, transport: paramiko.Transport, heartbeat: Heartbeat,
                 dead: Callable[[float], None]) -> None:
        self.transport, self.heartbeat, self.dead = transport, heartbeat, dead
        self.answered = time.monotonic()
        self._stop = threading.Event()
        self._asking = threading.Event()
        threading.Thread(target=self._watch, name="heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _ask(self) -> None:
        """One request, in its own thread: paramiko waits for the reply without a time limit."""
        try:
            self.transport.global_request("keepalive@openssh.com", wait=True)  # sshd: "failure"
            if self.transport.is_active():  # an answer, not the transport's end
                self.answered = time.monotonic()
        except TRANSPORT_ERRORS:
            pass
        finally:
            self._asking.clear()

    def _watch(self) -> None:
        while not self._stop.wait(self.heartbeat.every):
            if not self.transport.is_active():
                return
            silent = time.monotonic() - self.answered
            if silent >= self.heartbeat.dead_after:
                self.dead(silent)
                return
            if not self._asking.is_set():
                self._asking.set()
                threading.Thread(target=self._ask, name="heartbeat-ask", daemon=True).start()


def _makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """`mkdir -p` over SFTP."""
    if path in ("", "/", "."):
        return
    try:
        sftp.stat(path)
        return
    except FileNotFoundError:
        pass
    _makedirs(sftp, posixpath.dirname(path.rstrip("/")))
    try:
        sftp.mkdir(path)
    except OSError:
        sftp.stat(path)  # created meanwhile by a parallel put: fine; else the stat error stands


def _quiet_remove(sftp: paramiko.SFTPClient, path: str) -> None:
    try:
        sftp.remove(path)
    except (OSError, paramiko.SSHException, EOFError):
        pass
