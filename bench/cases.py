"""The timed cases on one fleet size: floor, first converge, no-op re-run, plan after a change, apply
of a one-change move (the plugin's tag, back and forth).

Tools take turns inside every repetition (provision, ansible, pyinfra, provision, ...), so a burst
of load from elsewhere on the machine hits all of them alike and the ratios stay meaningful.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from bench.hosts import ToolFleet, floor_seconds
from bench.measure import Sample, median, run_timed
from bench.state import DesiredState


class Tool(Protocol):
    name: str
    fleet: ToolFleet
    work: Any

    def write(self, state: DesiredState) -> None: ...
    def apply_argv(self) -> list[str]: ...
    def plan_argv(self) -> list[str]: ...
    def env(self) -> dict[str, str]: ...
    def before_run(self) -> None: ...
    def ok(self, verb: str, code: int) -> bool: ...
    def snapshot_share(self) -> float | None: ...


@dataclass
class CaseResult:
    hosts: int
    case: str                     # floor | converge | noop | plan | change
    tool: str
    seconds: list[float] = field(default_factory=list)
    connections: list[float] = field(default_factory=list)   # per host, per run
    sessions: list[float] = field(default_factory=list)      # exec/sftp channels per host, per run
    peak_mb: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    snapshot_share: list[float] = field(default_factory=list)  # provision: snapshots' seconds / apply's

    @property
    def median_s(self) -> float:
        return median(self.seconds)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "median_s": self.median_s}


def failure_lines(output: str) -> str:
    """What a failed run said about failing, else its last lines (a fleet's last host may have passed)."""
    lines = output.strip().splitlines()
    failed = [line for line in lines if any(mark in line for mark in ("✗", " FAIL ", "failed", "rolling back"))]
    return "\n".join((failed or lines)[-25:])


def _once(tool: Tool, verb: str, result: CaseResult) -> None:
    tool.before_run()
    marks = tool.fleet.log_marks()
    argv = tool.apply_argv() if verb == "apply" else tool.plan_argv()
    sample: Sample = run_timed(argv, cwd=tool.work, env=tool.env())
    conns, sessions = tool.fleet.counts(marks)
    result.seconds.append(sample.seconds)
    result.connections.append(conns)
    result.sessions.append(sessions)
    result.peak_mb.append(sample.peak_rss_mb)
    share = tool.snapshot_share() if verb == "apply" else None
    if share is not None:
        result.snapshot_share.append(share)
    if not tool.ok(verb, sample.returncode):
        result.failures.append(f"exit {sample.returncode}")
        print(f"  ! {tool.name} {result.case} failed (exit {sample.returncode}):\n{failure_lines(sample.output)}",
              file=sys.stderr)
    print(f"  {result.case:8} {tool.name:9} {sample.seconds:7.2f} s  {conns:.0f} conn/host  "
          f"{sessions:.0f} exec/host  {sample.peak_rss_mb:.0f} MB", file=sys.stderr, flush=True)


def run_cases(tools: list[Tool], state: DesiredState, *, converge_runs: int, noop_runs: int,
              plan_runs: int) -> list[CaseResult]:
    n = len(tools[0].fleet.hosts)
    floor = CaseResult(n, "floor", "ssh true")
    for _ in range(noop_runs):
        floor.seconds.append(floor_seconds(tools[0].fleet))
    print(f"  floor    ssh true  {floor.median_s:7.2f} s (median)", file=sys.stderr)
    results = {case: {t.name: CaseResult(n, case, t.name) for t in tools}
               for case in ("converge", "noop", "plan", "change")}
    for tool in tools:
        tool.write(state)
    for _ in range(converge_runs):
        for tool in tools:
            tool.fleet.reset()
            _once(tool, "apply", results["converge"][tool.name])
    for _ in range(noop_runs):
        for tool in tools:
            _once(tool, "apply", results["noop"][tool.name])
    for tool in tools:
        tool.write(state.changed())
    for _ in range(plan_runs):
        for tool in tools:
            _once(tool, "plan", results["plan"][tool.name])
    for i in range(plan_runs):           # one change each time: the tag there, then back
        for tool in tools:
            tool.write(state.tag_moved() if i % 2 == 0 else state)
            _once(tool, "apply", results["change"][tool.name])
    for tool in tools:
        tool.write(state)
    return [floor, *(r for by_tool in results.values() for r in by_tool.values())]
