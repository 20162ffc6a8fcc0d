"""The local transport: the controller itself is the host (subprocess, no shell in between)."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import BinaryIO

from provisioner.connection.base import ProgressCallback, Result, Stats
from provisioner.connection.forward import forward
from provisioner.errors import CommandError
from provisioner.inventory import Host

CHUNK = 1024 * 1024
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LocalConnection:
    """Runs argv directly with `subprocess` (exec'd, never through a shell)."""

    def __init__(self, host: Host) -> None:
        self.name = host.name
        self.stats = Stats()  # connects stays 0: there is nothing to connect to

    def run(self, argv: Sequence[str], *, stdin: bytes | None = None,
            env: Mapping[str, str] | None = None, timeout: float | None = None,
            check: bool = True) -> Result:
        argv = tuple(argv)
        self._count(argv)
        try:
            done = subprocess.run(argv, input=stdin or b"", capture_output=True, timeout=timeout,
                                  env={**os.environ, **env} if env else None)
            result = Result(argv, done.returncode, _text(done.stdout), _text(done.stderr))
        except subprocess.TimeoutExpired as err:  # run() has killed it; 124 as timeout(1) says
            result = Result(argv, 124, _text(err.stdout), _text(err.stderr) + f"\ntimed out after {timeout:g}s\n")
        except (FileNotFoundError, PermissionError) as err:  # what a shell would say: 127 / 126
            code = 127 if isinstance(err, FileNotFoundError) else 126
            result = Result(argv, code, "", f"{argv[0]}: {err.strerror}\n")
        if result.exit_code < 0:  # killed by a signal: report it as a shell does, 128 + N
            result = Result(argv, 128 - result.exit_code, result.stdout, result.stderr)
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

            def copy(f: BinaryIO) -> None:
                done = 0
                while chunk := src.read(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    self.stats.bytes_put += len(chunk)
                    if progress:
                        progress(done, total)
                if progress and total == 0:
                    progress(0, 0)

            self._write(dest, mode, copy)

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

    def get(self, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as err:
            raise CommandError(self.name, Result(("get", path), 1, "", f"{path}: {err.strerror}"),
                               f"get {path}") from None

    def tunnel(self, remote_port: int, remote_host: str = "127.0.0.1") -> AbstractContextManager[int]:
        if remote_host in LOOPBACK:
            return nullcontext(remote_port)  # already a local port: nothing to forward
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


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
