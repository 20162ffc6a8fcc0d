"""Reach an SSH host: TCP or a ProxyJump chain, handshake, host key check, authentication.

Every hop gets the same treatment as the target: its own ssh_config entry, its host key checked
against known_hosts before any credential is offered, a one-line ConnectError on any failure.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket

import paramiko

from provisioner.connection import hostkeys
from provisioner.connection.options import ConnectOptions, SshTarget, resolve
from provisioner.errors import ConnectError

WINDOW = 64 * 1024 * 1024       # big channel window: a 12 GB download never waits on adjusts
PACKET = 32 * 1024              # OpenSSH's channel packet size; larger is split anyway
# AES-GCM first: the cipher paramiko runs fastest (no separate MAC pass over every packet).
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
TRANSPORT_ERRORS = (paramiko.SSHException, EOFError, OSError)

# paramiko logs a traceback for every failed handshake; with no handler configured Python would
# print it to stderr under our one-line ConnectError. `-v` logging still receives it.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class Reacher:
    """Opens transports for one host; `opened` lists them all, gateways first, for close()."""

    def __init__(self, config: paramiko.SSHConfig, options: ConnectOptions) -> None:
        self.config = config
        self.options = options
        self.opened: list[paramiko.Transport] = []
        self.identity: str | None = None  # how the last host reached took us: a key file, "agent", None

    def close(self) -> None:
        for transport in reversed(self.opened):
            transport.close()
        self.opened.clear()

    def reach(self, target: SshTarget, depth: int = 0) -> paramiko.Transport:
        return self._handshake(target, self._socket_to(target, depth))

    def _socket_to(self, target: SshTarget, depth: int) -> socket.socket | paramiko.Channel:
        if target.jump is None:
            return tcp(target, self.options.connect_timeout)
        if depth > 8:
            raise ConnectError(f"{target.name}: ProxyJump chain deeper than 8 hops (a loop in ssh config?)")
        hops = target.jump.split(",")
        gateway_target = resolve(hops[-1].strip(), self.config)
        if len(hops) > 1:  # `a,b`: b is reached through a, as `ssh -J a,b` does
            gateway_target = dataclasses.replace(gateway_target, jump=",".join(hops[:-1]))
        # A bastion usually takes the fleet's key: after its own keys, try the target's.
        extra = tuple(k for k in target.key_files if k not in gateway_target.key_files)
        gateway_target = dataclasses.replace(gateway_target,
                                             key_files=gateway_target.key_files + extra)
        gateway = self.reach(gateway_target, depth + 1)
        try:
            return gateway.open_channel("direct-tcpip", (target.hostname, target.port),
                                        ("127.0.0.1", 0), timeout=self.options.connect_timeout)
        except TRANSPORT_ERRORS as err:
            raise ConnectError(f"{target.name}: jump host {gateway_target.name} cannot reach "
                               f"{target.hostname}:{target.port}: {reason(err)}") from None

    def _handshake(self, target: SshTarget, sock: socket.socket | paramiko.Channel) -> paramiko.Transport:
        files = self.options.known_hosts + target.known_hosts
        transport = paramiko.Transport(sock, default_window_size=WINDOW, default_max_packet_size=PACKET)
        transport.banner_timeout = self.options.connect_timeout
        security = transport.get_security_options()
        security.ciphers = CIPHERS + tuple(c for c in security.ciphers if c not in CIPHERS)
        known = hostkeys.preferred_types(hostkeys.load(files), target)
        if "ssh-rsa" in known:
            known = ["rsa-sha2-512", "rsa-sha2-256", *known]
        security.key_types = tuple(k for k in known if k in security.key_types) + tuple(
            k for k in security.key_types if k not in known)
        try:
            try:
                transport.start_client(timeout=self.options.connect_timeout)
            except TRANSPORT_ERRORS as err:
                raise ConnectError(f"{target.name}: SSH handshake with {target.hostname}:"
                                   f"{target.port} failed: {reason(err)}") from None
            if not transport.initial_kex_done:  # start_client returns quietly at its timeout
                raise ConnectError(f"{target.name}: SSH handshake with {target.hostname}:"
                                   f"{target.port} failed: no answer within "
                                   f"{self.options.connect_timeout:g}s")
            hostkeys.check(target, transport.get_remote_server_key(), files,
                           self.options.host_key_policy)
            self._authenticate(transport, target)
        except BaseException:
            transport.close()
            raise
        self.opened.append(transport)
        return transport

    def _authenticate(self, transport: paramiko.Transport, target: SshTarget) -> None:
        """Keys from the inventory and ssh_config, then the agent, default keys, a password."""
        tried: list[str] = []
        paths = list(target.key_files)
        if self.options.look_for_keys and not target.identities_only:
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
                tried.append(f"{path} ({reason(err)})")
        if self.options.allow_agent and not target.identities_only:
            try:
                keys += [(f"agent {hostkeys.fingerprint(k)}", k) for k in paramiko.Agent().get_keys()]
            except paramiko.SSHException:
                pass  # no usable agent: the other keys still count
        for label, key in keys:
            try:
                transport.auth_publickey(target.user, key)
                self.identity = "agent" if label.startswith("agent ") else label
                return
            except paramiko.AuthenticationException:
                tried.append(label)
        if self.options.password is not None:
            try:
                transport.auth_password(target.user, self.options.password)
                self.identity = None
                return
            except paramiko.AuthenticationException:
                tried.append("password")
        raise ConnectError(f"{target.name}: authentication as {target.user}@{target.hostname}:"
                           f"{target.port} failed (tried: {', '.join(tried) or 'no key found'}); "
                           f"set IdentityFile or ansible_ssh_private_key_file, or load a key into ssh-agent")


def tcp(target: SshTarget, timeout: float) -> socket.socket:
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
    except (UnicodeError, OverflowError) as err:  # `..` or `\u202e…` as a name, a port past 65535
        raise ConnectError(f"{target.name}: cannot connect to {target.hostname!r} port {target.port}: "
                           f"{reason(err)} (check HostName / ansible_host / Port)") from None
    except OSError as err:
        raise ConnectError(f"{target.name}: cannot connect to {where}: {reason(err)}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def reason(err: BaseException) -> str:
    """One line for any socket/paramiko error (some have no message at all)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
