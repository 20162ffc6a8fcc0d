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

from provisioner import secrets
from provisioner.config import load_profile, profile_for_host, schema_text, validate_files
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
def connected(target: Target, options: ConnectOptions) -> Iterator[Connection]:
    conn = open_connection(target.host, options)
    try:
        yield conn
    finally:
        conn.close()


def emit(text: str, end: str = "\n") -> None:
    """Machine-readable output on stdout (--json), without any secret read in this run."""
    print(secrets.redact(text), end=end)


def read_secrets(chosen: list[Target]) -> None:
    """Read every token the chosen profiles name, before any host is touched: a token that cannot
    be sent (a control character inside) is bad input (exit 3), and every one read is redacted
    from everything this run shows or writes."""
    from provisioner.resources.releases import GITHUB_TOKEN_ENV

    for target in chosen:
        secrets.read(target.profile.huggingface.token_env)
        if any(source.kind == "github" for source in target.profile.backend.sources):
            secrets.read(GITHUB_TOKEN_ENV)


def fleet(args: argparse.Namespace, chosen: list[Target], work: Callable[[Target], T], *,
          failed: Callable[[T], bool] = lambda _: False) -> dict[str, T | BaseException]:
    by_name = {t.host.name: t for t in chosen}
    hosts = [t.host for t in by_name.values()]
    return run_fleet(hosts, lambda h: work(by_name[h.name]), forks=args.forks,
                     serial=getattr(args, "serial", None),
                     max_fail_percentage=getattr(args, "max_fail_percentage", None), failed=failed)


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

    chosen = targets(args)
    read_secrets(chosen)
    results = fleet(args, chosen, work)
    show_plans(results, console, args)
    return plan_exit_code(results)


def show_plans(results: dict[str, HostPlan | BaseException], console: Console,
               args: argparse.Namespace) -> None:
    if args.json:
        emit(render.results_to_json(results))
    for name, result in results.items():
        if isinstance(result, HostPlan):
            render.render_host(console, result, verbose=bool(args.verbose))
        else:
            render.render_failure(console, name, result)
    console.print(render.summary_line(results))


def plan_exit_code(results: dict[str, HostPlan | BaseException]) -> int:
    if any(not isinstance(r, HostPlan) or r.errors for r in results.values()):
        return EXIT_FAILED
    return EXIT_CHANGED if any(not r.converged for r in results.values() if isinstance(r, HostPlan)) else EXIT_OK


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

    def work(target: Target) -> HostOutcome:
        with connected(target, options) as conn:
            outcome = apply_host(conn, target.profile, reporter, lock_timeout=args.lock_timeout,
                                 show_plan=show)
            if not args.no_verify and not outcome.failed:
                reporter.line(conn.name, "verifying: generations through ComfyUI's API ...")
                outcome.verification = run_verification(conn, target.profile, outcome.facts)
            return outcome

    chosen = targets(args)
    read_secrets(chosen)
    results = fleet(args, chosen, work, failed=lambda o: o.failed or o.verification_failed)
    code = finish_apply(results, console, args)
    if args.no_verify:
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


def finish_apply(results: dict[str, Any], console: Console, args: argparse.Namespace) -> int:
    from provisioner.plan.apply import HostOutcome

    changed = failed = unchanged = 0
    rows = []
    for name, result in results.items():
        if isinstance(result, HostOutcome):
            status = "failed" if result.failed else "changed" if result.changed else "ok"
            if result.error is None and result.plan.errors:
                result.error = "; ".join(result.plan.errors)
            detail = result.error or (f"{len(result.applied)} changes" if result.changed else "up to date")
            changed += status == "changed"
            failed += status == "failed"
            unchanged += status == "ok"
            if result.error:
                render.render_failure(console, name, ApplyError(result.error))
        else:
            status, detail = ("unreachable" if isinstance(result, ConnectError) else "failed"), str(result)
            failed += 1
            render.render_failure(console, name, result)
        row: dict[str, Any] = {"host": name, "status": status, "detail": detail}
        if isinstance(result, HostOutcome) and result.diagnostics:
            row["log"] = result.diagnostics           # what a failed restart's log said
        rows.append(row)
    total = len(results)
    summary = (f"{total} host{'s' * (total != 1)}: {changed} changed, {unchanged} unchanged, "
               f"{failed} failed")
    console.print(summary)
    if args.json:
        emit(json.dumps({"summary": summary, "hosts": rows}, indent=2))
    return EXIT_FAILED if failed else EXIT_CHANGED if changed else EXIT_OK


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
        emit(json.dumps({name: (facts_to_json(r) if not isinstance(r, BaseException)
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
    read_secrets(chosen)                # not sent anywhere by verify: read to be redacted
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
        emit(dumps(report), end="")
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

