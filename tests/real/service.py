"""A tiny service manager for real ComfyUI on a test host, run ON the host: `python service.py
start|stop|restart|status DIR`. Like `systemctl restart` and `docker restart`, `restart` stops the
old process, starts the new one and returns at once: ComfyUI listens some seconds later, after it
imported torch and every custom node. Standard library only.

DIR/service.json holds the command (`argv`, `cwd`); DIR/pid the running process; DIR/comfyui.log
its console, each start marked by a `=== start` line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STOP_GRACE_S = 15.0


def running_pid(service: Path) -> int | None:
    """The PID when the process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        pid = int((service / "pid").read_text())
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError):
        return None
    return None if state in ("Z", "X") else pid


def start(service: Path) -> int:
    pid = running_pid(service)
    if pid is not None:
        return pid
    config = json.loads((service / "service.json").read_text())
    with open(service / "comfyui.log", "ab") as log:
        log.write(f"=== start {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        log.flush()
        proc = subprocess.Popen(config["argv"], cwd=config["cwd"], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (service / "pid").write_text(str(proc.pid))
    return proc.pid


def stop(service: Path) -> None:
    """SIGTERM to the process group, SIGKILL after the grace period."""
    pid = running_pid(service)
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while running_pid(service) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if running_pid(service) is not None:
            os.killpg(pid, signal.SIGKILL)
            while running_pid(service) is not None:
                time.sleep(0.05)
    except ProcessLookupError:
        pass
    (service / "pid").unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop", "restart", "status"):
        print("usage: service.py start|stop|restart|status DIR", file=sys.stderr)
        return 2
    action, service = argv[0], Path(argv[1])
    if action == "status":
        pid = running_pid(service)
        print(f"running {pid}" if pid else "stopped")
        return 0 if pid else 3                    # systemctl's "not running"
    if action in ("stop", "restart"):
        stop(service)
    if action in ("start", "restart"):
        print(start(service))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
