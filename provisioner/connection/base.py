"""What every transport offers: run an argv, move bytes atomically, open a tunnel.

Commands are argv lists everywhere in the code base, and no argv ever becomes a shell line: every
command runs under the supervisor (remote/supervise.py), which receives its argv as JSON on stdin
(connection/supervised.py). `LOGIN_LINE` is the one shell line, the same for every command; sshd
hands it to the user's login shell, whatever that is.
"""

from __future__ import annotations

import json
import secrets
import signal as signals
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from provisioner import remote

NO_PYTHON = "provision: python3 not found on PATH"
# What /bin/sh runs on a host: python3 with the supervisor, whose source comes first on stdin.
LAUNCH = ('command -v python3 >/dev/null 2>&1 || { echo "' + NO_PYTHON + '" >&2; exit 127; }; '
          'exec python3 -I -S -c "' + remote.BOOT + '"')
# sshd runs a command through the user's login shell: sh, bash, dash, zsh, fish, tcsh or csh. In
# single quotes all of them read every character as itself except a quote, a backslash (fish), a
# `!` and a newline (csh), and LAUNCH has none of these; so every shell runs the same /bin/sh line.
LOGIN_LINE = "exec /bin/sh -c '" + LAUNCH + "'"
assert not set("'\\!\n") & set(LAUNCH), "LAUNCH must read the same in every login shell"


@dataclass(frozen=True)
class Heartbeat:
    """How often each side shows the other it is alive, and how much silence means gone: the
    controller writes to every running command's supervisor, and asks sshd for an answer."""

    every: float = 5.0
    missed: int = 3

    @property
    def dead_after(self) -> float:
        return self.every * self.missed


class Held(Protocol):
    """A held command's stdout lines (`Connection.hold`)."""

    def __iter__(self) -> Iterator[str]: ...

    def __next__(self) -> str: ...

    def end(self) -> None:
        """From any thread: let the command go now (its stdin ends), so that the lines run out
        as soon as it has stopped instead of with its next line; leaving the block still waits."""
        ...


class Pipe(Protocol):
    """One started supervisor (remote/supervise.py), as a transport hands it to supervised.py."""

    def send(self, data: bytes) -> None:
        """All of `data` to its stdin; raises OSError when it cannot."""
        ...

    def close_stdin(self) -> None: ...

    def read(self, stream: int) -> bytes:
        """The next bytes of its stdout (1) or stderr (2); b"" once that stream ended."""
        ...

    def wait(self, timeout: float | None) -> bool:
        """Wait until it exited or its channel went, up to `timeout` seconds."""
        ...

    def status(self) -> tuple[int | None, str | None]:
        """Its exit code or the signal that ended it; (None, None) when neither is known."""
        ...

    def close(self) -> None:
        """End it now; the supervisor sees its stdin end and stops the command's group."""
        ...


class Frame:
    """The markers one supervisor puts around its command's output (remote/supervise.py)."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(8)   # a command cannot print our markers by chance or on purpose
        self.start = f"\x1eprovision {self.nonce} start\n".encode()
        self.end = f"\x1eprovision {self.nonce} end ".encode()

    def cut(self, data: bytes) -> tuple[bytes, dict[str, Any] | None] | None:
        """The command's own output and its status (None: it never finished); None when the
        supervisor never started. Whatever lies outside the markers is dropped."""
        i = data.find(self.start)
        if i < 0:
            return None
        body = data[i + len(self.start):]
        j = body.find(self.end)
        if j < 0:
            return body, None
        try:
            status = json.loads(body[j + len(self.end):].split(b"\n", 1)[0])
        except ValueError:
            status = None
        return body[:j], status if isinstance(status, dict) else None


@dataclass(frozen=True)
class Result:
    """What one command did on a host. `signal` names the one that ended it (exit_code 128+N);
    `stopped` says why provision stopped it (a timeout: exit_code 124)."""

    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str
    signal: str | None = None
    stopped: str | None = None
    host_cpu_s: float | None = None     # what it cost the host, as its supervisor measured it

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def signal_name(number: int) -> str:
    """`SIGKILL` for 9."""
    try:
        return signals.Signals(number).name
    except ValueError:
        return f"signal {number}"


def signal_number(name: str | None) -> int:
    """9 for `SIGKILL` or `KILL` (as SSH's exit-signal says it); 0 when unknown."""
    if not name:
        return 0
    try:
        return int(signals.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        return 0


@dataclass
class Stats:
    """Counters a test or benchmark reads to prove the round-trip budget (one connect, one exec)."""

    connects: int = 0
    execs: int = 0
    bytes_put: int = 0
    history: list[tuple[str, ...]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)   # why a push took a slower way (scp failed)
    host_cpu: list[tuple[str, float]] = field(default_factory=list)  # (remote.kind of argv, CPU s) per command


# Files written through a command's stdin, where there is no SFTP: a container, or a host whose
# login shell prints into the SFTP stream. WRITE: $1 = dest, $2 = "new" (the first part) or
# "append"; COMMIT: $1 = dest, $2 = octal mode. The content lands in "$1.provision-tmp" and is
# renamed over dest at the end (atomic).
WRITE = ('set -e; mkdir -p "$(dirname "$1")"; '
         'if [ "$2" = new ]; then cat > "$1.provision-tmp"; else cat >> "$1.provision-tmp"; fi')
COMMIT = 'set -e; chmod "$2" "$1.provision-tmp"; mv -f "$1.provision-tmp" "$1"'
STDIN_PART = 64 * 1024 * 1024   # a big file goes in appends of this size: bounded memory


def put_through_stdin(conn: Connection, src: BinaryIO, total: int, dest: str, mode: int,
                      progress: ProgressCallback | None) -> None:
    """Write `src` to `dest` on `conn`'s host with `cat` (see WRITE), atomically."""
    done, how = 0, "new"
    while True:  # at least once: an empty file is still created
        part = src.read(STDIN_PART)
        if part or how == "new":
            conn.run(["sh", "-c", WRITE, "sh", dest, how], stdin=part)
            conn.stats.bytes_put += len(part)
            done += len(part)
            if progress:
                progress(done, total)
        if not part:
            break
        how = "append"
    conn.run(["sh", "-c", COMMIT, "sh", dest, f"{mode:o}"])


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


class Connection(Protocol):
    """A reached host. One per host per run, reused by facts, apply and verify."""

    name: str
    stats: Stats
    # The same host as its become user (connection/become.py: sudo), where the inventory sets
    # ansible_become; None otherwise. Steps marked `system` run there.
    become: Connection | None
    # The same host as the owner of ComfyUI's root (sudo), where the login is neither root nor that
    # owner and can become it: set by the facts (facts/gather.py), None otherwise. Every other step
    # under the root runs there (as_whom).
    owner: Connection | None

    @property
    def heartbeat(self) -> Heartbeat: ...

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
        idle_timeout: float | None = None,
        check: bool = True,
        stdout_callback: Callable[[str], None] | None = None,
    ) -> Result:
        """Run argv on the host. Secrets go through `stdin`, never argv or env (both show in `ps`).

        `timeout`: seconds it may take; `idle_timeout`: seconds its stdout may stay silent. Either
        way, its whole process group is stopped on the host and the Result says 124. So is it
        when this controller goes away (the heartbeat stops).

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

    def hold(self, argv: Sequence[str]) -> AbstractContextManager[Held]:
        """Start a long-lived command (a lock holder) and keep it alive for the `with` block.

        Yields an iterator over its stdout lines (`Held.end` lets it go early); leaving the block
        closes its stdin, so the command ends, and so does it if this process dies or its heartbeat stops (the lock
        cannot go stale, not even behind a network partition).
        """
        ...

    def launch(self, argv: Sequence[str]) -> tuple[Pipe, tuple[Frame, ...]]:
        """Start the supervisor that will run `argv` (counted in `stats`), with the frames of the
        supervisors relaying to it, innermost first (a docker exec's); supervised.py drives it."""
        ...

    def lost(self) -> str | None:
        """Why this connection is gone (aborted, or its peer stopped answering), or None."""
        ...

    def abort(self, reason: str) -> None:
        """End every command running now (their supervisors stop their process groups) and make
        every later call raise `ConnectError(reason)`. From any thread: Ctrl-C, a dead peer."""
        ...

    def close(self) -> None: ...


class ProgressCallback(Protocol):
    def __call__(self, done: int, total: int) -> None: ...


def as_whom(conn: Connection, system: bool) -> Connection:
    """Where a step runs: a `system` step (a unit, systemctl) as the host's become user when the
    inventory says ansible_become; any other as the owner of ComfyUI's root when the facts found
    the login is not that owner and can become it (`conn.owner`); else as the login user. The plan
    checked the login can become whom its steps need (plan/build.py, resources/service.py)."""
    if system:
        return conn.become if conn.become is not None else conn
    return conn.owner if conn.owner is not None else conn
