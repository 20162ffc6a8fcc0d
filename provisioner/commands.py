"""One function per verb: load the profile and inventory, select hosts, run per host, render.

Each per-host pipeline opens ONE connection and reuses it for facts, apply and verify. A run that
Ctrl-C or SIGTERM stops (`Stop`) says, host by host, what was done and what was not, and exits 130.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape

from provisioner.config import load_profile, profile_for_host, schema_text, validate_files
from provisioner.config.inventory import Host, hosts_for
from provisioner.config.load import default_profile
from provisioner.config.model import ClassSpeedSpec, Profile
from provisioner.connection import ConnectOptions, open_connection
from provisioner.connection.base import Connection
from provisioner.errors import ApplyError, ConnectError, Interrupted, UsageError
from provisioner.plan import render
from provisioner.plan.build import HostPlan, build_plan, probe_for
from provisioner.plan.fleet import Stop, run_fleet

T = TypeVar("T")
EXIT_OK, EXIT_FAILED, EXIT_CHANGED, EXIT_BAD_INPUT = 0, 1, 2, 3
EXIT_INTERRUPTED = 130      # as a shell says for SIGINT


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
        "heartbeat_s": args.heartbeat,
    }
    if args.known_hosts:
        kwargs["known_hosts"] = tuple(args.known_hosts)
    return ConnectOptions(**kwargs)


def targets(args: argparse.Namespace) -> list[Target]:
    """Profile + inventory + patterns → the hosts to work on, each with its own profile (its
    `provision:` overlay merged and validated). Without a profile (`provision facts -i INV`) the
    defaults stand in for one."""
    if not args.profile and not args.inventory:
        raise UsageError("no inventory: give -i INVENTORY, or a profile that names one")
    loaded = load_profile(Path(args.profile)) if args.profile else default_profile()
    mark = loaded.marks.get(("hosts",))
    where = f"{mark.file}:{mark.line}:{mark.col}: hosts" if mark else None
    return [Target(host, profile_for_host(loaded, host))
            for host in hosts_for(loaded.profile, args.inventory, args.limit, where)]


@contextmanager
def connected(target: Target, options: ConnectOptions, stop: Stop) -> Iterator[Connection]:
    """The host's one connection; aborted at once should the run be stopped (Ctrl-C, SIGTERM)."""
    stop.check(target.host.name)
    conn = open_connection(target.host, options)
    try:
        with stop.watch(target.host.name, conn):
            yield conn
    finally:
        conn.close()


def fleet(args: argparse.Namespace, chosen: list[Target], work: Callable[[Target], T], stop: Stop, *,
          failed: Callable[[T], bool] = lambda _: False) -> dict[str, T | BaseException]:
    by_name = {t.host.name: t for t in chosen}
    hosts = [t.host for t in by_name.values()]
    return run_fleet(hosts, lambda h: work(by_name[h.name]), forks=args.forks,
                     serial=getattr(args, "serial", None),
                     max_fail_percentage=getattr(args, "max_fail_percentage", None), failed=failed,
                     stop=stop)


def cut_short(name: str, result: object, stop: Stop) -> str | None:
    """In a stopped run: "interrupted" (it was running) or "not started"; None: it was done."""
    if not stop.why:
        return None
    if name in stop.running:
        return "interrupted"
    return "not started" if isinstance(result, Interrupted) else None


def show_stopped(results: dict[str, Any], stop: Stop, console: Console) -> int:
    """A stopped plan, facts or verify: each host's one line, the count, exit 130."""
    counts: Counter[str] = Counter()
    for name, result in results.items():
        state = cut_short(name, result, stop) or "done"
        counts[state] += 1
        if state == "done" and isinstance(result, BaseException):
            render.render_failure(console, name, result)
        elif state != "done":
            console.print(f"[yellow]{escape(name)}[/]: {state}", highlight=False)
    console.print(stopped_summary(stop, len(results), counts))
    return EXIT_INTERRUPTED


def stopped_summary(stop: Stop, total: int, counts: Counter[str], done: str = "") -> str:
    return (f"interrupted ({stop.why}): {total} host{'s' * (total != 1)}: {counts['done']} done{done}, "
            f"{counts['interrupted']} interrupted, {counts['not started']} not started")


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
    stop = Stop()

    def work(target: Target) -> HostPlan:
        with connected(target, options, stop) as conn:
            return build_plan(target.profile, gather(conn, target.profile, probe_for(target.profile)))

    results = fleet(args, targets(args), work, stop)
    if stop.why:
        return show_stopped(results, stop, console)
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
    if args.check:
        return plan(args, console)
    from provisioner.plan.apply import HostOutcome, apply_host
    from provisioner.plan.progress import Reporter

    options = connect_options(args)
    refresh_hub(args)
    reporter = Reporter(console, log_dir=Path(args.log_dir) if args.log_dir else None,
                        verbose=bool(args.verbose))
    shown = threading.Lock()

    def show(plan: HostPlan) -> None:
        with shown:
            render.render_host(console, plan, verbose=bool(args.verbose))

    stop = Stop()

    def work(target: Target) -> HostOutcome:
        with connected(target, options, stop) as conn:
            outcome = apply_host(conn, target.profile, reporter, lock_timeout=args.lock_timeout,
                                 show_plan=show)
            if not args.no_verify and not outcome.failed and not stop.why:
                reporter.line(conn.name, "verifying: generations through ComfyUI's API ...")
                outcome.verification = run_verification(conn, target.profile, outcome.facts)
            return outcome

    chosen = targets(args)
    results = fleet(args, chosen, work, stop, failed=lambda o: o.failed or o.verification_failed)
    code = finish_apply(results, console, args, stop)
    if args.no_verify or stop.why:
        return code
    verified: dict[str, Any] = {}
    for name, result in results.items():
        if isinstance(result, BaseException) or result.verification is not None:
            verified[name] = result if isinstance(result, BaseException) else (result.facts, result.verification)
        else:
            verified[name] = ApplyError(f"{name}: not verified: the apply failed ({result.error})")
    if show_verification(verified, chosen, console, args) == EXIT_FAILED:
        return EXIT_FAILED
    return code


def finish_apply(results: dict[str, Any], console: Console, args: argparse.Namespace,
                 stop: Stop | None = None) -> int:
    from provisioner.plan.apply import HostOutcome

    stop = stop or Stop()
    counts: Counter[str] = Counter()
    rows = []
    for name, result in results.items():
        cut = cut_short(name, result, stop)
        if cut == "not started":
            status, detail = cut, str(result)
            console.print(f"[yellow]{escape(name)}[/]: not started", highlight=False)
        elif isinstance(result, HostOutcome):
            status = cut or ("failed" if result.failed else "changed" if result.changed else "ok")
            if result.error is None and result.plan.errors:
                result.error = "; ".join(result.plan.errors)
            detail = result.error or (f"{len(result.applied)} changes" if result.changed else "up to date")
            if cut:
                done = ", ".join(c.resource for c in result.applied) or "none"
                detail = (f"interrupted after {len(result.applied)} of {len(result.plan.changes)} changes "
                          f"(applied: {done}); its remote commands were stopped and its lock released")
                console.print(f"[yellow]{escape(name)}[/]: {escape(detail)}", highlight=False)
            elif result.error:
                render.render_failure(console, name, ApplyError(result.error))
        else:
            status = cut or ("unreachable" if isinstance(result, ConnectError) else "failed")
            detail = str(result)
            render.render_failure(console, name, result)
        counts[status] += 1
        row: dict[str, Any] = {"host": name, "status": status, "detail": detail}
        if isinstance(result, HostOutcome) and result.diagnostics:
            row["log"] = result.diagnostics           # what a failed restart's log said
        rows.append(row)
    total = len(results)
    failed = counts["failed"] + counts["unreachable"]
    summary = (f"{total} host{'s' * (total != 1)}: {counts['changed']} changed, {counts['ok']} unchanged, "
               f"{failed} failed")
    if stop.why:
        counts["done"] = total - counts["interrupted"] - counts["not started"]
        summary = stopped_summary(stop, total, counts, f" ({counts['changed']} changed, {counts['ok']} "
                                                       f"unchanged, {failed} failed)")
    console.print(summary)
    if args.json:
        print(json.dumps({"summary": summary, "hosts": rows}, indent=2))
    if stop.why:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed else EXIT_CHANGED if counts["changed"] else EXIT_OK


def facts(args: argparse.Namespace, console: Console) -> int:
    from provisioner.facts.gather import base_probe, gather
    from provisioner.facts.parse import facts_to_json
    from provisioner.facts.render import render_facts

    options = connect_options(args)
    stop = Stop()

    def work(target: Target) -> Any:
        probe = probe_for(target.profile) if args.profile else base_probe(target.profile)
        with connected(target, options, stop) as conn:
            return gather(conn, target.profile, probe)

    results = fleet(args, targets(args), work, stop)
    if stop.why:
        return show_stopped(results, stop, console)
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

    stop = Stop()

    def work(target: Target) -> tuple[Any, Any]:
        with connected(target, options, stop) as conn, ThreadPoolExecutor(max_workers=1) as pool:
            # The facts are gathered while the verification reaches ComfyUI and frees its memory.
            facts = pool.submit(gather, conn, target.profile, probe_for(target.profile))
            verification = run_verification(conn, target.profile, facts.result)
            stop.check(target.host.name)
            return facts.result(), verification

    chosen = targets(args)
    if args.promote_reference and args.promote_reference not in {t.host.name for t in chosen}:
        raise UsageError(f"--promote-reference {args.promote_reference}: not one of the hosts verified "
                         f"({', '.join(sorted(t.host.name for t in chosen)) or 'none'}); name one of them")
    results = fleet(args, chosen, work, stop)
    if stop.why:
        return show_stopped(results, stop, console)
    return show_verification(results, chosen, console, args, against)


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
    """Render the profile's first workflow for this host and run the verification generations;
    `facts` may be a function that waits for them (verify.run says why)."""
    from provisioner.resources import workflow
    from provisioner.verify.run import verify_host

    return verify_host(conn, profile, facts, workflow_graph=lambda found: workflow.render(
        profile, found, profile.workflow.templates[0]))


def show_verification(results: dict[str, Any], chosen: list[Target], console: Console,
                      args: argparse.Namespace, against: dict[str, Any] | None = None) -> int:
    """Image agreement against the references, the console table and check lines (failures first),
    the fleet's flags, the report directory; exit 0 or 1. `against`: the report to compare with
    (`--compare`), else the report directory's own."""
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
    for name, result in results.items():
        profile = profiles.get(name)
        if isinstance(result, BaseException):
            entries.append(from_exception(name, result, profile=profile))
        else:
            facts, verification = result
            entries.append(from_verification(name, facts, verification, profile=profile))
    failed = render_verification(results, console)
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
    if args.json and args.verb == "verify":  # apply prints its own JSON summary
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

