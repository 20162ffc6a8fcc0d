"""Reach a host: `open_connection(host, options)` picks ssh, local or docker for it."""

from __future__ import annotations

import dataclasses

from provisioner.connection.base import Connection, Heartbeat, Result, Stats
from provisioner.connection.options import ConnectOptions
from provisioner.errors import ConnectError
from provisioner.config.inventory import Host

__all__ = ["ConnectOptions", "Connection", "Result", "Stats", "open_connection"]


def open_connection(host: Host, options: ConnectOptions | None = None) -> Connection:
    """A connected transport for `host` (ssh connects and checks the host key right here).

    Raises `ConnectError` (one line: host, reason, fix) when the host cannot be reached.
    """
    options = options or ConnectOptions()
    if host.transport == "ssh":
        from provisioner.connection.ssh import SshConnection

        return SshConnection(host, options)
    if host.transport == "local":
        from provisioner.connection.local import LocalConnection

        return LocalConnection(host, Heartbeat(options.heartbeat_s))
    if host.transport == "docker":
        from provisioner.connection.docker import DockerConnection

        if not host.container:
            raise ConnectError(f"{host.name}: transport docker needs a container name "
                               f"(set provision_container in the inventory)")
        if host.via not in ("ssh", "local"):
            raise ConnectError(f"{host.name}: a docker container is reached via ssh or local, "
                               f"not {host.via!r} (fix its `via` in the inventory)")
        inner = open_connection(dataclasses.replace(host, transport=host.via), options)
        return DockerConnection(host.name, host.container, inner)
    raise ConnectError(f"{host.name}: unknown transport {host.transport!r} "
                       f"(use ssh, local or docker for ansible_connection)")
