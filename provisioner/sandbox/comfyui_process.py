"""Run the ComfyUI stand-in as a sandbox host's ComfyUI process, restartable like the real one.

Like real ComfyUI, what it serves is decided at start-up from the host's files: the Nunchaku
nodes are registered only when `custom_nodes/ComfyUI-nunchaku` exists AND the venv holds the
real `nunchaku` backend (the plugin without its backend registers only two nodes). So a
verification before `apply` + restart fails, and after it passes, for the same reasons as on a
real host. `python -m provisioner.sandbox.comfyui_process restart ROOT` is the command a sandbox
profile gives as `comfyui.restart`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PLUGIN_DIR = "ComfyUI-nunchaku"
PIDFILE = ".provision-sandbox/comfyui.pid"
PORTFILE = ".provision-sandbox/comfyui.port"
ARGSFILE = ".provision-sandbox/comfyui.args"      # extra stand-in flags, kept across restarts
LOGFILE = ".provision-sandbox/comfyui.log"


def detect(root: Path) -> tuple[bool, bool]:
    """(plugin present, real backend installed) for the ComfyUI checkout at `root`."""
    plugin = (root / "custom_nodes" / PLUGIN_DIR / "__init__.py").is_file()
    backend = any("+torch" in p.name for p in (root / "venv").glob("lib/python*/site-packages/nunchaku-*.dist-info"))
    return plugin, backend


def start(root: Path, port: int, *, gpu_state: Path | None = None, extra: tuple[str, ...] = ()) -> int:
    """Start detached (its own session, so it outlives the command that started it); returns PID."""
    plugin, backend = detect(root)
    argv = [sys.executable, "-m", "provisioner.sandbox.comfyui_server", "--root", str(root),
            "--port", str(port), "--check-models", *extra]
    if not plugin:
        argv.append("--no-plugin")
    elif not backend:
        argv.append("--no-nunchaku")
    if gpu_state:
        argv += ["--gpu-state-file", str(gpu_state)]
    (root / PIDFILE).parent.mkdir(parents=True, exist_ok=True)
    with open(root / LOGFILE, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=root)
    (root / PIDFILE).write_text(str(proc.pid))
    (root / PORTFILE).write_text(str(port))
    (root / ARGSFILE).write_text(json.dumps(list(extra)))
    _wait_ready(port, proc, root / LOGFILE)
    return proc.pid


def stop(root: Path) -> None:
    pidfile = root / PIDFILE
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pidfile.unlink(missing_ok=True)


def restart(root: Path) -> int:
    port = int((root / PORTFILE).read_text())
    extra = tuple(json.loads((root / ARGSFILE).read_text())) if (root / ARGSFILE).exists() else ()
    gpu_state = root.parent / "gpu-state.json"
    stop(root)
    return start(root, port, gpu_state=gpu_state if gpu_state.exists() else None, extra=extra)


class StandInFailed(RuntimeError):
    """The stand-in ComfyUI exited or never answered; the message ends with its last log line."""


def _wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    """Until /system_stats answers; a process that exited is reported at once, with its log's last line."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=1):
                return
        except OSError:
            code = proc.poll()
            if code is not None or time.monotonic() > deadline:
                lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
                why = lines[-1].strip() if lines else "no output"
                what = f"exited with code {code}" if code is not None else f"did not answer in {timeout:g}s"
                raise StandInFailed(f"ComfyUI stand-in on port {port} {what}: {why} (log: {log})")
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m provisioner.sandbox.comfyui_process")
    ap.add_argument("action", choices=("start", "stop", "restart"))
    ap.add_argument("root", type=Path, help="the ComfyUI checkout of the sandbox host")
    ap.add_argument("--port", type=int, default=8188)
    args = ap.parse_args(argv)
    root = args.root.resolve()
    if args.action == "start":
        gpu_state = root.parent / "gpu-state.json"
        start(root, args.port, gpu_state=gpu_state if gpu_state.exists() else None)
    elif args.action == "stop":
        stop(root)
    else:
        restart(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
