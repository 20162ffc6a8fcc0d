"""One function per verb: load the profile and inventory, select hosts, run per host, render.

Each per-host pipeline opens ONE connection and reuses it for facts, apply and verify.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape

from provisioner.config import LoadedProfile, load_profile, profile_for_host, schema_text, validate_files
from provisioner.config.inventory import Host, hosts_for
from provisioner.config.load import default_profile
from provisioner.config.model import ClassSpeedSpec, Profile
from provisioner.connection import ConnectOptions, open_connection
from provisioner.connection.base import Connection
from provisioner.errors import ApplyError, ConnectError, UsageError
from provisioner.plan import render
from provisioner.plan.build import HostPlan, build_plan, probe_for
from provisioner.plan.fleet import run_fleet

T = TypeVar("T")
EXIT_OK, EXIT_FAILED, EXIT_CHANGED, EXIT_BAD_INPUT = 0, 1, 2, 3


@dataclass(frozen=True)
class Target:
    """A host and the profile as it applies to that host (after its `provision:` overlay)."""

    host: Host
    profile: Profile


def connect_options(args: argparse.Namespace) -> ConnectOptions:
    kwargs: dict[str, Any] = {
        "host_key_policy": "accept-new" if args.accept_new_host_keys else "strict",
        "ssh_config": args.ssh_config,
        "connect_timeout": args.connect_timeout,
    }
    if args.known_hosts:
        kwargs["known_hosts"] = tuple(args.known_hosts)
    return ConnectOptions(**kwargs)


def targets(args: argparse.Namespace, loaded: LoadedProfile | None = None) -> list[Target]:
    """Profile + inventory + patterns → the hosts to work on, each with its own profile (its
    `provision:` overlay merged and validated). Without a profile (`provision facts -i INV`) the
    defaults stand in for one."""
    if not args.profile and not args.inventory:
        raise UsageError("no inventory: give -i INVENTORY, or a profile that names one")
    loaded = loaded or (load_profile(Path(args.profile)) if args.profile else default_profile())
    mark = loaded.marks.get(("hosts",))
    where = f"{mark.file}:{mark.line}:{mark.col}: hosts" if mark else None
    return [Target(host, profile_for_host(loaded, host))
            for host in hosts_for(loaded.profile, args.inventory, args.limit, where)]


@contextmanager
def connected(target: Target, options: ConnectOptions) -> Iterator[Connection]:
    conn = open_connection(target.host, options)
    try:
        yield conn
    finally:
        conn.close()


def fleet(args: argparse.Namespace, chosen: list[Target], work: Callable[[Target], T], *,
          failed: Callable[[T], bool] = lambda _: False, canary: int | None = None,
          stop: Callable[[dict[str, T | BaseException]], str | None] | None = None) -> dict[str, T | BaseException]:
    by_name = {t.host.name: t for t in chosen}
    hosts = [t.host for t in by_name.values()]
    return run_fleet(hosts, lambda h: work(by_name[h.name]), forks=args.forks,
                     serial=getattr(args, "serial", None),
                     max_fail_percentage=getattr(args, "max_fail_percentage", None), failed=failed,
                     canary=canary, stop=stop)


# --- verbs ---------------------------------------------------------------------------------

def refresh_hub(args: argparse.Namespace) -> None:
    """`--refresh-hub`: forget which commit each model repo's main was, so this run asks again."""
    if getattr(args, "refresh_hub", False):
        from provisioner.resources import hub, hub_cache

        hub_cache.forget_refs()
        hub.clear_cache()


def plan(args: argparse.Namespace, console: Console) -> int:
    from provisioner.facts.gather import gather

    options = connect_options(args)
    refresh_hub(args)

    def work(target: Target) -> HostPlan:
        with connected(target, options) as conn:
            return build_plan(target.profile, gather(conn, target.profile, probe_for(target.profile)))

    results = fleet(args, targets(args), work)
    show_plans(results, console, args)
    return plan_exit_code(results)


def show_plans(results: dict[str, HostPlan | BaseException], console: Console,
               args: argparse.Namespace) -> None:
    if args.json:
        print(render.results_to_json(results))
    for name, result in results.items():
        if isinstance(result, HostPlan):
            render.render_host(console, result, verbose=bool(args.verbose))
        else:
            render.render_failure(console, name, result)
    console.print(render.summary_line(results))


def plan_exit_code(results: dict[str, HostPlan | BaseException]) -> int:
    if any(not isinstance(r, HostPlan) or r.errors for r in results.values()):
        return EXIT_FAILED
    return EXIT_CHANGED if any(r.changes for r in results.values() if isinstance(r, HostPlan)) else EXIT_OK


def apply(args: argparse.Namespace, console: Console) -> int:
    """Converge, verify; under a verify gate (`--verify-gate`, `rollout.verify_gate`), roll back a
    host whose change failed verification and stop the rollout after its batch."""
    if args.check:
        return plan(args, console)
    from provisioner.plan.rollout import gate_stop

    loaded = load_profile(Path(args.profile))
    rollout = loaded.profile.rollout
    gate = bool(args.verify_gate or rollout.verify_gate)
    canary = args.canary if args.canary is not None else rollout.canary
    if gate and args.no_verify:
        raise UsageError("--verify-gate needs the verification: drop --no-verify "
                         f"(or set rollout.verify_gate: false in {args.profile})")
    return run_apply(args, console, targets(args, loaded), gate=gate, canary=canary,
                     stop=gate_stop if gate else None)


def rollback(args: argparse.Namespace, console: Console) -> int:
    """Restore each host to a snapshot (`--to ID`, else the one before its last apply), planned
    like an apply: `--check` shows the diff; then lock, changes, restart, confirm, verify."""
    from provisioner.plan.rollback import rollback_planner

    if args.check:
        options = connect_options(args)

        def work(target: Target) -> HostPlan:
            with connected(target, options) as conn:
                return rollback_planner(target.profile, args.to)(conn)

        results = fleet(args, targets(args), work)
        show_plans(results, console, args)
        return plan_exit_code(results)
    return run_apply(args, console, targets(args), gate=False, canary=None, stop=None,
                     planner=lambda profile: rollback_planner(profile, args.to))


def run_apply(args: argparse.Namespace, console: Console, chosen: list[Target], *, gate: bool,
              canary: int | None, stop: Callable[[dict[str, Any]], str | None] | None,
              planner: Callable[[Profile], Any] | None = None) -> int:
    """Each host through `plan/rollout.run_host` (apply, verify, roll back under the gate), the
    summary, then the verification's report."""
    from provisioner.plan.progress import Reporter
    from provisioner.plan.rollout import HostRollout, run_host

    options = connect_options(args)
    refresh_hub(args)
    reporter = Reporter(console, log_dir=Path(args.log_dir) if args.log_dir else None,
                        verbose=bool(args.verbose))
    shown = threading.Lock()

    def show(plan: HostPlan) -> None:
        with shown:
            render.render_host(console, plan, verbose=bool(args.verbose))

    def work(target: Target) -> HostRollout:
        with connected(target, options) as conn:
            return run_host(conn, target.profile, reporter, gate=gate, lock_timeout=args.lock_timeout,
                            verify=None if args.no_verify else run_verification, show_plan=show,
                            planner=planner(target.profile) if planner else None)

    results = fleet(args, chosen, work, failed=lambda o: o.failed, canary=canary, stop=stop)
    code = finish_apply(results, console, args)
    if args.no_verify:
        return code
    from provisioner.plan.fleet import SkippedError

    verified: dict[str, Any] = {}
    for name, result in results.items():
        if isinstance(result, BaseException) or result.verification is not None:
            verified[name] = result if isinstance(result, BaseException) else (result.facts, result.verification)
        else:
            why = f"the apply failed ({result.apply.error})" if result.apply.failed else result.error
            verified[name] = ApplyError(f"{name}: not verified: {why}")
    rollouts = {name: r.to_json() if isinstance(r, HostRollout) else
                {**LEFT, "reason": str(r)} if isinstance(r, SkippedError) else None
                for name, r in results.items()}
    if show_verification(verified, chosen, console, args, rollouts=rollouts) == EXIT_FAILED:
        return EXIT_FAILED
    return code


LEFT: dict[str, Any] = {"result": "left", "snapshot_before": None, "snapshot_after": None, "restored": None, "failed_checks": []}


def finish_apply(results: dict[str, Any], console: Console, args: argparse.Namespace) -> int:
    """The per-host lines and the summary: changed, unchanged, failed, and under a rollout that
    stopped, rolled back and left (each with why)."""
    from provisioner.plan.fleet import SkippedError
    from provisioner.plan.rollout import HostRollout

    counts = dict.fromkeys(("changed", "unchanged", "failed", "rolled back", "left"), 0)
    rows = []
    for name, result in results.items():
        row: dict[str, Any] = {"host": name}
        if isinstance(result, HostRollout):
            if result.rollback is not None:
                status = "rolled back" if result.result == "rolled_back" else "failed"
            elif result.apply.failed or result.verify_error:
                status = "failed"
            else:                      # a failed verification is shown with the verification below
                status = "changed" if result.apply.changed else "ok"
            detail = result.error or (f"{len(result.apply.applied)} changes" if result.apply.changed else "up to date")
            counts["unchanged" if status == "ok" else status] += 1
            if result.error:
                render.render_failure(console, name, ApplyError(result.error))
            row.update(status=status, detail=detail, snapshot_before=result.snapshot_before,
                       snapshot_after=result.snapshot_after)
            if result.last.diagnostics:
                row["log"] = result.last.diagnostics        # what a failed restart's log said
        elif isinstance(result, SkippedError):
            counts["left"] += 1
            row.update(status="left", detail=str(result))
            console.print(f"[bold]- {escape(name)}[/]: left: {escape(str(result))}")
        else:
            status = "unreachable" if isinstance(result, ConnectError) else "failed"
            counts["failed"] += 1
            row.update(status=status, detail=str(result))
            render.render_failure(console, name, result)
        rows.append(row)
    total = len(results)
    summary = (f"{total} host{'s' * (total != 1)}: {counts['changed']} changed, {counts['unchanged']} unchanged, "
               f"{counts['failed']} failed")
    if counts["rolled back"] or counts["left"]:
        summary += f", {counts['rolled back']} rolled back, {counts['left']} left"
    console.print(summary)
    if args.json:
        print(json.dumps({"summary": summary, "hosts": rows}, indent=2))
    if counts["failed"] or counts["rolled back"] or counts["left"]:
        return EXIT_FAILED
    return EXIT_CHANGED if counts["changed"] else EXIT_OK


def history(args: argparse.Namespace, console: Console) -> int:
    """Each host's snapshots, oldest first, with what changed since the one before; then whether
    the host still runs what the newest recorded. One round trip per host."""
    from provisioner.facts.snapshots import HostSnapshots, read_snapshots
    from provisioner.resources.snapshot import differences

    options = connect_options(args)

    def work(target: Target) -> HostSnapshots:
        with connected(target, options) as conn:
            return read_snapshots(conn, target.profile, now=True)

    results = fleet(args, targets(args), work)
    out: dict[str, Any] = {}
    for name, found in results.items():
        if isinstance(found, BaseException):
            render.render_failure(console, name, found)
            out[name] = {"error": str(found)}
            continue
        console.print(f"[bold]{escape(name)}[/]: {len(found.snapshots)} snapshot{'s' * (len(found.snapshots) != 1)}")
        entries: list[dict[str, Any]] = []
        previous = None
        for snap in found.snapshots:
            lines: list[str] = differences(previous.state, snap.state) if previous else []
            console.print(f"  [cyan]{snap.id}[/]  {escape(snap.time)}  {escape(snap.taken):<15}  "
                          f"profile {escape(snap.profile or '?')}"
                          + ("" if previous is None or lines else "  [dim](same as the one before)[/]"))
            for line in lines:
                console.print(f"      {escape(line)}", highlight=False)
            entries.append({"id": snap.id, "time": snap.time, "taken": snap.taken, "profile": snap.profile,
                            "changes": lines if previous else None, "unkept": dict(snap.unkept)})
            previous = snap
        now = differences(previous.state, found.now) if previous and found.now else None
        if now is not None:
            console.print("  now: " + ("[green]as the newest snapshot[/]" if not now else "[yellow]changed since:[/]"))
            for line in now:
                console.print(f"      {escape(line)}", highlight=False)
        for error in found.errors:
            console.print(f"  [yellow]unreadable: {escape(error)}[/]")
        out[name] = {"snapshots": entries, "changed_since_newest": now, "errors": list(found.errors)}
    if args.json:
        print(json.dumps(out, indent=2))
    return EXIT_FAILED if any(isinstance(r, BaseException) for r in results.values()) else EXIT_OK


def facts(args: argparse.Namespace, console: Console) -> int:
    from provisioner.facts.gather import base_probe, gather
    from provisioner.facts.parse import facts_to_json
    from provisioner.facts.render import render_facts

    options = connect_options(args)

    def work(target: Target) -> Any:
        probe = probe_for(target.profile) if args.profile else base_probe(target.profile)
        with connected(target, options) as conn:
            return gather(conn, target.profile, probe)

    results = fleet(args, targets(args), work)
    if args.json:
        print(json.dumps({name: (facts_to_json(r) if not isinstance(r, BaseException)
                                 else {"error": str(r), "unreachable": isinstance(r, ConnectError)})
                          for name, r in results.items()}, indent=2))
    else:
        render_facts(results, console)  # type: ignore[arg-type]  # Facts or the host's exception
    return EXIT_FAILED if any(isinstance(r, BaseException) for r in results.values()) else EXIT_OK


def verify(args: argparse.Namespace, console: Console) -> int:
    from provisioner.facts.gather import gather

    options = connect_options(args)
    against = previous_report(args.compare) if args.compare else None
    if args.promote_reference and not args.report:
        raise UsageError("--promote-reference needs --report DIR: the references live in DIR/references/")

    def work(target: Target) -> tuple[Any, Any]:
        with connected(target, options) as conn:
            facts = gather(conn, target.profile, probe_for(target.profile))
            return facts, run_verification(conn, target.profile, facts)

    chosen = targets(args)
    if args.promote_reference and args.promote_reference not in {t.host.name for t in chosen}:
        raise UsageError(f"--promote-reference {args.promote_reference}: not one of the hosts verified "
                         f"({', '.join(sorted(t.host.name for t in chosen)) or 'none'}); name one of them")
    return show_verification(fleet(args, chosen, work), chosen, console, args, against)


def previous_report(path: str) -> dict[str, Any]:
    """`--compare OLD_REPORT`: a report.json this version can compare with, or bad input."""
    from provisioner.report import read_previous

    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UsageError(f"--compare {path}: {err.strerror or err} (give a report.json written by "
                         "provision verify --report)") from None
    previous, why = read_previous(data)
    if previous is None:
        raise UsageError(f"--compare {path}: {why}")
    return previous


def run_verification(conn: Connection, profile: Profile, facts: Any) -> Any:
    """Render the profile's first workflow for this host and run the verification generations."""
    from provisioner.resources import workflow
    from provisioner.verify.run import verify_host

    graph = workflow.render(profile, facts, profile.workflow.templates[0])
    return verify_host(conn, profile, facts, workflow_graph=graph)


def show_verification(results: dict[str, Any], chosen: list[Target], console: Console,
                      args: argparse.Namespace, against: dict[str, Any] | None = None,
                      rollouts: dict[str, Any] | None = None) -> int:
    """Image agreement against the references, the console table and check lines (failures first),
    the fleet's flags, the report directory; exit 0 or 1. `against`: the report to compare with
    (`--compare`), else the report directory's own; `rollouts`: what an apply did to each host."""
    from datetime import datetime, timezone

    from provisioner.report import build_report, dumps, from_exception, from_verification, write_report
    from provisioner.report.compare import with_comparison
    from provisioner.report.references import ReferenceStore, agree
    from provisioner.verify.render import render_verification

    profiles = {t.host.name: t.profile for t in chosen}
    report_dir = getattr(args, "report", None)
    when = datetime.now(timezone.utc)
    verified = {n: r[1] for n, r in results.items() if not isinstance(r, BaseException)}
    outcome = agree(verified, ReferenceStore(report_dir) if report_dir else None,
                    {n: p.verify.agreement for n, p in profiles.items()},
                    now=when.strftime("%Y-%m-%dT%H:%M:%SZ"), promote=getattr(args, "promote_reference", None))
    results = {n: r if isinstance(r, BaseException) else (r[0], outcome.verifications[n]) for n, r in results.items()}
    entries = []
    rollouts = rollouts or {}
    for name, result in results.items():
        profile, rollout = profiles.get(name), rollouts.get(name)
        if isinstance(result, BaseException):
            left = bool(rollout and rollout.get("result") == "left")
            entries.append(from_exception(name, result, profile=profile, left=left, rollout=rollout))
        else:
            facts, verification = result
            entries.append(from_verification(name, facts, verification, profile=profile, rollout=rollout))
    # A host a rollout left was not verified: the summary above says so, the report lists it.
    failed = render_verification({n: r for n, r in results.items()
                                  if (rollouts.get(n) or {}).get("result") != "left"}, console)
    report = build_report(entries, profile=chosen[0].profile.name if chosen else None, generated_at=when,
                          class_speed=chosen[0].profile.verify.class_speed if chosen else ClassSpeedSpec())
    if against is not None:
        report = with_comparison(report, against)
    if report_dir:
        report = write_report(report_dir, report, compared=against is not None).report
    for note in outcome.notes:
        console.print(f"[cyan]{escape(note)}[/]")
    for line, colour in [(f.line, "yellow") for f in report.fleet] + [(f.line, "red") for f in report.regressions] \
            + [(f.line, "cyan") for f in report.changes]:
        console.print(f"[{colour}]{escape(line)}[/]")
    for problem in outcome.problems:
        console.print(f"[red]error:[/] {escape(problem)}")
    if args.json and args.verb == "verify":  # apply and rollback print their own JSON summary
        print(dumps(report), end="")
    if report_dir:
        console.print(f"report: {Path(report_dir) / 'report.html'} (report.json, junit.xml)")
    return EXIT_FAILED if failed or outcome.problems else EXIT_OK


def validate(args: argparse.Namespace, console: Console) -> int:
    problems = validate_files([Path(f) for f in args.files])
    for problem in problems:
        console.print(escape(str(problem)), highlight=False)
    n = len(args.files)
    if problems:
        console.print(f"[red]{len(problems)} problem{'s' * (len(problems) != 1)}[/] in {n} file{'s' * (n != 1)}")
        return EXIT_BAD_INPUT
    console.print(f"[green]ok[/]: {n} file{'s' * (n != 1)} valid")
    return EXIT_OK


def schema(args: argparse.Namespace, console: Console) -> int:
    if args.markdown:
        from provisioner.config.schema_doc import markdown

        print(markdown(args.kind), end="")
    else:
        print(schema_text(args.kind))
    return EXIT_OK

