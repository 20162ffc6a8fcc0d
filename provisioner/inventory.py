"""Ansible YAML inventories (`all:` / `children:` / `hosts:` / `vars:`) into a list of Hosts.

An existing Ansible YAML inventory loads as-is: `ansible_host`, `ansible_port`, `ansible_user`,
`ansible_ssh_private_key_file`, `ansible_connection` (ssh | local | docker) are understood.
provision's own variables are prefixed `provision_`; a `provision:` mapping in host or group vars
is deep-merged over the profile for that host (a different ComfyUI root on one box, say).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Transport = Literal["ssh", "local", "docker"]


@dataclass(frozen=True)
class Host:
    name: str                                    # inventory name; also the ~/.ssh/config alias
    address: str | None = None                   # ansible_host; None: ssh config / name decides
    port: int | None = None
    user: str | None = None
    key_file: str | None = None
    transport: Transport = "ssh"
    container: str | None = None                 # docker: container name (provision_container)
    via: Transport = "ssh"                       # docker: how the container's host is reached
    jump: str | None = None                      # ProxyJump spec, when not from ssh config
    groups: tuple[str, ...] = ()
    vars: Mapping[str, Any] = field(default_factory=dict)

    @property
    def overlay(self) -> Mapping[str, Any]:
        """Profile keys this host overrides (`provision:` in its vars)."""
        return self.vars.get("provision") or {}
