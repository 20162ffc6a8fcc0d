"""The docker transport: a container on a host reached by an inner (ssh or local) connection.

Everything goes through `docker exec -i` on the inner connection, files included (through the
exec's stdin), so no `docker cp`, no shared volume and no second connection are needed. The
command runs under a supervisor inside the container (killing a `docker exec` client leaves its
process running in the container); the inner connection's supervisor relays to it, heartbeat
included, so either one stops what it runs when the controller goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

from provisioner import remote
from provisioner.connection import supervised
from provisioner.connection.base import LAUNCH, Connection, Frame, Heartbeat, Held, Pipe, Stats
from provisioner.connection.supervised import GRACE_S

# One separator per network: the format of the brief glues several IPs together.
INSPECT_IP = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"


class DockerConnection(supervised.Relayed):
    """Runs argv inside `container` with `docker exec`, on the host `inner` reaches."""

    become: Connection | None = None   # the host's become user (connection/become.py), when set
    owner: Connection | None = None    # the root's owner through sudo, when facts/gather.py chose it

    def __init__(self, name: str, container: str, inner: Connection) -> None:
        self.name = name
        self.container = container
        self.inner = inner
        self.stats = Stats(connects=inner.stats.connects)
        self._ip: str | None = None

    @property
    def machine(self) -> Connection:
        """The container's host: `docker restart` runs there, never inside the container."""
        return self.inner

    @property
    def heartbeat(self) -> Heartbeat:
        return self.inner.heartbeat

    def launch(self, argv: Sequence[str]) -> tuple[Pipe, tuple[Frame, ...]]:
        """The container's supervisor, through the inner connection's in relay mode."""
        self._count(tuple(argv))
        exec_argv = ("docker", "exec", "-i", self.container, "/bin/sh", "-c", LAUNCH)
        pipe, outer = self.inner.launch(exec_argv)
        relay = Frame()
        try:
            pipe.send(remote.supervise_request(exec_argv, nonce=relay.nonce, mode="relay",
                                               dead_after=self.heartbeat.dead_after, grace=GRACE_S))
        except OSError:
            pass                        # the inner connection is gone: driving the pipe says why
        return pipe, (relay, *outer)

    def tunnel(self, remote_port: int, remote_host: str = "127.0.0.1") -> AbstractContextManager[int]:
        """`remote_host` is as the container sees it: its loopback is the container's own IP."""
        if remote_host in ("127.0.0.1", "localhost"):
            remote_host = self.ip()
        return self.inner.tunnel(remote_port, remote_host)

    def ip(self) -> str:
        """The container's address on its host; 127.0.0.1 with host networking (no IP of its own)."""
        if self._ip is None:
            out = self.inner.run(["docker", "inspect", "-f", INSPECT_IP, self.container]).stdout
            self._ip = (out.split() or ["127.0.0.1"])[0]
        return self._ip

    def hold(self, argv: Sequence[str]) -> AbstractContextManager[Held]:
        return supervised.hold(self, argv)

    def lost(self) -> str | None:
        return self.inner.lost()

    def abort(self, reason: str) -> None:
        self.inner.abort(reason)

    def _count(self, argv: tuple[str, ...]) -> None:
        self.stats.execs += 1
        self.stats.history.append(argv)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> DockerConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
