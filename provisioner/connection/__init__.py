"""Reach a host: `open_connection(host, options)` picks ssh, local or docker for it."""

from __future__ import annotations

import dataclasses
import sys

# paramiko's ssh_config support imports `invoke` (and with it unittest.mock and asyncio: about
# 25 ms, a twentieth of a converged run) only to run the commands of `Match exec` lines. It stays
# out until a config has one: options.load_ssh_config imports it then and hands it to paramiko,
# which takes it as absent until then.
sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]

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

        return _with_become(SshConnection(host, options), host)
    if host.transport == "local":
        from provisioner.connection.local import LocalConnection

        return _with_become(LocalConnection(host, Heartbeat(options.heartbeat_s)), host)
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


def _with_become(conn: Connection, host: Host) -> Connection:
    """`conn`, and as `conn.become` the same host as its become user when the inventory says
    ansible_become (a container's host becomes, not the container: docker exec is already root's)."""
    if host.become:
        from provisioner import secrets
        from provisioner.connection.become import BecomeConnection

        conn.become = BecomeConnection(conn, host.become_user, secrets.become_password(host.become_password_env))
    return conn
