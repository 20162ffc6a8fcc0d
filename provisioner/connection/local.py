"""The local transport: the controller itself is the host (subprocess, no shell in between).

Commands run under the same supervisor as on any host (remote/supervise.py), fed through a pipe:
should this process die, the pipe ends and so does every command it started.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, BinaryIO

from provisioner import remote
from provisioner.connection import supervised
from provisioner.connection.base import Frame, ProgressCallback, Result, Stats, copy_stream, signal_name
from provisioner.connection.base import Connection, Heartbeat, Held
from provisioner.errors import CommandError, ConnectError
from provisioner.config.inventory import Host

LOOPBACK = ("127.0.0.1", "localhost", "::1")
CHUNK = 65536


def host_environment(environ: Mapping[str, str] = os.environ, prefix: str = sys.prefix,
                     base_prefix: str = sys.base_prefix) -> dict[str, str]:
    """The environment of the machine itself, not of provision: ours less what activating the
    control venv added (its bin/ on PATH, VIRTUAL_ENV, PYTHONHOME). Otherwise `python3` on a local
    host is provision's own interpreter: facts would call it the system python, and a bare host's
    ComfyUI venv would be built from it."""
    env = {k: v for k, v in environ.items() if k not in ("VIRTUAL_ENV", "VIRTUAL_ENV_PROMPT", "PYTHONHOME")}
    venvs = {environ.get("VIRTUAL_ENV", "")} | ({prefix} if prefix != base_prefix else set())
    ours = {os.path.realpath(os.path.join(v, "bin")) for v in venvs if v}
    if "PATH" in env:
        env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep)
                                      if d and os.path.realpath(d) not in ours)
    return env


class LocalConnection:
    """Runs argv directly with `subprocess` (exec'd, never through a shell)."""

    become: Connection | None = None   # the host's become user (connection/become.py), when set
    owner: Connection | None = None    # the root's owner through sudo, when facts/gather.py chose it

    # The supervisor, by this very interpreter; `env`: its environment (None: the host's own, ours
    # less the control venv: see host_environment).
    launcher: tuple[str, ...] = (sys.executable, "-I", "-S", "-c", remote.BOOT)
    env: Mapping[str, str] | None = None

    def __init__(self, host: Host, heartbeat: Heartbeat = Heartbeat()) -> None:
        self.name = host.name
        self.stats = Stats()  # connects stays 0: there is nothing to connect to
        self.heartbeat = heartbeat
        self._aborted: str | None = None
        self._running: set[_ProcessPipe] = set()
        self._lock = threading.Lock()

    @property
    def machine(self) -> LocalConnection:
        return self

    def launch(self, argv: Sequence[str]) -> tuple[_ProcessPipe, tuple[Frame, ...]]:
        """The supervisor, as a process of its own session (the terminal's Ctrl-C reaches only us:
        we decide what stops)."""
        self._count(tuple(argv))
        if self._aborted:
            raise ConnectError(self._aborted)
        proc = subprocess.Popen(self.launcher, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.env if self.env is not None else host_environment(),
                                start_new_session=True)
        pipe = _ProcessPipe(proc, self._running)
        with self._lock:
            self._running.add(pipe)
        return pipe, ()

    def run(self, argv: Sequence[str], **options: Any) -> Result:
        return supervised.run(self, argv, **options)

    def hold(self, argv: Sequence[str]) -> AbstractContextManager[Held]:
        return supervised.hold(self, argv)

    def abort(self, reason: str) -> None:
        """End every running command's stdin: their supervisors stop them."""
        with self._lock:
            self._aborted = self._aborted or reason
            running = list(self._running)
        for pipe in running:
            pipe.close()

    def lost(self) -> str | None:
        return self._aborted

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

    def _count(self, argv: tuple[str, ...]) -> None:
        self.stats.execs += 1
        self.stats.history.append(argv)

    def close(self) -> None:
        """Nothing to release: each run is its own process."""

    def __enter__(self) -> LocalConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ProcessPipe:
    """A local supervisor process, as supervised.py drives it."""

    def __init__(self, proc: subprocess.Popen[bytes], running: set[_ProcessPipe]) -> None:
        self.proc, self.running = proc, running
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.stdin, self.streams = proc.stdin, {1: proc.stdout, 2: proc.stderr}

    def send(self, data: bytes) -> None:
        self.stdin.write(data)
        self.stdin.flush()

    def close_stdin(self) -> None:
        try:
            self.stdin.close()
        except (OSError, ValueError):
            pass                        # closed already, or a write was cut short: it ends either way

    def read(self, stream: int) -> bytes:
        try:
            return os.read(self.streams[stream].fileno(), CHUNK)
        except (OSError, ValueError):
            return b""

    def wait(self, timeout: float | None) -> bool:
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def status(self) -> tuple[int | None, str | None]:
        code = self.proc.returncode
        if code is None:
            return None, None
        return (code, None) if code >= 0 else (None, signal_name(-code))

    def close(self) -> None:
        """Its stdin ends, so it stops its command; should it hang, it is killed after the grace."""
        self.close_stdin()
        self.running.discard(self)
        if self.proc.poll() is None:
            timer = threading.Timer(supervised.GRACE_S * 2, self._kill)
            timer.daemon = True
            timer.start()
        else:
            self._release()

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._release()

    def _release(self) -> None:
        for stream in self.streams.values():
            try:
                stream.close()
            except (OSError, ValueError):
                pass
