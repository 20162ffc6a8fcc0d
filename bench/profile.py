"""Where a first converge's time goes, per host: provision alone on N fresh sandbox hosts.

    .venv/bin/python bench/profile.py --hosts 1,10 --runs 2

For each run: the wall time, the controller's CPU (the `provision` process and what it waited
for), each host's CPU (what its sshd reaped: sshd's own work, the login shell, the supervisors
and every program they ran), the execs per host (sshd's session lines), and from provision's
JSON-lines logs the seconds of each kind of step (the snapshots, pip, downloads, the restart...)
summed over the hosts. The numbers of docs/performance.md's "First converge" section.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` and `provisioner` importable

from bench.hosts import make_tool_fleet  # noqa: E402
from bench.measure import median, run_timed  # noqa: E402
from bench.state import desired_state  # noqa: E402
from bench.run import make_tool  # noqa: E402
from bench.tool_provision import log_records, step_kind  # noqa: E402
from provisioner.sandbox.world import start_world  # noqa: E402

MODEL_BYTES = 50 * 10**6        # as bench/run.py
TICK = os.sysconf("SC_CLK_TCK")

def reaped_cpu_s(pid: int) -> float:
    """CPU seconds of the children `pid` waited for (cutime + cstime), from /proc."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[13]) + int(fields[14])) / TICK


def step_seconds(log_dir: Path) -> dict[str, float]:
    """Seconds per kind of step, summed over every host's log."""
    out: dict[str, float] = defaultdict(float)
    for record in log_records(log_dir):
        if record.get("event") == "step":
            out[step_kind(record.get("step", ""))] += record.get("seconds", 0.0)
    return dict(out)


def profile(n: int, runs: int, root: Path, world, state, keep_logs: Path | None = None,
            name: str = "provision") -> list[dict]:
    fleet = make_tool_fleet(name, n, root / f"{name}-{n}", world)
    try:
        tool = make_tool(name, fleet, root / f"{name}-{n}" / "work", world)
        tool.write(state)
        out = []
        for _ in range(runs):
            fleet.reset()
            shutil.rmtree(tool.work / "logs", ignore_errors=True)
            tool.before_run()
            marks = fleet.log_marks()
            host_before = [reaped_cpu_s(h.sshd.process.pid) for h in fleet.hosts]
            ctl_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            sample = run_timed(tool.apply_argv(), cwd=tool.work, env=tool.env())
            ctl_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if not tool.ok("apply", sample.returncode):
                raise SystemExit(f"{name} apply failed (exit {sample.returncode}):\n{sample.output[-3000:]}")
            _, execs = fleet.counts(marks)
            host_cpu = [reaped_cpu_s(h.sshd.process.pid) - b for h, b in zip(fleet.hosts, host_before)]
            row = {"tool": name, "hosts": n, "wall_s": round(sample.seconds, 2), "execs_per_host": execs,
                   "controller_cpu_s": round(ctl_after.ru_utime + ctl_after.ru_stime
                                             - ctl_before.ru_utime - ctl_before.ru_stime, 2),
                   "host_cpu_s_per_host": round(sum(host_cpu) / n, 2),
                   "step_s_per_host": {k: round(v / n, 2) for k, v in sorted(step_seconds(tool.work / "logs").items())},
                   "load": os.getloadavg()[0]}
            print(json.dumps(row), file=sys.stderr, flush=True)
            if keep_logs and name == "provision":
                shutil.copytree(tool.work / "logs", keep_logs / f"{n}-hosts-run-{len(out) + 1}", dirs_exist_ok=True)
            out.append(row)
        return out
    finally:
        fleet.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", default="1,10", help="fleet sizes, comma-separated (default 1,10)")
    p.add_argument("--runs", type=int, default=2, help="first converges per size (default 2)")
    p.add_argument("--tool", default="provision", choices=("provision", "ansible", "pyinfra"),
                   help="whose first converge (default provision; the peers' rows have no step seconds)")
    p.add_argument("--keep-logs", type=Path, help="copy each run's JSON-lines logs under this folder")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="provision-profile-") as tmp:
        world = start_world(Path(tmp) / "world", model_bytes=MODEL_BYTES)
        try:
            state = desired_state(world)
            for n in (int(x) for x in args.hosts.split(",") if x):
                rows += profile(n, args.runs, Path(tmp), world, state, args.keep_logs, args.tool)
        finally:
            world.stop()
    for n in sorted({r["hosts"] for r in rows}):
        these = [r for r in rows if r["hosts"] == n]
        print(f"{n} host(s): wall {median([r['wall_s'] for r in these]):.2f} s (median of {len(these)}), "
              f"{these[0]['execs_per_host']:.0f} execs/host, "
              f"host CPU {median([r['host_cpu_s_per_host'] for r in these]):.2f} s/host, "
              f"controller CPU {median([r['controller_cpu_s'] for r in these]):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
