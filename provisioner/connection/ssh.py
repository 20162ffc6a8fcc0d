"""The SSH transport: one paramiko Transport per host, shared by execs, SFTP and tunnels.

paramiko directly rather than Fabric's Connection: Fabric forces AutoAddPolicy and never reads
known_hosts, and neither exposes the window size that big uploads need. ssh_config is read with
paramiko's SSHConfig (Host aliases, HostName, User, Port, IdentityFile, ProxyJump, HostKeyAlias).
"""

from __future__ import annotations

import dataclasses
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

from provisioner.connection import hostkeys
from provisioner.connection.base import ProgressCallback, Result, Stats, shell_line
from provisioner.connection.forward import forward
from provisioner.connection.options import ConnectOptions, SshTarget, load_ssh_config, resolve
from provisioner.errors import CommandError, ConnectError
from provisioner.inventory import Host

WINDOW = 64 * 1024 * 1024       # big channel window: a 12 GB download never waits on adjusts
PACKET = 32 * 1024              # OpenSSH's channel packet size; larger is split anyway
CHUNK = 1024 * 1024             # read size of put_file; SFTP requests are cut from it
# paramiko's 32768-byte SFTP writes plus their header overflow one 32 KB SSH packet, so every
# request went out as two packets; a request that fits one packet is ~20% faster on loopback.
SFTP_WRITE = PACKET - 128
# AES-GCM first: the cipher paramiko runs fastest (no separate MAC pass over every packet).
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
TRANSPORT_ERRORS = (paramiko.SSHException, EOFError, OSError)


class SshConnection:
    """A connected SSH host. Opening it connects (and checks the host key) at once."""

    def __init__(self, host: Host, options: ConnectOptions) -> None:
        self.name = host.name
        self.stats = Stats()
        self._options = options
        self._config = load_ssh_config(options)
        self._target = resolve(host.name, self._config, host)
        self._gateways: list[paramiko.Transport] = []
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()
        try:
            self._transport = self._reach(self._target, depth=0)
        except BaseException:
            self.close()
            raise

    # -- connecting -------------------------------------------------------------------------

    def _reach(self, target: SshTarget, depth: int) -> paramiko.Transport:
        return self._handshake(target, self._socket_to(target, depth))

    def _socket_to(self, target: SshTarget, depth: int) -> socket.socket | paramiko.Channel:
        if target.jump is None:
            return _tcp(target, self._options.connect_timeout)
        if depth > 8:
            raise ConnectError(f"{self.name}: ProxyJump chain deeper than 8 hops (a loop in ssh config?)")
        hops = target.jump.split(",")
        gateway_target = resolve(hops[-1].strip(), self._config)
        if len(hops) > 1:  # `a,b`: b is reached through a, as `ssh -J a,b` does
            gateway_target = dataclasses.replace(gateway_target, jump=",".join(hops[:-1]))
        # A bastion usually takes the fleet's key: after its own keys, try the target's.
        extra = tuple(k for k in target.key_files if k not in gateway_target.key_files)
        gateway_target = dataclasses.replace(gateway_target,
                                             key_files=gateway_target.key_files + extra)
        gateway = self._reach(gateway_target, depth + 1)
        self._gateways.append(gateway)
        try:
            return gateway.open_channel("direct-tcpip", (target.hostname, target.port),
                                        ("127.0.0.1", 0), timeout=self._options.connect_timeout)
        except TRANSPORT_ERRORS as err:
            raise ConnectError(f"{target.name}: jump host {gateway_target.name} cannot reach "
                               f"{target.hostname}:{target.port}: {_reason(err)}") from None

    def _handshake(self, target: SshTarget, sock: socket.socket | paramiko.Channel) -> paramiko.Transport:
        files = self._options.known_hosts + target.known_hosts
        transport = paramiko.Transport(sock, default_window_size=WINDOW, default_max_packet_size=PACKET)
        transport.banner_timeout = self._options.connect_timeout
        security = transport.get_security_options()
        security.ciphers = CIPHERS + tuple(c for c in security.ciphers if c not in CIPHERS)
        known = hostkeys.preferred_types(hostkeys.load(files), target)
        if "ssh-rsa" in known:
            known = ["rsa-sha2-512", "rsa-sha2-256", *known]
        security.key_types = tuple(k for k in known if k in security.key_types) + tuple(
            k for k in security.key_types if k not in known)
        try:
            try:
                transport.start_client(timeout=self._options.connect_timeout)
            except TRANSPORT_ERRORS as err:
                raise ConnectError(f"{target.name}: SSH handshake with {target.hostname}:"
                                   f"{target.port} failed: {_reason(err)}") from None
            if not transport.initial_kex_done:  # start_client returns quietly at its timeout
                raise ConnectError(f"{target.name}: SSH handshake with {target.hostname}:"
                                   f"{target.port} failed: no answer within "
                                   f"{self._options.connect_timeout:g}s")
            hostkeys.check(target, transport.get_remote_server_key(), files,
                           self._options.host_key_policy)
            self._authenticate(transport, target)
        except BaseException:
            transport.close()
            raise
        if self._options.keepalive:
            transport.set_keepalive(self._options.keepalive)
        self.stats.connects += 1
        return transport

    def _authenticate(self, transport: paramiko.Transport, target: SshTarget) -> None:
        """Keys from the inventory and ssh_config, then the agent, default keys, a password."""
        tried: list[str] = []
        paths = list(target.key_files)
        if self._options.look_for_keys and not target.identities_only:
            paths += [os.path.expanduser(p) for p in DEFAULT_KEYS if os.path.expanduser(p) not in paths]
        keys: list[tuple[str, paramiko.PKey]] = []
        for path in paths:
            if not os.path.exists(path):
                if path in target.key_files:
                    tried.append(f"{path} (missing)")
                continue
            try:
                keys.append((path, paramiko.PKey.from_path(path)))
            except paramiko.PasswordRequiredException:
                tried.append(f"{path} (encrypted; load it into ssh-agent)")
            except (paramiko.SSHException, OSError, ValueError) as err:
                tried.append(f"{path} ({_reason(err)})")
        if self._options.allow_agent and not target.identities_only:
            try:
                keys += [(f"agent {hostkeys.fingerprint(k)}", k) for k in paramiko.Agent().get_keys()]
            except paramiko.SSHException:
                pass  # no usable agent: the other keys still count
        for label, key in keys:
            try:
                transport.auth_publickey(target.user, key)
                return
            except paramiko.AuthenticationException:
                tried.append(label)
        if self._options.password is not None:
            try:
                transport.auth_password(target.user, self._options.password)
                return
            except paramiko.AuthenticationException:
                tried.append("password")
        raise ConnectError(f"{target.name}: authentication as {target.user}@{target.hostname}:"
                           f"{target.port} failed (tried: {', '.join(tried) or 'no key found'}); "
                           f"set IdentityFile or ansible_ssh_private_key_file, or load a key into ssh-agent")

    # -- commands ---------------------------------------------------------------------------

    def _session(self, argv: tuple[str, ...]) -> paramiko.Channel:
        self.stats.execs += 1
        self.stats.history.append(argv)
        try:
            return self._transport.open_session(timeout=self._options.connect_timeout)
        except TRANSPORT_ERRORS as err:
            raise ConnectError(f"{self.name}: connection lost: {_reason(err)}") from None

    def run(self, argv: Sequence[str], *, stdin: bytes | None = None,
            env: Mapping[str, str] | None = None, timeout: float | None = None,
            check: bool = True, stdout_callback: Callable[[str], None] | None = None) -> Result:
        argv = tuple(argv)
        chan = self._session(argv)
        try:
            chan.exec_command(shell_line(argv, env))
            out, err, code = _collect(chan, stdin, timeout, stdout_callback)
        except TRANSPORT_ERRORS as error:
            raise ConnectError(f"{self.name}: connection lost running {argv[0]}: {_reason(error)}") from None
        finally:
            chan.close()
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
            chan.close()

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
                    raise ConnectError(f"{self.name}: cannot open SFTP: {_reason(err)}") from None
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
                done = 0
                while chunk := src.read(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    self.stats.bytes_put += len(chunk)
                    if progress:
                        progress(done, size)
                f.chmod(mode)
            sftp.posix_rename(tmp, dest)
        except OSError as err:  # paramiko maps SFTP status codes to IOError
            _quiet_remove(sftp, tmp)
            raise CommandError(self.name, Result(("put", dest), 1, "", f"{dest}: {_reason(err)}"),
                               f"put {dest}") from None
        except (paramiko.SSHException, EOFError) as err:
            raise ConnectError(f"{self.name}: connection lost writing {dest}: {_reason(err)}") from None
        if progress and size == 0:
            progress(0, 0)

    def get(self, path: str) -> bytes:
        sftp = self._sftp_client()
        try:
            with sftp.open(path, "rb") as f:
                f.prefetch()
                return f.read()
        except OSError as err:
            raise CommandError(self.name, Result(("get", path), 1, "", f"{path}: {_reason(err)}"),
                               f"get {path}") from None
        except (paramiko.SSHException, EOFError) as err:
            raise ConnectError(f"{self.name}: connection lost reading {path}: {_reason(err)}") from None

    # -- tunnels and teardown ---------------------------------------------------------------

    def tunnel(self, remote_port: int, remote_host: str = "127.0.0.1") -> AbstractContextManager[int]:
        def open_upstream(client: tuple[str, int]) -> paramiko.Channel:
            return self._transport.open_channel("direct-tcpip", (remote_host, remote_port), client,
                                                timeout=self._options.connect_timeout)
        return forward(open_upstream)

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        transport = getattr(self, "_transport", None)
        for t in [transport, *reversed(self._gateways)]:
            if t is not None:
                t.close()
        self._gateways.clear()

    def __enter__(self) -> SshConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tcp(target: SshTarget, timeout: float) -> socket.socket:
    where = f"{target.hostname}:{target.port}"
    try:
        sock = socket.create_connection((target.hostname, target.port), timeout=timeout)
    except socket.timeout:
        raise ConnectError(f"{target.name}: connecting to {where} timed out after {timeout:g}s "
                           f"(host down or port filtered?)") from None
    except ConnectionRefusedError:
        raise ConnectError(f"{target.name}: connection to {where} refused (is sshd running there, "
                           f"on that port?)") from None
    except socket.gaierror as err:
        raise ConnectError(f"{target.name}: cannot resolve {target.hostname}: {err.strerror} "
                           f"(check HostName / ansible_host)") from None
    except OSError as err:
        raise ConnectError(f"{target.name}: cannot connect to {where}: {_reason(err)}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


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
        chan.close()
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


def _reason(err: BaseException) -> str:
    """One line for any socket/paramiko error (some have no message at all)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
