"""Host key checking as OpenSSH does it: known_hosts files, strict or accept-new, never silent.

Fabric never loads known_hosts and accepts any key (its issues #1804, #2071), so the SSH transport
checks the server's key here, before authenticating, on every hop of a ProxyJump chain.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Mapping, Sequence

import paramiko

from provisioner.connection.options import HostKeyPolicy, SshTarget
from provisioner.errors import ConnectError

_append_lock = threading.Lock()  # forks connect in parallel; accept-new lines must not interleave


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's `SHA256:<base64 without padding>` form, as `ssh-keygen -l` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def load(files: Sequence[str]) -> paramiko.HostKeys:
    """Every known_hosts file that exists, merged (hashed `|1|` and `[host]:port` entries included)."""
    keys = paramiko.HostKeys()
    for name in files:
        path = os.path.expanduser(name)
        if os.path.exists(path):
            try:
                keys.load(path)
            except (OSError, paramiko.SSHException) as err:
                raise ConnectError(f"known_hosts {name}: cannot read: {err}") from None
    return keys


def preferred_types(keys: paramiko.HostKeys, target: SshTarget) -> list[str]:
    """Key types already known for the host, to negotiate first (as OpenSSH orders them)."""
    entry = keys.lookup(target.known_hosts_name)
    return list(entry.keys()) if entry else []


def check(target: SshTarget, offered: paramiko.PKey, files: Sequence[str],
          policy: HostKeyPolicy) -> None:
    """Accept the server key `offered`, record it (accept-new), or raise a one-line ConnectError."""
    keys = load(files)
    first = files[0] if files else "~/.ssh/known_hosts"  # where new keys go
    name = target.known_hosts_name
    known: Mapping[str, paramiko.PKey] = keys.lookup(name) or {}
    kind = offered.get_name()
    if kind in known:
        if known[kind] == offered:
            return
        raise ConnectError(
            f"{target.name} ({name}): HOST KEY CHANGED: known {kind} {fingerprint(known[kind])}, "
            f"server now offers {fingerprint(offered)}; possible man-in-the-middle, refused. If the "
            f"host was reinstalled, verify the new key and run `ssh-keygen -R '{name}'`")
    if policy == "accept-new":
        _append(first, name, offered)
        return
    scan = f"ssh-keyscan -p {target.port} {target.hostname}" if target.port != 22 \
        else f"ssh-keyscan {target.hostname}"
    raise ConnectError(
        f"{target.name} ({name}): unknown host key {kind} {fingerprint(offered)}; verify it, then "
        f"`{scan} >> {first}` or pass --accept-new-host-keys to trust it on first use")


def _append(file: str, name: str, key: paramiko.PKey) -> None:
    path = os.path.expanduser(file)
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    line = f"{name} {key.get_name()} {key.get_base64()}\n"
    with _append_lock, open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():  # a file without a final newline must not glue two entries together
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
