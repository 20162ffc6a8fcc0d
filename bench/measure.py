"""Run one tool invocation: wall time, exit code, and the peak RSS of its whole process tree."""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
SAMPLE_EVERY_S = 0.05


@dataclass(frozen=True)
class Sample:
    seconds: float
    returncode: int
    peak_rss_mb: float
    output: str


def _tree_rss(root: int) -> int:
    """Bytes resident in `root` and all its descendants (from /proc: no psutil needed)."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            statm = Path(entry.path, "statm").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid ...
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        rss[pid] = int(statm.split()[1]) * PAGE
    tree, frontier = {root}, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(rss.get(pid, 0) for pid in tree)


def tool_environ(**extra: str) -> dict[str, str]:
    """The environment a tool runs in: ours, minus PYTHONDONTWRITEBYTECODE.

    Some CI images set it; an editable install (provision here) then recompiles every module on
    every start, while the peers, installed by pip, ship compiled bytecode. A user's install has
    bytecode for all three.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **extra}


def run_timed(argv: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
              timeout: float = 900) -> Sample:
    """Run argv to completion; the sampler thread polls the tree's RSS every 50 ms."""
    peak = 0
    done = threading.Event()
    started = time.perf_counter()
    proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env) if env is not None else None,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def sample() -> None:
        nonlocal peak
        while not done.wait(SAMPLE_EVERY_S):
            peak = max(peak, _tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate(timeout=timeout)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return Sample(seconds, proc.returncode, peak / 2**20, out.decode(errors="replace"))


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
