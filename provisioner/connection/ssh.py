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
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import BinaryIO

import paramiko

from provisioner.connection.base import ProgressCallback, Result, Stats, copy_stream, shell_line
from provisioner.connection.forward import forward
from provisioner.connection.options import ConnectOptions, load_ssh_config, resolve
from provisioner.connection.reach import PACKET, TRANSPORT_ERRORS, WINDOW, Reacher, reason
from provisioner.errors import CommandError, ConnectError
from provisioner.config.inventory import Host

CHUNK = 1024 * 1024             # read size of put_file; SFTP requests are cut from it
# paramiko's 32768-byte SFTP writes plus their header overflow one 32 KB SSH packet, so every
# request went out as two packets; a request that fits one packet is ~20% faster on loopback.
SFTP_WRITE = PACKET - 128


class SshConnection:
    """A connected SSH host. Opening it connects (and checks the host key) at once."""

    def __init__(self, host: Host, options: ConnectOptions) -> None:
        self.name = host.name
        self.stats = Stats()
        self._options = options
        self._config = load_ssh_config(options)
        self._target = resolve(host.name, self._config, host)
        self._reacher = Reacher(self._config, options)
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()
        try:
            self._transport = self._reacher.reach(self._target)
        except BaseException:
            self._reacher.close()  # jump hosts already reached
            raise
        self.stats.connects = len(self._reacher.opened)  # the target and each jump host

    @property
    def machine(self) -> SshConnection:
        return self

    # -- commands ---------------------------------------------------------------------------

    def _session(self, argv: tuple[str, ...]) -> paramiko.Channel:
        self.stats.execs += 1
        self.stats.history.append(argv)
        try:
            return self._transport.open_session(timeout=self._options.connect_timeout)
        except TRANSPORT_ERRORS as err:
            raise ConnectError(f"{self.name}: connection lost: {reason(err)}") from None

    def run(self, argv: Sequence[str], *, stdin: bytes | None = None,
            env: Mapping[str, str] | None = None, timeout: float | None = None,
            check: bool = True, stdout_callback: Callable[[str], None] | None = None) -> Result:
        argv = tuple(argv)
        chan = self._session(argv)
        try:
            chan.exec_command(shell_line(argv, env))
            out, err, code = _collect(chan, stdin, timeout, stdout_callback)
        except TRANSPORT_ERRORS as error:
            raise ConnectError(f"{self.name}: connection lost running {argv[0]}: {reason(error)}") from None
        finally:
            _close(chan)
        result = Result(argv, code, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and not result.ok:
            raise CommandError(self.name, result)
        return result

    @contextmanager
    def _hold(self, argv: Sequence[str]) -> Iterator[Iterator[str]]:
        argv = tuple(argv)
        chan = self._session(argv)
        try:
            chan.exec_command(shell_line(argv))
            stdout = chan.makefile("rb")
            yield (line.decode(errors="replace").rstrip("\n") for line in stdout)
        finally:
            try:
                chan.shutdown_write()              # EOF on its stdin: the holder exits...
                chan.status_event.wait(5)          # ...and its lock is gone before we go on
            except TRANSPORT_ERRORS:
                pass
            _close(chan)

    def hold(self, argv: Sequence[str]) -> AbstractContextManager[Iterator[str]]:
        return self._hold(argv)

    # -- files ------------------------------------------------------------------------------

    def _sftp_client(self) -> paramiko.SFTPClient:
        with self._lock:
            if self._sftp is None:
                try:
                    self._sftp = paramiko.SFTPClient.from_transport(
                        self._transport, window_size=WINDOW, max_packet_size=PACKET)
                except TRANSPORT_ERRORS as err:
                    raise ConnectError(f"{self.name}: cannot open SFTP: {reason(err)}") from None
            assert self._sftp is not None
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
        sftp = self._sftp_client()
        parent, base = posixpath.split(dest)
        tmp = posixpath.join(parent, f".{base}.{secrets.token_hex(4)}.provision-tmp")
        try:
            _makedirs(sftp, parent)
            with sftp.open(tmp, "wb") as f:
                f.set_pipelined(True)  # don't wait for each write's ack: keeps the pipe full
                f.MAX_REQUEST_SIZE = SFTP_WRITE
                copy_stream(src, f.write, size, self.stats, progress, CHUNK)
                f.chmod(mode)
            sftp.posix_rename(tmp, dest)
        except OSError as err:  # paramiko maps SFTP status codes to IOError
            _quiet_remove(sftp, tmp)
            raise CommandError(self.name, Result(("put", dest), 1, "", f"{dest}: {reason(err)}"),
                               f"put {dest}") from None
        except (paramiko.SSHException, EOFError) as err:
            raise ConnectError(f"{self.name}: connection lost writing {dest}: {reason(err)}") from None
        if progress and size == 0:
            progress(0, 0)

    # -- tunnels and teardown ---------------------------------------------------------------

    def tunnel(self, remote_port: int, remote_host: str = "127.0.0.1") -> AbstractContextManager[int]:
        def open_upstream(client: tuple[str, int]) -> paramiko.Channel:
            return self._transport.open_channel("direct-tcpip", (remote_host, remote_port), client,
                                                timeout=self._options.connect_timeout)
        return forward(open_upstream)

    def close(self) -> None:
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


def _collect(chan: paramiko.Channel, stdin: bytes | None, timeout: float | None,
             on_line: Callable[[str], None] | None) -> tuple[bytes, bytes, int]:
    """Feed stdin and drain stdout/stderr at once (threads: neither side may block the other)."""
    chan.settimeout(timeout)
    out: list[bytes] = []
    err: list[bytes] = []
    pending = b""  # the unfinished last line, for on_line

    def lines(data: bytes, sink: Callable[[str], None]) -> None:
        nonlocal pending
        *complete, pending = (pending + data).split(b"\n")
        for line in complete:
            sink(line.decode(errors="replace"))

    def feed() -> None:
        try:
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
        except TRANSPORT_ERRORS:
            pass  # the command exited without reading all of its stdin, as `cmd < file` allows

    def drain_stderr() -> None:
        try:
            while data := chan.recv_stderr(65536):
                err.append(data)
        except TRANSPORT_ERRORS:
            pass  # timeout or channel gone: the main loop reports it

    helpers = [threading.Thread(target=drain_stderr, daemon=True)]
    if stdin:
        helpers.append(threading.Thread(target=feed, daemon=True))
    else:
        feed()
    for t in helpers:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    def left() -> float | None:
        return None if deadline is None else max(0.001, deadline - time.monotonic())

    try:
        while True:
            chan.settimeout(left())  # the whole command gets `timeout`, not each read
            data = chan.recv(65536)
            if not data:
                break
            out.append(data)
            if on_line:
                lines(data, on_line)
        if on_line and pending:
            on_line(pending.decode(errors="replace"))
        left_now = left()
        if not chan.status_event.wait(left_now):
            raise socket.timeout()
        for t in helpers:
            t.join(left_now)
    except socket.timeout:
        _close(chan)
        note = f"\ntimed out after {timeout:g}s\n".encode()
        return b"".join(out), b"".join(err) + note, 124
    code = chan.exit_status
    return b"".join(out), b"".join(err), 255 if code < 0 else code  # < 0: killed by a signal


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
