"""The real CLI in a subprocess with a wall-clock limit and an address-space limit, as the
reliability suite runs every case, and the figures it prints."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SECONDS = 5.0                  # each case: exit 3 within this
MEMORY = 512 << 20             # RLIMIT_AS of each run: a bomb that expands hits this, not the machine
FULL = os.environ.get("PROVISION_RELIABILITY", "") == "full"
LOCATED = re.compile(r"^(?:error: )?(?P<file>[^\n]+?):(?P<line>[1-9][0-9]*):(?P<col>[0-9]+): ")


def _limit_memory(limit: int = MEMORY) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@dataclass(frozen=True)
class Outcome:
    code: int | None           # None: killed at the time limit
    output: str                # stdout and stderr together
    seconds: float


def provision(argv: Sequence[str], cwd: Path, timeout: float = SECONDS, memory: int = MEMORY) -> Outcome:
    """`provision ARGV` run from `cwd`, bounded in time and memory (a whole apply or rollback, with
    its threads and numpy's OpenBLAS, needs more address space than reading one input does)."""
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "provisioner", *argv], cwd=cwd, capture_output=True,
                              text=True, errors="replace", timeout=timeout, preexec_fn=lambda: _limit_memory(memory),
                              env={**os.environ, "NO_COLOR": "1", "COLUMNS": "250", "OPENBLAS_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"") + (err.stderr or b"")
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        return Outcome(None, text, time.monotonic() - start)
    return Outcome(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start)


def peak_child_rss_mib() -> float:
    """The largest resident set any finished child reached (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


@dataclass
class Tally:
    """What a suite tried, what held and what did not, printed as one figure line."""

    name: str
    tried: int = 0
    held: int = 0
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0
    extra: dict[str, int] = field(default_factory=dict)
    bounded: bool = True                # runs were subprocesses under the limits

    def add(self, ok: bool, why: str, seconds: float = 0.0) -> None:
        self.tried += 1
        self.held += ok
        self.slowest = max(self.slowest, seconds)
        if not ok:
            self.failures.append(why)

    def line(self) -> str:
        more = "".join(f", {k} {v}" for k, v in self.extra.items())
        line = f"{self.name}: tried {self.tried}, held {self.held}, failed {len(self.failures)}{more}"
        if not self.bounded:
            return line
        return (f"{line}; slowest {self.slowest:.2f} s, peak child RSS {peak_child_rss_mib():.0f} MiB "
                f"(limits {SECONDS:g} s, {MEMORY >> 20} MiB address space)")
