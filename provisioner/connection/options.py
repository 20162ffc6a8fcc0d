"""How to reach hosts (ConnectOptions) and where one SSH host really is (ssh_config + inventory)."""

from __future__ import annotations

import getpass
import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from provisioner.errors import ConnectError
from provisioner.config.inventory import Host

if TYPE_CHECKING:
    import paramiko

HostKeyPolicy = Literal["strict", "accept-new"]


@dataclass(frozen=True)
class ConnectOptions:
    """Fleet-wide connection settings; per-host facts come from the inventory and ssh_config."""

    known_hosts: tuple[str, ...] = ("~/.ssh/known_hosts",)  # new keys go to the first one
    host_key_policy: HostKeyPolicy = "strict"               # accept-new = OpenSSH's TOFU
    ssh_config: str | None = None                           # None: ~/.ssh/config if it exists
    connect_timeout: float = 10
    heartbeat_s: float = 5.0                                # silent for 3 of them: gone (both ways)
    password: str | None = None                             # tried after keys, if given
    allow_agent: bool = True                                # keys from $SSH_AUTH_SOCK
    look_for_keys: bool = True                              # ~/.ssh/id_ed25519, id_ecdsa, id_rsa

    def __post_init__(self) -> None:
        if self.host_key_policy not in ("strict", "accept-new"):
            raise ValueError(f"host_key_policy must be 'strict' or 'accept-new', "
                             f"not {self.host_key_policy!r}")


@dataclass(frozen=True)
class SshTarget:
    """One resolved SSH endpoint: what `ssh NAME` would connect to."""

    name: str                        # inventory name or ssh_config alias, for messages
    hostname: str
    port: int
    user: str
    key_files: tuple[str, ...]
    jump: str | None                 # ProxyJump spec ("a,b" or "user@host:port"), None: direct
    host_key_alias: str | None = None
    known_hosts: tuple[str, ...] = ()  # UserKnownHostsFile from ssh_config, added to the options'
    identities_only: bool = False

    @property
    def known_hosts_name(self) -> str:
        """The name known_hosts files use: `host`, or `[host]:port` off port 22."""
        host = self.host_key_alias or self.hostname
        return host if self.port == 22 or self.host_key_alias else f"[{host}]:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


def load_ssh_config(options: ConnectOptions) -> paramiko.SSHConfig:
    import paramiko  # only ssh needs it: the local transport and `--help` stay light

    path = options.ssh_config or "~/.ssh/config"
    full = os.path.expanduser(path)
    if not os.path.exists(full):
        if options.ssh_config:
            raise ConnectError(f"ssh config {path} does not exist (fix the path or drop the option)")
        return paramiko.SSHConfig()
    try:
        config = paramiko.SSHConfig.from_path(full)
    except Exception as err:  # paramiko raises bare Exception/ConfigParseError on bad lines
        raise ConnectError(f"ssh config {path}: cannot parse: {err}") from None
    with open(full, encoding="utf-8", errors="replace") as fh:
        if MATCH_EXEC.search(fh.read()):
            _allow_match_exec()
    return config


MATCH_EXEC = re.compile(r"^\s*match\b.*\bexec\b", re.I | re.M)


def _allow_match_exec() -> None:
    """Give paramiko the `invoke` that runs `Match exec` commands (kept out of every run that
    needs none: connection/__init__.py)."""
    import paramiko.config

    if paramiko.config.invoke is None:
        if "invoke" in sys.modules and sys.modules["invoke"] is None:
            del sys.modules["invoke"]
        import invoke

        paramiko.config.invoke = invoke


def resolve(alias: str, config: paramiko.SSHConfig, host: Host | None = None) -> SshTarget:
    """ssh_config's answer for `alias`, overridden field by field by the inventory `host`."""
    user_part, _, rest = alias.rpartition("@") if "@" in alias else ("", "", alias)
    name, port_part = _split_port(rest)
    cfg = config.lookup(name)
    if "proxycommand" in cfg and (host is None or not host.jump):
        raise ConnectError(f"{name}: ProxyCommand in ssh config is not supported; use ProxyJump")
    keys = list(cfg.get("identityfile", []))
    if host and host.key_file:
        keys.insert(0, host.key_file)
    jump = (host.jump if host and host.jump else cfg.get("proxyjump"))
    port = (host.port if host and host.port else None) or port_part or int(cfg.get("port", 22))
    return SshTarget(
        name=host.name if host else name,
        hostname=(host.address if host and host.address else cfg.get("hostname", name)),
        port=int(port),
        user=(host.user if host and host.user else None) or user_part or cfg.get("user")
        or getpass.getuser(),
        key_files=tuple(os.path.expanduser(k) for k in keys),
        jump=None if not jump or jump.lower() == "none" else jump,
        host_key_alias=cfg.get("hostkeyalias"),
        known_hosts=tuple(cfg.get("userknownhostsfile", "").split()),
        identities_only=cfg.get("identitiesonly", "no").lower() == "yes",
    )


def _split_port(spec: str) -> tuple[str, int | None]:
    """`host:port`, `[v6addr]:port` or a bare name (ProxyJump syntax)."""
    if spec.startswith("["):
        host, _, tail = spec[1:].partition("]")
        return host, int(tail[1:]) if tail.startswith(":") else None
    if spec.count(":") == 1:
        host, _, port = spec.partition(":")
        if not port.isdigit():
            raise ConnectError(f"{spec}: bad port in ProxyJump spec (use host:port)")
        return host, int(port)
    return spec, None
