"""The controller's side of remote/supervise.py, under which every command on a host runs.

A transport starts the supervisor and hands over a `Pipe` (an SSH channel running the login line,
a local process, or either of them relaying to a `docker exec`); `run` and `hold` send it the
request, the command's stdin and then a heartbeat, read the framed output, and make the status
a `Result`:

- a timeout is enforced on the host, where the supervisor stops the command's whole process group;
  should the host not confirm it, the channel is closed here as well;
- `idle_timeout`: a command whose stdout stays silent that long is stopped (a download that no
  longer progresses);
- when the controller goes (killed, Ctrl-C, a network partition), stdin ends or the heartbeat
  stops, and the supervisor stops the group: no `pip install` or `git clone` is left running,
  and a lock holder lets go.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from provisioner import remote
from provisioner.connection.base import (Connection, Frame, Heartbeat, Held, Pipe, ProgressCallback, Result,
                                      put_through_stdin, signal_number)
from provisioner.errors import CommandError, ConnectError

GRACE_S = 5.0       # a stopped group's time between SIGTERM and SIGKILL; a holder's time to let go
EOF_WAIT_S = 2.0    # after the exit status, for the streams to end (a daemon it started may hold them)


class Lines:
    """A command's stdout lines as they arrive, only those inside its frame."""

    def __init__(self, frame: Frame, sink: Callable[[str], None]) -> None:
        self.frame, self.sink = frame, sink
        self.pending = b""
        self.inside = self.over = False

    def feed(self, data: bytes) -> None:
        if self.over:
            return
        self.pending += data
        if not self.inside:
            i = self.pending.find(self.frame.start)
            if i < 0:
                self.pending = self.pending[-len(self.frame.start):]   # a marker cut in two
                return
            self.inside, self.pending = True, self.pending[i + len(self.frame.start):]
        *complete, self.pending = self.pending.split(b"\n")
        for line in complete:
            if not self._line(line):
                return

    def close(self) -> None:
        """The stream ended: an unfinished last line is still a line."""
        if self.inside and not self.over and self.pending:
            self._line(self.pending)

    def _line(self, line: bytes) -> bool:
        j = line.find(self.frame.end)
        if j >= 0:
            self.over = True
            line = line[:j]
            if not line:
                return False
        self.sink(line.decode(errors="replace"))
        return not self.over


def run(conn: Connection, argv: Sequence[str], *, stdin: bytes | None = None,
        env: Mapping[str, str] | None = None, timeout: float | None = None,
        idle_timeout: float | None = None, check: bool = True,
        stdout_callback: Callable[[str], None] | None = None) -> Result:
    """`Connection.run` of every transport (base.py says what each argument does): the supervisor
    started by `conn.launch`, driven to its end."""
    argv = tuple(argv)
    pipe, outer = conn.launch(argv)
    result = _drive(pipe, conn.name, argv, heartbeat=conn.heartbeat, lost=conn.lost, outer=outer, stdin=stdin,
                    env=env, timeout=timeout, idle_timeout=idle_timeout, on_line=stdout_callback)
    if result.host_cpu_s is not None:
        conn.stats.host_cpu.append((remote.kind(argv), result.host_cpu_s))
    if check and not result.ok:
        raise CommandError(conn.name, result)
    return result


def hold(conn: Connection, argv: Sequence[str]) -> AbstractContextManager[Held]:
    """`Connection.hold` of every transport: the supervisor started by `conn.launch`, kept."""
    argv = tuple(argv)
    pipe, outer = conn.launch(argv)
    return _keep(pipe, argv, heartbeat=conn.heartbeat, lost=conn.lost, outer=outer)


def _drive(pipe: Pipe, host: str, argv: tuple[str, ...], *, heartbeat: Heartbeat,
           lost: Callable[[], str | None], outer: Sequence[Frame] = (), stdin: bytes | None = None,
           env: Mapping[str, str] | None = None, timeout: float | None = None,
           idle_timeout: float | None = None, on_line: Callable[[str], None] | None = None) -> Result:
    """Run `argv` under the supervisor `pipe` leads to; `outer`: the frames of supervisors that
    relay to it (a docker exec's), innermost first. `lost()` says why the connection went, if it did."""
    frame = Frame()
    payload = stdin or b""
    request = remote.supervise_request(argv, nonce=frame.nonce, size=len(payload), env=env, timeout=timeout,
                                       dead_after=heartbeat.dead_after, grace=GRACE_S)
    done = threading.Event()
    chunks: dict[int, list[bytes]] = {1: [], 2: []}
    last_output = [time.monotonic()]
    lines = Lines(frame, on_line) if on_line else None

    def feed() -> None:
        try:
            pipe.send(request + payload)
            while not done.wait(heartbeat.every):
                pipe.send(b"\n")
        except (OSError, ValueError):
            pass                        # its end is gone; the readers find out why

    def drain(stream: int) -> None:
        while data := pipe.read(stream):
            chunks[stream].append(data)
            if stream == 1:
                last_output[0] = time.monotonic()
                if lines:
                    lines.feed(data)
        if stream == 1 and lines:
            lines.close()

    readers = [threading.Thread(target=drain, args=(s,), daemon=True) for s in (1, 2)]
    for t in [threading.Thread(target=feed, daemon=True), *readers]:
        t.start()
    started = time.monotonic()
    # The host stops a command at its timeout; past this, it did not say so, and we stop waiting.
    confirm = heartbeat.dead_after + GRACE_S
    give_up = None if timeout is None else started + timeout + confirm
    idle_stop: float | None = None
    forced = False
    try:
        while not pipe.wait(_until(give_up, None if idle_timeout is None or idle_stop
                                   else last_output[0] + idle_timeout)):
            now = time.monotonic()
            if idle_timeout is not None and idle_stop is None and now - last_output[0] >= idle_timeout:
                idle_stop = now
                done.set()
                pipe.close_stdin()      # in payload mode: the supervisor stops the group
                give_up = min(give_up or now + confirm, now + confirm)
            elif give_up is not None and now >= give_up:
                forced = True
                break
        done.set()
        for t in readers:
            t.join(EOF_WAIT_S)
    finally:
        done.set()
        pipe.close()
    out, err = b"".join(chunks[1]), b"".join(chunks[2])
    return _result(host, argv, (frame, *outer), out, err, pipe.status(), lost(),
                   timeout=timeout, idle=idle_timeout if idle_stop is not None else None, forced=forced)


def _until(*deadlines: float | None) -> float | None:
    known = [d for d in deadlines if d is not None]
    return None if not known else max(0.01, min(known) - time.monotonic())


def _result(host: str, argv: tuple[str, ...], frames: Sequence[Frame], out: bytes, err: bytes,
            transport: tuple[int | None, str | None], lost: str | None, *, timeout: float | None,
            idle: float | None, forced: bool) -> Result:
    """The command's output from the innermost frame; how it ended from the innermost supervisor
    that says so (a relay's says how the one inside it ended), else from the transport."""
    status: dict[str, Any] | None = None
    own: tuple[bytes, bytes] | None = None
    for frame in frames:
        cut = frame.cut(out)
        if cut is None:
            continue
        body, status = cut
        own = own or (body, (frame.cut(err) or (err, None))[0])
        if status is not None:
            break
    out, err = own or (out, err)
    cpu = status.get("cpu") if status is not None else None
    cpu = float(cpu) if isinstance(cpu, (int, float)) else None
    text_out, text_err = out.decode(errors="replace"), err.decode(errors="replace")
    if status is not None and "timeout" in status:
        return Result(argv, 124, text_out, text_err, stopped=f"timed out after {status['timeout']:g}s "
                      "(its process group was stopped)")
    if lost and (status is None or status.get("stopped")):
        raise ConnectError(lost)        # stopped because the connection was aborted, or just gone
    if idle is not None:
        return Result(argv, 124, text_out, text_err, stopped=f"printed nothing for {idle:g}s (stopped, with "
                      "its process group)")
    if status is not None:
        signal = status.get("signal")
        if signal:
            why = f"stopped: {status['stopped']}" if status.get("stopped") else None
            return Result(argv, 128 + signal_number(signal), text_out, text_err, signal, why, cpu)
        return Result(argv, int(status.get("exit", 1)), text_out, text_err, host_cpu_s=cpu)
    if forced:
        return Result(argv, 124, text_out, text_err, stopped=f"timed out after {timeout:g}s (and the host did "
                      "not confirm that it stopped the command)")
    code, signal = transport
    if code is None and signal is None:
        raise ConnectError(f"{host}: connection lost running {argv[0]}")
    return Result(argv, code if code is not None else 128 + signal_number(signal), text_out, text_err, signal)


@contextmanager
def _keep(pipe: Pipe, argv: tuple[str, ...], *, heartbeat: Heartbeat, lost: Callable[[], str | None],
          outer: Sequence[Frame] = ()) -> Iterator[Held]:
    """Keep `argv` running for the block; yields its stdout lines. Leaving the block ends its
    stdin (it may end by itself, and is stopped `GRACE_S` later); so does losing the controller."""
    frame = Frame()
    request = remote.supervise_request(argv, nonce=frame.nonce, mode="hold", dead_after=heartbeat.dead_after,
                                       grace=GRACE_S)
    done = threading.Event()

    def feed() -> None:
        try:
            pipe.send(request)
            while not done.wait(heartbeat.every):
                pipe.send(b"\n")
        except (OSError, ValueError):
            pass

    def drain_stderr() -> None:         # unread, it would fill the channel's window or the pipe
        while pipe.read(2):
            pass

    def lines() -> Iterator[str]:
        got: deque[str] = deque()
        reader = Lines(frame, got.append)
        while not reader.over:
            data = pipe.read(1)
            if data:
                reader.feed(data)
            else:
                reader.close()
            while got:
                yield got.popleft()
            if not data:
                break
        if not reader.over and (why := lost()):
            raise ConnectError(why)

    def end() -> None:
        done.set()
        pipe.close_stdin()

    for target in (feed, drain_stderr):
        threading.Thread(target=target, daemon=True).start()
    try:
        yield _Held(lines(), end)
    finally:
        done.set()
        pipe.close_stdin()              # the holder's stdin ends: it lets go...
        pipe.wait(GRACE_S + 1)          # ...and is gone before we go on
        pipe.close()


class _Held:
    """`Held`: a held command's lines, and `end` to let it go before the block is left."""

    def __init__(self, lines: Iterator[str], end: Callable[[], None]) -> None:
        self._lines, self.end = lines, end

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._lines)


class Relayed:
    """What a connection whose commands reach the host through another's supervisor (a container's,
    another user's) does alike: commands supervised, files written through the command's stdin."""

    def run(self, argv: Sequence[str], **options: Any) -> Result:
        return run(self, argv, **options)  # type: ignore[arg-type]

    def put(self, content: bytes, dest: str, *, mode: int = 0o644) -> None:
        put_through_stdin(self, io.BytesIO(content), len(content), dest, mode, None)  # type: ignore[arg-type]

    def put_file(self, local_path: str, dest: str, *, mode: int = 0o644,
                 progress: ProgressCallback | None = None) -> None:
        with open(local_path, "rb") as src:
            put_through_stdin(self, src, os.fstat(src.fileno()).st_size, dest, mode, progress)  # type: ignore[arg-type]
