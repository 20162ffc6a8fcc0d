"""What every transport offers: run an argv, move bytes atomically, open a tunnel.

Commands are argv lists everywhere in the code base; `shell_line` is the one place that turns
one into a shell line, so no caller can forget to quote (the seed's `pip install diffusers>=0.35`
became a redirection to a file named `=0.35`).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol


@dataclass(frozen=True)
class Result:
    """What one command did on a host."""

    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class Stats:
    """Counters a test or benchmark reads to prove the round-trip budget (one connect, one exec)."""

    connects: int = 0
    execs: int = 0
    bytes_put: int = 0
    history: list[tuple[str, ...]] = field(default_factory=list)


def copy_stream(src: BinaryIO, write: Callable[[bytes], object], total: int, stats: Stats,
                progress: ProgressCallback | None, chunk: int = 1 << 20) -> None:
    """Copy `src` to `write` in chunks, counting bytes in `stats` and reporting `progress`."""
    done = 0
    while block := src.read(chunk):
        write(block)
        done += len(block)
        stats.bytes_put += len(block)
        if progress:
            progress(done, total)
    if progress and total == 0:
        progress(0, 0)


def shell_line(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """Quote an argv (and optional environment) into one POSIX shell line. The only quoting edge."""
    prefix = ""
    if env:
        prefix = "env " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " "
    return prefix + shlex.join(argv)


class Connection(Protocol):
    """A reached host. One per host per run, reused by facts, apply and verify."""

    name: str
    stats: Stats

    @property
    def machine(self) -> Connection:
        """The machine itself: this connection, or for a container the connection beside it
        (where `docker restart` must run)."""
        ...

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        check: bool = True,
        stdout_callback: Callable[[str], None] | None = None,
    ) -> Result:
        """Run argv on the host. Secrets go through `stdin`, never argv or env (both show in `ps`).

        `stdout_callback` receives each stdout line as it arrives (download progress); the
        whole stdout is still returned in the Result.

        Raises `CommandError` when `check` and the exit code is not 0, `ConnectError` when the
        transport breaks.
        """
        ...

    def put(self, content: bytes, dest: str, *, mode: int = 0o644) -> None:
        """Write `content` to `dest` through a temporary name and a rename: never a partial file."""
        ...

    def put_file(self, local_path: str, dest: str, *, mode: int = 0o644,
                 progress: ProgressCallback | None = None) -> None:
        """Stream a local file to `dest` atomically (same guarantee as `put`, for big files)."""
        ...

    def tunnel(self, remote_port: int, remote_host: str = "127.0.0.1") -> AbstractContextManager[int]:
        """Forward a free local port to `remote_host:remote_port` as seen from the host; yields it."""
        ...

    def hold(self, argv: Sequence[str]) -> AbstractContextManager[Iterator[str]]:
        """Start a long-lived command (a lock holder) and keep it alive for the `with` block.

        Yields an iterator over its stdout lines; leaving the block closes its stdin, so the
        command ends, and so does it if this process dies (the lock cannot go stale).
        """
        ...

    def close(self) -> None: ...


class ProgressCallback(Protocol):
    def __call__(self, done: int, total: int) -> None: ...
