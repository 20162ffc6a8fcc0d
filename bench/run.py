"""Benchmark provision against Ansible and pyinfra on real loopback sshd hosts (issue 7).

    .venv/bin/python bench/run.py --hosts 1,10 --runs 5

Builds the sandbox world (Hub, release and git stand-ins, wheelhouse; a ~50 MB DiT file), gives
each tool its own N sandbox hosts behind N sshd servers, expresses one desired state in all three,
and times: first converge, no-op re-run, plan after a change (template value + git tag), apply of one
change (git tag), plus the `ssh host true` floor, a 1 GiB push / hash throughput test and the upgrade
wave (bench/wave.py: a tag move on 10 hosts, each verified by a generation). Peers are installed into
bench/.venvs/ on first use. Results: bench/results/<stamp>/results.json and tables.md.
"""

from __future__ import annotations

import argparse
import os
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` and `provisioner` importable

from bench import report  # noqa: E402
from bench.cases import CaseResult, Tool, run_cases  # noqa: E402
from bench.hosts import ToolFleet, make_tool_fleet  # noqa: E402
from bench.state import desired_state  # noqa: E402
from bench.tool_ansible import AnsibleTool  # noqa: E402
from bench.tool_provision import ProvisionTool  # noqa: E402
from bench.tool_pyinfra import PyinfraTool  # noqa: E402
from provisioner.sandbox.world import World, start_world  # noqa: E402

TOOLS = ("provision", "ansible", "pyinfra")
MODEL_BYTES = 50 * 10**6        # the DiT stand-in; the text encoder and VAE get a quarter each


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", default="1,10", help="fleet sizes, comma-separated (default 1,10)")
    p.add_argument("--runs", type=int, default=5, help="no-op and floor repetitions (default 5)")
    p.add_argument("--converge-runs", type=int, default=3, help="first-converge repetitions (default 3)")
    p.add_argument("--plan-runs", type=int, default=3, help="plan-after-change repetitions (default 3)")
    p.add_argument("--tools", default=",".join(TOOLS), help="subset of provision,ansible,pyinfra")
    p.add_argument("--throughput-mib", type=int, default=1024, help="file size for push/hash (0: skip)")
    p.add_argument("--throughput-runs", type=int, default=3)
    p.add_argument("--download-mib", type=int, default=1024, help="file size for the download test (0: skip)")
    p.add_argument("--verify-runs", type=int, default=3, help="`provision verify` overhead runs (0: skip)")
    p.add_argument("--wave-hosts", type=int, default=10,
                   help="hosts per tool of the upgrade wave: one plugin tag move, verified (0: skip)")
    p.add_argument("--wave-runs", type=int, default=3, help="upgrade-wave repetitions per tool (default 3)")
    p.add_argument("--solo-hosts", default="50",
                   help="fleet sizes run by provision alone, after the others (default 50; '' skips)")
    p.add_argument("--solo-runs", type=int, default=3, help="no-op, plan and floor runs at the solo sizes")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    return p.parse_args(argv)


def make_tool(name: str, fleet: ToolFleet, work: Path, world: World) -> Tool:
    if name == "provision":
        return ProvisionTool(fleet, work, world.backend_repo_url)
    if name == "ansible":
        return AnsibleTool(fleet, work)
    return PyinfraTool(fleet, work)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(x) for x in args.hosts.split(",") if x]
    names = [t for t in args.tools.split(",") if t]
    if unknown := set(names) - set(TOOLS):
        print(f"unknown tool(s) {sorted(unknown)}; choose from {', '.join(TOOLS)}", file=sys.stderr)
        return 3
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    info = report.machine(names)
    print(f"machine: {info}", file=sys.stderr)
    started = time.monotonic()
    results: list[CaseResult] = []
    throughput = download = verify = wave = None
    solo = [int(x) for x in args.solo_hosts.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="provision-bench-") as tmp:
        root = Path(tmp)
        world = start_world(root / "world", model_bytes=MODEL_BYTES)
        try:
            state = desired_state(world)
            rounds = [(n, names, args.converge_runs, args.runs, args.plan_runs) for n in sizes]
            rounds += [(n, ["provision"], 1, args.solo_runs, args.solo_runs) for n in solo]
            for n, these, converge_runs, noop_runs, plan_runs in rounds:
                print(f"== {n} host{'s' * (n != 1)}: {', '.join(these)}", file=sys.stderr)
                fleets = [make_tool_fleet(t, n, root / f"{t}-{n}", world) for t in these]
                try:
                    tools = [make_tool(t, f, root / f"{t}-{n}" / "work", world) for t, f in zip(these, fleets)]
                    results += run_cases(tools, state, converge_runs=converge_runs,
                                         noop_runs=noop_runs, plan_runs=plan_runs)
                finally:
                    for tool_fleet in fleets:
                        tool_fleet.stop()
                    for t in these:
                        shutil.rmtree(root / f"{t}-{n}", ignore_errors=True)
            if args.throughput_mib:
                print(f"== throughput ({args.throughput_mib} MiB)", file=sys.stderr)
                fleet = make_tool_fleet("push", 1, root / "push", world)
                try:
                    from bench.throughput import measure
                    throughput = measure(fleet, args.throughput_mib, args.throughput_runs)
                finally:
                    fleet.stop()
            if args.download_mib:
                print(f"== download ({args.download_mib} MiB)", file=sys.stderr)
                from bench.download import measure as measure_download
                download = measure_download(args.download_mib, args.throughput_runs)
            if args.wave_hosts and args.wave_runs:
                print(f"== upgrade wave ({args.wave_hosts} hosts per tool)", file=sys.stderr)
                from bench.wave import measure as measure_wave
                wave = measure_wave(root / "wave", args.wave_hosts, args.wave_runs, names)
            if args.verify_runs:
                print("== verify overhead", file=sys.stderr)
                from bench.verify import measure as measure_verify
                verify = measure_verify(root / "verify", args.verify_runs)
        finally:
            world.stop()
    info["load_after"] = os.getloadavg()
    info["wall_s"] = round(time.monotonic() - started)
    tables = "\n\n".join([report.table(results), report.snapshot_table(results)]
                           + ([report.throughput_table(throughput)] if throughput else [])
                           + ([report.download_table(download)] if download else [])
                           + ([report.verify_table(verify)] if verify else [])
                           + ([report.wave_table(wave)] if wave else [])
                           + [report.goals_table(results, throughput, download, verify)])
    (out / "results.json").write_text(json.dumps({
        "machine": info, "args": vars(args), "cases": [r.as_json() for r in results],
        "throughput": throughput, "download": download, "verify": verify, "wave": wave}, indent=1))
    (out / "tables.md").write_text(tables + "\n")
    print(tables)
    print(f"\nmachine: {json.dumps(info)}\nresults in {out}", file=sys.stderr)
    failed = any(r.failures for r in results) or bool(wave and any(wave["failures"].values()))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
