"""Host key checking as OpenSSH does it: known_hosts files, strict or accept-new, never silent.

Fabric never loads known_hosts and accepts any key (its issues #1804, #2071), so the SSH transport
checks the server's key here, before authenticating, on every hop of a ProxyJump chain.

known_hosts is read here rather than by paramiko's HostKeys, which cannot read marker lines: one
`@cert-authority` line made every host unreadable, and `@revoked` lines were skipped, so a
revoked key was not refused. Lines are read as sshd(8) describes them: an optional marker,
comma-separated host patterns (`*` and `?` wildcards, `!` negation, hashed `|1|salt|hash`), the key
type, the key; a line that cannot be read is skipped, as ssh does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import paramiko

from provisioner.connection.options import HostKeyPolicy, SshTarget
from provisioner.errors import ConnectError

_append_lock = threading.Lock()  # forks connect in parallel; accept-new lines must not interleave
REVOKED, AUTHORITY = "@revoked", "@cert-authority"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's `SHA256:<base64 without padding>` form, as `ssh-keygen -l` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class Entry:
    """One readable known_hosts line."""

    marker: str                      # "", REVOKED or AUTHORITY
    patterns: tuple[str, ...]
    key: paramiko.PKey
    where: str                       # file:line, for messages

    def matches(self, name: str) -> bool:
        """Does this line speak of host `name`? (Any pattern matches and no negated one does.)"""
        hit = False
        for pattern in self.patterns:
            negated = pattern.startswith("!")
            if _match(pattern[1:] if negated else pattern, name):
                if negated:
                    return False
                hit = True
        return hit


def _match(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):  # hashed: HMAC-SHA1 of the name, keyed by the salt
        try:
            _, _, salt, digest = pattern.split("|")
            mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
            return hmac.compare_digest(mac, base64.b64decode(digest))
        except (ValueError, binascii.Error):
            return False
    return _glob(pattern).fullmatch(name.lower()) is not None


@lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    """ssh's wildcards only (`*`, `?`): `[host]:port` is literal text, not a character class."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower()))


def _entry(line: str, where: str) -> Entry | None:
    fields = line.split()
    marker = fields.pop(0) if fields and fields[0].startswith("@") else ""
    if marker not in ("", REVOKED, AUTHORITY) or len(fields) < 3:
        return None
    patterns, kind, blob = fields[:3]
    try:
        key = paramiko.PKey.from_type_string(kind, base64.b64decode(blob, validate=True))
    except Exception:  # noqa: BLE001 - unknown type, bad base64, bad key data: ssh skips the line too
        return None
    return Entry(marker, tuple(patterns.split(",")), key, where)


class KnownHosts:
    """The readable lines of some known_hosts files, in order."""

    def __init__(self, entries: Sequence[Entry] = ()) -> None:
        self.entries = tuple(entries)

    def keys(self, name: str) -> dict[str, list[paramiko.PKey]]:
        """Key type -> the plain keys known for host `name` (revoked and CA lines excluded)."""
        out: dict[str, list[paramiko.PKey]] = {}
        for entry in self.entries:
            if not entry.marker and entry.matches(name):
                out.setdefault(entry.key.get_name(), []).append(entry.key)
        return out

    def revoked(self, name: str, key: paramiko.PKey) -> Entry | None:
        return next((e for e in self.entries if e.marker == REVOKED and e.key == key and e.matches(name)), None)

    def authorities(self, name: str) -> list[Entry]:
        return [e for e in self.entries if e.marker == AUTHORITY and e.matches(name)]


def load(files: Sequence[str]) -> KnownHosts:
    """Every known_hosts file that exists, merged (hashed `|1|` and `[host]:port` entries included)."""
    entries: list[Entry] = []
    for name in files:
        path = os.path.expanduser(name)
        if not os.path.exists(path):
            continue
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
        except OSError as err:
            raise ConnectError(f"known_hosts {name}: cannot read: {err.strerror or err}") from None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                entry = _entry(line, f"{name}:{number}")
                if entry is not None:
                    entries.append(entry)
    return KnownHosts(entries)


def preferred_types(keys: KnownHosts, target: SshTarget) -> list[str]:
    """Key types already known for the host, to negotiate first (as OpenSSH orders them)."""
    return list(keys.keys(target.known_hosts_name))


def check(target: SshTarget, offered: paramiko.PKey, files: Sequence[str],
          policy: HostKeyPolicy) -> None:
    """Accept the server key `offered`, record it (accept-new), or raise a one-line ConnectError."""
    keys = load(files)
    first = files[0] if files else "~/.ssh/known_hosts"  # where new keys go
    name = target.known_hosts_name
    kind = offered.get_name()
    revoked = keys.revoked(name, offered)
    if revoked is not None:  # before anything else: no policy accepts a revoked key
        raise ConnectError(
            f"{target.name} ({name}): host key {kind} {fingerprint(offered)} is REVOKED "
            f"({revoked.where}); refused. The host needs a new key, verified before it is trusted")
    known = keys.keys(name)
    if kind in known:
        if any(k == offered for k in known[kind]):
            return
        raise ConnectError(
            f"{target.name} ({name}): HOST KEY CHANGED: known {kind} {fingerprint(known[kind][0])}, "
            f"server now offers {fingerprint(offered)}; possible man-in-the-middle, refused. If the "
            f"host was reinstalled, verify the new key and run `ssh-keygen -R '{name}'`")
    if policy == "accept-new":
        _append(first, name, offered)
        return
    scan = f"ssh-keyscan -p {target.port} {target.hostname}" if target.port != 22 \
        else f"ssh-keyscan {target.hostname}"
    authorities = keys.authorities(name)
    only_ca = (f"; only a certificate authority vouches for it ({authorities[0].where}, @cert-authority), "
               "and provision checks plain host keys, not host certificates") if authorities else ""
    raise ConnectError(
        f"{target.name} ({name}): unknown host key {kind} {fingerprint(offered)}{only_ca}; verify it, "
        f"then `{scan} >> {first}` or pass --accept-new-host-keys to trust it on first use")


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
