"""One function per verb: load the profile and inventory, select hosts, run per host, render.

Each per-host pipeline opens ONE connection and reuses it for facts, apply and verify. A run that
Ctrl-C or SIGTERM stops (`Stop`) says, host by host, what was done and what was not, and exits 130.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import json
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape

from provisioner import secrets
from provisioner.config import LoadedProfile, load_profile, profile_for_host, schema_text, validate_files
from provisioner.config.inventory import Host, hosts_for
from provisioner.config.load import default_profile
from provisioner.config.lock import Lock
from provisioner.config.model import ClassSpeedSpec, Profile
from provisioner.connection import ConnectOptions, open_connection
from provisioner.connection.base import Connection
from provisioner.errors import ApplyError, ConnectError, Interrupted, ProvisionError, UsageError
from provisioner.plan import render
from provisioner.plan.build import HostPlan, probe_for
from provisioner.plan.fleet import Stop, run_fleet

T = TypeVar("T")
EXIT_OK, EXIT_FAILED, EXIT_CHANGED, EXIT_BAD_INPUT = 0, 1, 2, 3
EXIT_INTERRUPTED = 130      # as a shell says for SIGINT


@dataclass(frozen=True)
class Target:
    """A host and the profile as it applies to that host (after its `provision:` overlay)."""

    host: Host
    profile: Profile


def ask_become_pass(args: argparse.Namespace) -> None:
    """-K: the become password, as Ansible's --ask-become-pass reads it (a prompt; from a pipe, its
    first line), handed to the secrets module (used by every host that becomes, redacted)."""
    if not getattr(args, "ask_become_pass", False) or secrets.become_password(None) is not None:
        return
    if sys.stdin.isatty():
        value = getpass.getpass("BECOME password: ")
    else:
        value = sys.stdin.readline()
    if not value.strip():
        raise UsageError("-K/--ask-become-pass read no password (an empty line or no stdin)")
    secrets.give_become_password(value)


def connect_options(args: argparse.Namespace) -> ConnectOptions:
    ask_become_pass(args)
    kwargs: dict[str, Any] = {
        "host_key_policy": "accept-new" if args.accept_new_host_keys else "strict",
        "ssh_config": args.ssh_config,
        "connect_timeout": args.connect_timeout,
        "heartbeat_s": args.heartbeat,
    }
    if args.known_hosts:
        kwargs["known_hosts"] = tuple(args.known_hosts)
    return ConnectOptions(**kwargs)


def list_hosts(args: argparse.Namespace, console: Console) -> int:
    """`--list-hosts`, as ansible-playbook's: the hosts this command would target (the profile's
    `hosts`, narrowed by --limit), with the address each is reached at; no host is contacted. For
    `apply PLAN`: the hosts the saved plan holds."""
    from provisioner.plan import saved

    reviewed = saved.read(args.profile) if getattr(args, "profile", None) else None
    if reviewed is not None:
        args.profile = reviewed.profile
    chosen = [t for t in targets(args) if reviewed is None or t.host.name in reviewed.hosts]
    if args.json:
        emit(json.dumps({"hosts": [{"host": t.host.name, "address": t.host.address, "port": t.host.port,
                                    "user": t.host.user, "transport": t.host.transport} for t in chosen]}, indent=2))
        return EXIT_OK
    console.print(f"hosts ({len(chosen)}):")
    for t in chosen:
        console.print(f"  {escape(t.host.name)}", highlight=False)
    return EXIT_OK


def targets(args: argparse.Namespace, loaded: LoadedProfile | None = None, *,
            with_lock: bool = False) -> list[Target]:
    """Profile + inventory + patterns → the hosts to work on, each with its own profile (its
    `provision:` overlay merged and validated). Without a profile (`provision facts -i INV`) the
    defaults stand in for one. `with_lock` (plan, apply): the profile's lock is read, checked
    against the profile and handed to every host's profile."""
    if not args.profile and not args.inventory:
        raise UsageError("no inventory: give -i INVENTORY, or a profile that names one")
    loaded = loaded or (load_profile(Path(args.profile)) if args.profile else default_profile())
    mark = loaded.marks.get(("hosts",))
    where = f"{mark.file}:{mark.line}:{mark.col}: hosts" if mark else None
    hosts = hosts_for(loaded.profile, args.inventory, args.limit, where)
    lock = locked(args, loaded) if with_lock and args.profile else None
    return [Target(host, replace(profile_for_host(loaded, host), lock=lock)) for host in hosts]


def locked(args: argparse.Namespace, loaded: LoadedProfile) -> Lock | None:
    """The lock beside the profile (or `--lock FILE`), which must be of the profile as it is now."""
    from provisioner.config import lock as lockfile

    found = lockfile.read_beside(loaded.file, getattr(args, "lock", None))
    if found is not None and found.digest != lockfile.profile_digest(loaded.chain):
        raise UsageError(f"{found.file}: the profile {loaded.file} changed since this lock was written: run "
                         f"`provision lock {loaded.file}` to lock it again (it shows what moves)")
    return found


def say_lock(chosen: list[Target], console: Console) -> None:
    """The last line of a plan or apply: which lock it converged to, or that it had none. Last, so
    that --json's document stays the first thing on the stream."""
    if not chosen:
        return
    lock, file = chosen[0].profile.lock, chosen[0].profile.file
    if lock is not None:
        console.print(f"lock: {escape(lock.file)}", highlight=False)
    else:
        console.print("[dim]no lock: upstream's names (tags, the Hub's main, torch releases, package floors) "
                      f"were resolved now; `provision lock {escape(file)}` pins them for every control "
                      "machine[/]", highlight=False)


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


def fleet(args: argparse.Namespace, chosen: list[Target], work: Callable[[Target], T], stop: Stop, *,
          failed: Callable[[T], bool] = lambda _: False, canary: int | None = None,
          halt: Callable[[dict[str, T | BaseException]], str | None] | None = None) -> dict[str, T | BaseException]:
    by_name = {t.host.name: t for t in chosen}
    hosts = [t.host for t in by_name.values()]
    return run_fleet(hosts, lambda h: work(by_name[h.name]), forks=args.forks,
                     serial=getattr(args, "serial", None),
                     max_fail_percentage=getattr(args, "max_fail_percentage", None), failed=failed,
                     canary=canary, halt=halt, stop=stop)


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


def planner_of(args: argparse.Namespace, stop: Stop) -> Callable[[Target], HostPlan]:
    """A host's plan: one connection, one facts round trip, every resource asked."""
    from provisioner.plan.apply import profile_planner

    options = connect_options(args)

    def work(target: Target) -> HostPlan:
        with connected(target, options, stop) as conn:
            return profile_planner(target.profile)(conn)

    return work


def plan(args: argparse.Namespace, console: Console) -> int:
    refresh_hub(args)
    stop = Stop()
    loaded = load_profile(Path(args.profile))
    chosen = targets(args, loaded, with_lock=True)
    read_secrets(chosen)
    results = fleet(args, chosen, planner_of(args, stop), stop)
    if stop.why:
        return show_stopped(results, stop, console)
    show_plans(results, console, args)
    say_lock(chosen, console)
    if getattr(args, "out", None):
        from provisioner.plan import saved

        planned = {n: r for n, r in results.items() if isinstance(r, HostPlan) and not r.errors}
        saved.write(args.out, args.profile, loaded.data, planned)
        console.print(f"plan of {len(planned)} host{'s' * (len(planned) != 1)} saved to {escape(args.out)}: "
                      f"`provision apply {escape(args.out)}` applies exactly it, or refuses a host whose facts changed")
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
    """Converge, verify; under a verify gate (`--verify-gate`, `rollout.verify_gate`), roll back a
    host whose change failed verification and stop the rollout after its batch."""
    slice_options(args)
    from provisioner.plan import saved

    reviewed = saved.read(args.profile)
    if args.check and reviewed is None:
        return plan(args, console)
    from provisioner.plan.rollout import gate_halt

    if reviewed is not None:
        # `apply PLAN`: the profile it was made from, unchanged, on the hosts it holds, each refused
        # when its facts or its plan are not the saved ones.
        loaded = saved.checked_profile(reviewed, lambda f: load_profile(Path(f)))
        args.profile = reviewed.profile
        chosen = [t for t in targets(args, loaded, with_lock=True) if t.host.name in reviewed.hosts]
        missing = sorted(set(reviewed.hosts) - {t.host.name for t in chosen})
        if missing:
            raise UsageError(f"{reviewed.file}: {', '.join(missing)} not in the inventory's selection any more: plan again")
        if args.check:
            raise UsageError("apply PLAN --check: the plan is the check; `provision plan` shows it again")
    else:
        loaded = load_profile(Path(args.profile))
        chosen = targets(args, loaded, with_lock=True)
    rollout = loaded.profile.rollout
    gate = bool(args.verify_gate or rollout.verify_gate)
    canary = args.canary if args.canary is not None else rollout.canary
    if gate and args.no_verify:
        raise UsageError("--verify-gate needs the verification: drop --no-verify "
                         f"(or set rollout.verify_gate: false in {args.profile})")
    if canary and not gate:
        said = f"--canary {canary}" if args.canary is not None else f"rollout.canary: {canary} in {args.profile}"
        raise UsageError(f"{said} needs the verify gate: without it a failing canary stops nothing; add "
                         "--verify-gate (or rollout.verify_gate: true)")
    if canary and reviewed is None:
        chosen = changing_first(args, chosen, canary)
    code = run_apply(args, console, chosen, gate=gate, canary=canary, halt=gate_halt if gate else None,
                     planner=(lambda profile, host: reviewed.planner(profile, host, undo_required=gate))
                     if reviewed else None)
    say_lock(chosen, console)                   # after a run, not under an error's one line
    return code


def changing_first(args: argparse.Namespace, chosen: list[Target], canary: int) -> list[Target]:
    """The first `canary` hosts whose plan changes something, in inventory order, then the rest:
    a converged host tests nothing. Hosts are planned one by one until that many are found (one
    round trip each), so hosts of later batches are not contacted before the canaries pass."""
    stop = Stop()
    work = planner_of(args, stop)
    changing: list[Target] = []
    for target in chosen:
        if len(changing) == canary:
            break
        try:
            found = work(target)
            if found.changes and not found.errors:
                changing.append(target)
        except ProvisionError:
            continue                            # it fails in its own batch, with its own reason
    return changing + [t for t in chosen if t not in changing]


def rollback(args: argparse.Namespace, console: Console) -> int:
    """Restore each host to a snapshot (`--to ID`, else the one before its last apply), planned
    like an apply: `--check` shows the diff; then lock, changes, restart, confirm, verify."""
    from provisioner.plan.rollback import rollback_planner

    if args.check:
        options = connect_options(args)
        stop = Stop()

        def work(target: Target) -> HostPlan:
            with connected(target, options, stop) as conn:
                return rollback_planner(target.profile, args.to)(conn)

        results = fleet(args, targets(args), work, stop)
        if stop.why:
            return show_stopped(results, stop, console)
        show_plans(results, console, args)
        return plan_exit_code(results)
    return run_apply(args, console, targets(args), gate=False, canary=None, halt=None,
                     planner=lambda profile, _host: rollback_planner(profile, args.to))


def run_apply(args: argparse.Namespace, console: Console, chosen: list[Target], *, gate: bool,
              canary: int | None, halt: Callable[[dict[str, Any]], str | None] | None,
              planner: Callable[[Profile, str], Any] | None = None) -> int:
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

    stop = Stop()

    def work(target: Target) -> HostRollout:
        with connected(target, options, stop) as conn:
            return run_host(conn, target.profile, reporter, gate=gate, lock_timeout=args.lock_timeout,
                            verify=None if args.no_verify else run_verification, show_plan=show,
                            planner=planner(target.profile, target.host.name) if planner else None, stop=stop)

    read_secrets(chosen)
    results = fleet(args, chosen, work, stop, failed=lambda o: o.failed, canary=canary, halt=halt)
    code = finish_apply(results, console, args, stop)
    if args.no_verify or stop.why:
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


def finish_apply(results: dict[str, Any], console: Console, args: argparse.Namespace,
                 stop: Stop | None = None) -> int:
    """The per-host lines and the summary: changed, unchanged, failed; under a rollout that
    stopped, rolled back and left (each with why); in a stopped run, interrupted and not started."""
    from provisioner.plan.fleet import SkippedError
    from provisioner.plan.rollout import HostRollout

    stop = stop or Stop()
    counts: Counter[str] = Counter()
    rows = []
    for name, result in results.items():
        row: dict[str, Any] = {"host": name}
        cut = cut_short(name, result, stop)
        if cut == "not started":
            status = cut
            row.update(status=status, detail=str(result))
            console.print(f"[yellow]{escape(name)}[/]: not started", highlight=False)
        elif isinstance(result, HostRollout):
            if cut:
                status = cut
            elif result.rollback is not None:
                status = "rolled back" if result.result == "rolled_back" else "failed"
            elif result.apply.failed or result.verify_error:
                status = "failed"
            else:                      # a failed verification is shown with the verification below
                status = "changed" if result.apply.changed else "ok"
            detail = result.error or (f"{len(result.apply.applied)} changes" if result.apply.changed else "up to date")
            if cut:
                applied = result.last.applied
                done = ", ".join(c.resource for c in applied) or "none"
                detail = (f"interrupted after {len(applied)} of {len(result.last.plan.changes)} changes "
                          f"(applied: {done}); its remote commands were stopped and its lock released")
                console.print(f"[yellow]{escape(name)}[/]: {escape(detail)}", highlight=False)
            elif result.error:
                render.render_failure(console, name, ApplyError(result.error))
            row.update(status=status, detail=detail, snapshot_before=result.snapshot_before,
                       snapshot_after=result.snapshot_after)
            if result.last.diagnostics:
                row["log"] = result.last.diagnostics        # what a failed restart's log said
        elif isinstance(result, SkippedError):
            status = "left"
            row.update(status=status, detail=str(result))
            console.print(f"[bold]- {escape(name)}[/]: left: {escape(str(result))}")
        else:
            status = cut or ("unreachable" if isinstance(result, ConnectError) else "failed")
            row.update(status=status, detail=str(result))
            render.render_failure(console, name, result)
        counts[status] += 1
        rows.append(row)
    total = len(results)
    failed = counts["failed"] + counts["unreachable"]
    tally = f"{counts['changed']} changed, {counts['ok']} unchanged, {failed} failed"
    if counts["rolled back"] or counts["left"]:
        tally += f", {counts['rolled back']} rolled back, {counts['left']} left"
    summary = f"{total} host{'s' * (total != 1)}: {tally}"
    if stop.why:
        counts["done"] = total - counts["interrupted"] - counts["not started"]
        summary = stopped_summary(stop, total, counts, f" ({tally})")
    console.print(summary)
    if args.json:
        emit(json.dumps({"summary": summary, "hosts": rows}, indent=2))
    if stop.why:
        return EXIT_INTERRUPTED
    if failed or counts["rolled back"] or counts["left"]:
        return EXIT_FAILED
    return EXIT_CHANGED if counts["changed"] else EXIT_OK


def lock(args: argparse.Namespace, console: Console) -> int:
    """Resolve every name of the profile upstream can move and write the lock beside it (or
    `--lock FILE`); show what moved against the lock that was there. Nothing is written when a host
    could not answer: a lock missing its environment class would stop that host's plans."""
    from provisioner.config import lock as lockfile
    from provisioner.config.lock import KEYS
    from provisioner.plan import resolve
    from provisioner.resources import hub, hub_cache

    update = args.update
    unknown = [k for k in update or () if k not in KEYS]
    if unknown:
        raise UsageError(f"--update {' '.join(unknown)}: not a part of the lock; name some of: {', '.join(KEYS)} "
                         "(or none: all of them)")
    loaded = load_profile(Path(args.profile))
    file = Path(args.lock) if args.lock else lockfile.path_for(loaded.file)
    old = lockfile.load(file) if file.is_file() else None
    digest = lockfile.profile_digest(loaded.chain)
    keep = resolve.kept(old, update, old is not None and old.digest == digest)
    chosen = targets(args, loaded)
    read_secrets(chosen)
    options = connect_options(args)
    stop = Stop()

    def work(target: Target) -> resolve.HostFindings:
        with connected(target, options, stop) as conn:
            return resolve.host(conn, target.profile)

    results = fleet(args, chosen, work, stop)
    if stop.why:
        return show_stopped(results, stop, console)
    failed = {n: r for n, r in results.items() if isinstance(r, BaseException)}
    for name, error in failed.items():
        render.render_failure(console, name, error)
    if failed:
        console.print(f"[red]not written[/]: {len(failed)} of {len(results)} hosts could not be resolved; "
                      f"{file} is unchanged")
        return EXIT_FAILED
    if "models" not in keep:        # upstream's main as it is now, not as this machine first saw it
        hub_cache.forget_refs()
        hub.clear_cache()
    found = [r for r in results.values() if isinstance(r, resolve.HostFindings)]
    relative = os.path.relpath(os.path.abspath(loaded.file), os.path.dirname(os.path.abspath(file)))
    new = resolve.combine(str(file), relative, digest, found, resolve.models(loaded.profile), old, keep)
    moved = lockfile.differences(old, new)
    if args.json:
        emit(json.dumps({"lock": str(file), "changes": moved}, indent=2))
    if old is not None and not moved and old.digest == new.digest:
        console.print(f"{file}: up to date ({len(new.environments)} environment classes, "
                      f"{len(new.models)} model files)")
        return EXIT_OK
    lockfile.write(new)
    console.print(f"{'wrote' if old is None else 'updated'} {file}")
    for line in moved:
        colour = {"+": "green", "-": "red"}.get(line[0], "yellow")
        console.print(f"  [{colour}]{escape(line)}[/]", highlight=False)
    if old is not None and old.digest != new.digest:
        console.print("  [yellow]~ digest: the profile changed since the last lock[/]")
    return EXIT_CHANGED


def history(args: argparse.Namespace, console: Console) -> int:
    """Each host's snapshots, oldest first, with what changed since the one before; then whether
    the host still runs what the newest recorded. One round trip per host; two where the inventory
    says ansible_become (the facts first say whom to read as: a root owned by another user than
    the login is read as that owner, whose checkouts git reads)."""
    from provisioner.connection.base import as_whom
    from provisioner.facts.gather import gather
    from provisioner.facts.snapshots import HostSnapshots, read_snapshots
    from provisioner.resources import service
    from provisioner.resources.snapshot import differences

    options = connect_options(args)
    stop = Stop()

    def work(target: Target) -> HostSnapshots:
        with connected(target, options, stop) as conn:
            if target.host.become:
                gather(conn, target.profile)            # sets conn.owner where the root is another's
            return read_snapshots(as_whom(conn, False), target.profile, now=True,
                                  units=service.recorded_units(target.profile))

    results = fleet(args, targets(args), work, stop)
    if stop.why:
        return show_stopped(results, stop, console)
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
                          f"profile {escape(snap.profile or '?')}{_confirmation(snap)}"
                          + ("" if previous is None or lines else "  [dim](same as the one before)[/]"))
            for line in lines:
                console.print(f"      {escape(line)}", highlight=False)
            entries.append({"id": snap.id, "time": snap.time, "taken": snap.taken, "profile": snap.profile,
                            "confirmed": snap.confirmed, "verified": snap.verified,
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
        emit(json.dumps(out, indent=2))
    return EXIT_FAILED if any(isinstance(r, BaseException) for r in results.values()) else EXIT_OK


def _confirmation(snap: Any) -> str:
    """`history`'s word on a snapshot's state: not confirmed (a run that did not finish left it),
    verified, or failed verification; nothing for a confirmed one never verified (or an old record)."""
    if snap.confirmed is False:
        return "  [yellow]not confirmed[/]"
    return {True: "  [green]verified[/]", False: "  [red]failed verification[/]"}.get(snap.verified, "")


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
        from provisioner.verify.fingerprint import gpu_class

        emit(json.dumps({name: ({**facts_to_json(r), "gpu_class": gpu_class(r.gpu)}   # the report's class
                                 if not isinstance(r, BaseException)
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
    slice_options(args)
    if args.report:
        check_report_dir(args.report)

    stop = Stop()
    ahead = Once(lambda: meanwhile(lambda: importlib.import_module("provisioner.report.html").prepare(),
                                   *(lambda name=name: importlib.import_module(name) for name in (
                                       "provisioner.report.slices", "provisioner.report.compare",
                                       "provisioner.report.json_report", "provisioner.report.junit",
                                       "provisioner.verify.render"))))

    def work(target: Target) -> tuple[Any, Any]:
        with connected(target, options, stop) as conn, ThreadPoolExecutor(max_workers=1) as pool:
            # The facts are gathered while the verification reaches ComfyUI and frees its memory;
            # the judgement's modules (numpy, Pillow, jinja2: about 0.1 s) are loaded, and the
            # report page's template compiled, while the first host's ComfyUI unloads (not earlier:
            # they would slow the connections down).
            facts = pool.submit(gather, conn, target.profile, probe_for(target.profile))
            verification = run_verification(conn, target.profile, facts.result, while_freeing=ahead)
            stop.check(target.host.name)
            return facts.result(), verification

    chosen = targets(args)
    read_secrets(chosen)                # not sent anywhere by verify: read to be redacted
    # A per-gpu host's instance is HOST/gpuN.
    if args.promote_reference and args.promote_reference.split("/")[0] not in {t.host.name for t in chosen}:
        raise UsageError(f"--promote-reference {args.promote_reference}: not one of the hosts verified "
                         f"({', '.join(sorted(t.host.name for t in chosen)) or 'none'}); name one of them")
    results = fleet(args, chosen, work, stop)
    if stop.why:
        return show_stopped(results, stop, console)
    return show_verification(results, chosen, console, args, against)


class Once:
    """`run` called at most once, whichever thread calls first."""

    def __init__(self, run: Callable[[], object]) -> None:
        self._run, self._lock, self._done = run, threading.Lock(), False

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._run()


def meanwhile(*work: Callable[[], object]) -> None:
    """Run `work` in a thread of its own, while this one waits on hosts: imports (the modules form
    no cycle, so two threads importing at once cannot deadlock) and caches filled ahead. What fails
    is left to the code that needs it, which meets the failure itself."""
    def run() -> None:
        for step in work:
            try:
                step()
            except Exception:  # noqa: BLE001 - raised again where it matters
                return

    threading.Thread(target=run, name="meanwhile", daemon=True).start()


def slice_options(args: argparse.Namespace) -> None:
    """`--references DIR` makes the run a job slice: it needs a report folder to keep its hosts in,
    and promotes nothing (the merge is the one writer of the shared references)."""
    if getattr(args, "references", None) and not getattr(args, "report", None):
        raise UsageError("--references needs --report DIR: a slice keeps its hosts there for "
                         "`provision report merge`")
    if getattr(args, "references", None) and getattr(args, "promote_reference", None):
        raise UsageError("--promote-reference with --references: a slice never writes the shared references; "
                         "promote in a run over the whole class, without --references")


def report(args: argparse.Namespace, console: Console) -> int:
    """`provision report merge SLICE_DIR… --out DIR`: the slices judged as one fleet."""
    from datetime import datetime, timezone

    from provisioner.report import build_report, write_report
    from provisioner.report.references import ReferenceStore
    from provisioner.report.slices import judge, read_slices

    part = read_slices(args.dirs)
    when = datetime.now(timezone.utc)
    entries, outcome = judge(part, ReferenceStore(args.out, root=args.references),
                             now=when.strftime("%Y-%m-%dT%H:%M:%SZ"))
    written = write_report(args.out, build_report(entries, profile=part.profile, generated_at=when,
                                                  class_speed=part.class_speed)).report
    show_judgement(written, outcome, console)
    summary = written.summary
    console.print(f"{summary.hosts} hosts from {len(args.dirs)} slices: {summary.passed} passed, "
                  f"{summary.failed} failed, {summary.unreachable} unreachable, {summary.left} left")
    console.print(f"report: {Path(args.out) / 'report.html'} (report.json, junit.xml)")
    return EXIT_OK if summary.passed == summary.hosts and not outcome.problems else EXIT_FAILED


def previous_report(path: str) -> dict[str, Any]:
    """`--compare OLD_REPORT`: a report.json this version can compare with, or bad input."""
    from provisioner.report import read_previous_file

    try:
        previous, why = read_previous_file(path)
    except ValueError as err:
        raise UsageError(f"--compare {path}: {err} (give a report.json written by provision verify --report)") from None
    if previous is None:
        raise UsageError(f"--compare {path}: {why}")
    return previous


def check_report_dir(directory: str) -> None:
    """The report.json already in `--report DIR` is compared with after the verification: one that
    cannot be read at all (a FIFO, a device, too big) is refused before any host is touched."""
    from provisioner.report import JSON_NAME

    path = Path(directory) / JSON_NAME
    if not os.path.lexists(path):
        return
    from provisioner.report import read_previous_file

    try:
        read_previous_file(path)
    except ValueError as err:
        raise UsageError(f"--report {directory}: {path} cannot be read: {err} (move it away)") from None


@dataclass(frozen=True)
class PerInstance:
    """The verifications of a host's ComfyUI instances (`comfyui.instances: per-gpu`), each with the
    profile and facts as that instance sees them (its port, its GPU); the report lists HOST/gpuN."""

    items: tuple[tuple[str, Profile, Any, Any], ...]     # (label, profile, facts, HostVerification)

    @property
    def passed(self) -> bool:
        return all(v.passed for *_, v in self.items)


def run_verification(conn: Connection, profile: Profile, facts: Any,
                     while_freeing: Callable[[], None] | None = None) -> Any:
    """Render the profile's first workflow for this host and run the verification generations, on
    each of its ComfyUI instances when there are several (one per GPU). `facts` may be a function
    that waits for them (verify.run says why); `while_freeing` is verify_host's."""
    from dataclasses import replace

    from provisioner.errors import PlanError
    from provisioner.resources import units, workflow
    from provisioner.verify.run import verify_host

    def one(p: Profile, f: Any) -> Any:
        return verify_host(conn, p, f, workflow_graph=lambda found: workflow.render(
            p, found, p.workflow.templates[0]), while_freeing=while_freeing)

    if profile.comfyui.instances != "per-gpu":
        return one(profile, facts)
    facts = facts() if callable(facts) else facts       # the instances are read from the facts
    try:
        found = units.instances(profile, facts)
    except PlanError as err:
        raise ApplyError(f"{conn.name}: {err}") from None
    items = []
    for instance in found:
        p = units.instance_profile(profile, instance)
        f = replace(facts, comfyui_gpu=p.comfyui.gpu)        # its GPU: device, precision, VRAM, report
        items.append((instance.label or instance.unit, p, f, one(p, f)))
    return PerInstance(tuple(items))


def by_instance(results: dict[str, Any], profiles: dict[str, Profile]) -> tuple[dict[str, Any], dict[str, Profile]]:
    """Results and profiles with each per-gpu host's instances as entries of their own, `HOST/gpuN`."""
    out: dict[str, Any] = {}
    named = dict(profiles)
    for name, result in results.items():
        if isinstance(result, BaseException) or not isinstance(result[1], PerInstance):
            out[name] = result
            continue
        for label, profile, facts, verification in result[1].items:
            out[f"{name}/{label}"] = (facts, verification)
            named[f"{name}/{label}"] = profile
    return out, named


def show_verification(results: dict[str, Any], chosen: list[Target], console: Console,
                      args: argparse.Namespace, against: dict[str, Any] | None = None,
                      rollouts: dict[str, Any] | None = None) -> int:
    """Image agreement against the references, the console table and check lines (failures first),
    the fleet's flags, the report directory; exit 0 or 1. `against`: the report to compare with
    (`--compare`), else the report directory's own; `rollouts`: what an apply did to each host."""
    from datetime import datetime, timezone

    from provisioner.report import build_report, dumps, from_exception, from_verification, write_report
    from provisioner.report.compare import with_comparison
    from provisioner.report.references import ReferenceStore
    from provisioner.report.slices import Slice, judge, write_slice
    from provisioner.verify.render import render_verification

    results, profiles = by_instance(results, {t.host.name: t.profile for t in chosen})
    report_dir = getattr(args, "report", None)
    shared = getattr(args, "references", None)       # a job slice: the merge judges the fleet
    when = datetime.now(timezone.utc)
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
    part = Slice(chosen[0].profile.name if chosen else None,
                 chosen[0].profile.verify.class_speed if chosen else ClassSpeedSpec(), tuple(entries),
                 {n: r[1].images for n, r in results.items() if not isinstance(r, BaseException)},
                 {n: p.verify.agreement for n, p in profiles.items()})
    store = ReferenceStore(report_dir, root=shared, read_only=shared is not None) if report_dir else None
    entries, outcome = judge(part, store, now=when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                             promote=getattr(args, "promote_reference", None))
    results = {n: r if isinstance(r, BaseException) else (r[0], outcome.verifications[n]) for n, r in results.items()}
    if report_dir and shared:
        write_slice(report_dir, part)
    # A host a rollout left was not verified: the summary above says so, the report lists it.
    failed = render_verification({n: r for n, r in results.items()
                                  if (rollouts.get(n) or {}).get("result") != "left"}, console,
                                 frozenset(n for n, r in rollouts.items() if (r or {}).get("result") == "rolled_back"))
    report = build_report(entries, profile=part.profile, generated_at=when, class_speed=part.class_speed)
    if against is not None:
        report = with_comparison(report, against)
    if report_dir:
        report = write_report(report_dir, report, compared=against is not None).report
    show_judgement(report, outcome, console)
    if args.json and args.verb == "verify":  # apply and rollback print their own JSON summary
        emit(dumps(report), end="")
    if report_dir:
        console.print(f"report: {Path(report_dir) / 'report.html'} (report.json, junit.xml)")
    return EXIT_FAILED if failed or outcome.problems else EXIT_OK


def show_judgement(report: Any, outcome: Any, console: Console) -> None:
    """The fleet's judgement in the console: references made, fleet flags, regressions, changes,
    and what could not be done (a FleetReport and a references.Outcome)."""
    for note in outcome.notes:
        console.print(f"[cyan]{escape(note)}[/]")
    for line, colour in [(f.line, "yellow") for f in report.fleet] + [(f.line, "red") for f in report.regressions] \
            + [(f.line, "cyan") for f in report.changes]:
        console.print(f"[{colour}]{escape(line)}[/]")
    for problem in outcome.problems:
        console.print(f"[red]error:[/] {escape(problem)}")


def validate(args: argparse.Namespace, console: Console) -> int:
    problems = validate_files([Path(f) for f in args.files])
    if args.json:
        emit(json.dumps({"valid": not problems, "files": list(args.files),
                         "problems": [{"file": p.file, "line": p.line, "col": p.col, "key": p.key,
                                       "message": p.message, "hint": p.hint, "text": str(p)} for p in problems]},
                        indent=2))
        return EXIT_BAD_INPUT if problems else EXIT_OK
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



def catalog(args: argparse.Namespace, console: Console) -> int:
    """What the catalog knows (core, plugin and backend releases, the GPU rule, model files), each
    fact with its source and the day it was checked: how old the knowledge is, at a glance."""
    from dataclasses import asdict

    from rich.table import Table

    from provisioner.catalog.summary import facts

    found = [f for f in facts() if args.topic in (None, f.topic)]
    if args.json:
        print(json.dumps([asdict(f) for f in found], indent=2))
        return EXIT_OK
    days = sorted({f.checked for f in found})
    table = Table(title=f"the catalog: {len(found)} facts, checked against upstream "
                        f"{days[0] if len(days) == 1 else f'{days[0]} to {days[-1]}'}", title_justify="left")
    for column in ("topic", "about", "fact", "source", "checked"):
        table.add_column(column, overflow="fold")
    for f in found:
        table.add_row(f.topic, escape(f.name), escape(f.fact), escape(f.source), f.checked)
    console.print(table)
    return EXIT_OK
