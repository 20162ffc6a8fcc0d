"""The local transport: the controller itself is the host (subprocess, no shell in between)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import BinaryIO

from provisioner.connection.base import ProgressCallback, Result, Stats, copy_stream
from provisioner.errors import CommandError
from provisioner.config.inventory import Host

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LocalConnection:
    """Runs argv directly with `subprocess` (exec'd, never through a shell)."""

    def __init__(self, host: Host) -> None:
        self.name = host.name
        self.stats = Stats()  # connects stays 0: there is nothing to connect to

    @property
    def machine(self) -> LocalConnection:
        return self

    def run(self, argv: Sequence[str], *, stdin: bytes | None = None,
            env: Mapping[str, str] | None = None, timeout: float | None = None,
            check: bool = True, stdout_callback: Callable[[str], None] | None = None) -> Result:
        argv = tuple(argv)
        self._count(argv)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env={**os.environ, **env} if env else None,
                                    start_new_session=timeout is not None)  # killpg on timeout
        except OSError as err:  # what a shell would say: 127 not found, 126 not executable
            code = 127 if isinstance(err, FileNotFoundError) else 126
            result = Result(argv, code, "", f"{argv[0]}: {err.strerror}\n")
        else:
            result = _stream(proc, argv, stdin, timeout, stdout_callback)
        if check and not result.ok:
            raise CommandError(self.name, result)
        return result

    def put(self, content: bytes, dest: str, *, mode: int = 0o644) -> None:
        self._write(dest, mode, lambda f: f.write(content))
        self.stats.bytes_put += len(content)

    def put_file(self, local_path: str, dest: str, *, mode: int = 0o644,
                 progress: ProgressCallback | None = None) -> None:
        with open(local_path, "rb") as src:
            total = os.fstat(src.fileno()).st_size

            self._write(dest, mode, lambda f: copy_stream(src, f.write, total, self.stats, progress))

    def _write(self, dest: str, mode: int, fill: Callable[[BinaryIO], object]) -> None:
        """A temporary file in dest's directory, then os.replace: readers never see half a file."""
        parent = os.path.dirname(os.path.abspath(dest))
        try:
            os.makedirs(parent, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".provision-tmp",
                                       dir=parent)
        except OSError as err:
            raise CommandError(self.name, Result(("put", dest), 1, "", f"{dest}: {err.strerror}"),
                               f"put {dest}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
            os.chmod(tmp, mode)
            os.replace(tmp, dest)
        except OSError as err:
            os.unlink(tmp)
            raise CommandError(self.name, Result(("put", dest), 1, "", f"{dest}: {err.strerror}"),
                               f"put {dest}") from None
        except BaseException:
            os.unlink(tmp)
            raise

    def tunnel(self, remote_port: int, remote_host: str = "127.0.0.1") -> AbstractContextManager[int]:
        if remote_host in LOOPBACK:
            return nullcontext(remote_port)  # already a local port: nothing to forward
        from provisioner.connection.forward import forward  # pulls paramiko in: only when needed

        return forward(lambda _client: socket.create_connection((remote_host, remote_port), timeout=10))

    @contextmanager
    def _hold(self, argv: tuple[str, ...]) -> Iterator[Iterator[str]]:
        self._count(argv)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL)
        except OSError as err:
            raise CommandError(self.name, Result(argv, 127, "", f"{argv[0]}: {err.strerror}")) from None
        assert proc.stdout is not None and proc.stdin is not None
        try:
            yield (line.decode(errors="replace").rstrip("\n") for line in proc.stdout)
        finally:
            proc.stdin.close()  # EOF: the holder exits and its lock goes with it
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()

    def hold(self, argv: Sequence[str]) -> AbstractContextManager[Iterator[str]]:
        return self._hold(tuple(argv))

    def _count(self, argv: tuple[str, ...]) -> None:
        self.stats.execs += 1
        self.stats.history.append(argv)

    def close(self) -> None:
        """Nothing to release: each run is its own process."""

    def __enter__(self) -> LocalConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stream(proc: subprocess.Popen[bytes], argv: tuple[str, ...], stdin: bytes | None,
            timeout: float | None, on_line: Callable[[str], None] | None) -> Result:
    """Read stdout line by line (for on_line) while threads feed stdin and drain stderr."""
    pin, pout, perr = proc.stdin, proc.stdout, proc.stderr
    assert pin is not None and pout is not None and perr is not None
    err: list[bytes] = []
    timed_out = threading.Event()

    def feed() -> None:
        try:
            pin.write(stdin or b"")
            pin.close()
        except BrokenPipeError:
            pass  # it exited without reading all of its stdin

    def expire() -> None:  # the whole process group: `sh -c` children too, or stdout stays open
        timed_out.set()
        os.killpg(proc.pid, signal.SIGKILL)

    helpers = [threading.Thread(target=feed, daemon=True),
               threading.Thread(target=lambda: err.append(perr.read()), daemon=True)]
    timer = threading.Timer(timeout, expire) if timeout is not None else None
    for t in [*helpers, *([timer] if timer else [])]:
        t.start()
    out = []
    for line in pout:
        out.append(line)
        if on_line:
            on_line(line.decode(errors="replace").rstrip("\n"))
    code = proc.wait()
    if timer:
        timer.cancel()
    for t in helpers:
        t.join()
    pout.close()
    perr.close()
    stdout, stderr = b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace")
    if timed_out.is_set():  # 124, as timeout(1) says
        return Result(argv, 124, stdout, stderr + f"\ntimed out after {timeout:g}s\n")
    return Result(argv, 128 - code if code < 0 else code, stdout, stderr)  # < 0: signal, as sh says
