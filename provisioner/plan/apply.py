"""Execute a HostPlan over a Connection: lock, prelude, run each change's steps, run handlers,
confirm, postlude.

The engine knows steps and handlers, not what they do: the resources hand it both (and the
prelude and postlude, steps run once around the changes: the snapshots). What it converges to is a
planner's business: the profile's (`profile_planner`) or a snapshot's (`plan/rollback.py`). The host is
locked for the whole apply by `remote/lock.py`, which holds `flock` on `<state_dir>/lock` while
our channel stays open; if this process dies, the channel closes and the lock goes with it, so a
lock can never go stale. Convergence is confirmed by gathering the facts again and re-planning:
a change that "succeeded" but left a difference is a failure.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from provisioner import remote, secrets
from provisioner.config.model import Profile, TimeoutSpec
from provisioner.connection.base import Connection, as_whom
from provisioner.errors import ApplyError, CommandError, ConnectError, LockedError, ProvisionError
from provisioner.facts.gather import gather
from provisioner.facts.model import Facts
from provisioner.plan import owed
from provisioner.plan.build import HostPlan, build_plan, keeping_replaced, probe_for
from provisioner.plan.preview import DryRuns, previewed
from provisioner.plan.progress import Reporter
from provisioner.plan.render import describe_step
from provisioner.resources.base import Change, Fetch, Handler, Push, Put, Run, Step

@dataclass
class HostOutcome:
    """What an apply did on one host."""

    host: str
    plan: HostPlan
    applied: list[Change] = field(default_factory=list)
    handlers: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    facts_after: Facts | None = None           # re-gathered after the changes, when there were any
    verification: Any = None                   # HostVerification, when verification ran
    diagnostics: list[str] = field(default_factory=list)   # what a failed handler's diagnosis read
    answers: dict[str, Any] = field(default_factory=dict)  # what steps marked `answer` printed (JSON)

    @property
    def facts(self) -> Facts:
        """The host as it is now."""
        return self.facts_after or self.plan.facts

    @property
    def verification_failed(self) -> bool:
        return self.verification is not None and not self.verification.passed

    @property
    def changed(self) -> bool:
        return bool(self.applied) or bool(self.handlers)

    @property
    def failed(self) -> bool:
        return self.error is not None or bool(self.plan.errors)


@contextmanager
def host_lock(conn: Connection, profile: Profile, reporter: Reporter,
              timeout: float) -> Iterator[str | None]:
    """Hold the host's apply lock for the block, waiting up to `timeout` seconds for it; yields the
    lock file's text as the lock program found it (None if it could not be read)."""
    path = profile.comfyui.lock
    owner = f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}"
    with as_whom(conn, False).hold(remote.argv("lock", path, str(timeout), owner)) as lines:
        for line in lines:
            if line.startswith("waiting "):
                reporter.line(conn.name, f"waiting for the lock held by {line[8:]}", "yellow")
            elif line.startswith("busy "):
                raise LockedError(
                    f"{conn.name}: another apply holds {path} ({line[5:]}); waited {timeout:g}s. "
                    "Let it finish, or raise --lock-timeout")
            elif line.startswith("locked "):
                break
        else:
            raise ApplyError(f"{conn.name}: could not take the lock {path} (python3 missing?)")
        try:
            previous = json.loads(line[7:])
        except ValueError:
            previous = None
        yield previous if isinstance(previous, str) else None


class StepRunner:
    """Runs the four kinds of step; the only code that turns steps into connection calls. Every
    command has a time limit: its own, else `timeouts.command_s`; a download, one on silence."""

    def __init__(self, conn: Connection, reporter: Reporter, timeouts: TimeoutSpec = TimeoutSpec()) -> None:
        self.conn, self.reporter, self.timeouts = conn, reporter, timeouts
        self.answers: dict[str, Any] = {}

    def __call__(self, step: Step) -> None:
        started, cost = time.monotonic(), {}
        if isinstance(step, Run):
            where = as_whom(self.conn.machine if step.on_machine else self.conn, step.system)
            try:
                result = where.run(step.argv, stdin=step.stdin, timeout=self._limit(step),
                                   stdout_callback=self._progress if step.progress else None)
            except CommandError as err:         # named by what it does, not by its argv
                if not step.what:
                    raise
                raise CommandError(err.host, err.result, step.what) from None
            if step.answer:
                self.answers[step.answer] = _last_json(result.stdout)
            if result.host_cpu_s is not None:
                cost = {"host_cpu_s": result.host_cpu_s}
        elif isinstance(step, Put):
            as_whom(self.conn, step.system).put(step.content, step.dest, mode=step.mode)
        elif isinstance(step, Push):
            size = os.path.getsize(step.src)
            pusher = as_whom(self.conn, False)
            seen = len(pusher.stats.fallbacks)
            with self.reporter.transfer(self.conn.name, posixpath.basename(step.dest), size) as bar:
                pusher.put_file(step.src, step.dest, progress=bar)
            for why in pusher.stats.fallbacks[seen:]:     # done, the slower way: say why
                self.reporter.line(self.conn.name, f"! {why}", "yellow")
                self.reporter.log(self.conn.name, "warning", resource="push", error=why)
        elif isinstance(step, Fetch):
            self._fetch(step)
        self.reporter.log(self.conn.name, "step", step=describe_step(step),
                          seconds=round(time.monotonic() - started, 3), **cost)

    def _limit(self, step: Run) -> float:
        return step.timeout if step.timeout is not None else self.timeouts.command_s
    def around(self, steps: tuple[Step, ...], event: str, label: str, outcome: HostOutcome, *,
               fatal: bool) -> bool:
        """Run prelude or postlude steps. A failure is the host's (`fatal`: nothing may change
        after a failed prelude) or a warning (a postlude after changes that were confirmed)."""
        try:
            for step in steps:
                self.reporter.log(self.conn.name, event, step=describe_step(step))
                self(step)
                self.reporter.line(self.conn.name, f"✓ {describe_step(step)}{_answered(self.answers, step)}", "green")
                for line in _warned(self.answers, step):      # said before the first change
                    self.reporter.line(self.conn.name, f"! {line}", "yellow")
                    self.reporter.log(self.conn.name, "warning", resource=event, error=line)
        except ProvisionError as err:
            text = self.reporter.redact(str(err))
            if fatal:
                outcome.error = outcome.error or f"{label}: {text}"
            self.reporter.line(self.conn.name, f"{'✗' if fatal else '!'} {label}: {text}", "red" if fatal else "yellow")
            self.reporter.log(self.conn.name, "failed" if fatal else "warning", resource=event, error=text)
            return False
        finally:
            outcome.answers.update(self.answers)
        return True

    def _progress(self, line: str) -> None:
        """A step's {"progress": TEXT} line, shown as it comes (a wait that says it is waiting)."""
        try:
            msg = json.loads(line)
        except ValueError:
            return
        if isinstance(msg, dict) and isinstance(msg.get("progress"), str):
            self.reporter.line(self.conn.name, msg["progress"])

    def diagnose(self, step: Run) -> list[str]:
        """Run a diagnostic step whatever its exit code: a heading, then its output lines."""
        where = as_whom(self.conn.machine if step.on_machine else self.conn, step.system)
        try:
            res = where.run(step.argv, stdin=step.stdin, timeout=self._limit(step), check=False)
        except ProvisionError as err:
            return [f"{describe_step(step)}: could not be read: {err}"]
        lines = [x for x in (res.stdout + "\n" + res.stderr).splitlines() if x.strip()]
        return [f"{describe_step(step)}:", *(f"  {x}" for x in lines or ["(no output)"])]

    def _fetch(self, step: Fetch) -> None:
        token = secrets.read(step.token_env) if step.token_env else None
        request = remote.fetch_request(url=step.url, dest=step.dest, sha256=step.sha256, size=step.size,
                                       cache=step.cache, token=token, quantization=step.quantization)
        label = posixpath.basename(step.dest)
        with self.reporter.transfer(self.conn.name, label, step.size) as bar:
            def on_line(line: str) -> None:
                try:
                    msg = json.loads(line)
                except ValueError:
                    return
                if isinstance(msg, dict) and "done" in msg:
                    bar(int(msg["done"]), msg.get("total"))

            # The token travels in stdin only: argv is visible to `ps` on the host.
            try:
                as_whom(self.conn, False).run(remote.argv("fetch"), stdin=request, stdout_callback=on_line,
                                              idle_timeout=self.timeouts.download_stall_s)
            except CommandError as err:         # named by what it does, not by the program's text
                raise CommandError(err.host, err.result, step.what or f"download {label}") from None


Planner = Callable[[Connection], HostPlan]   # read the host, plan what differs


def profile_planner(profile: Profile, *, undo_required: bool = False) -> Planner:
    """The profile's plan: the facts it probes for, every resource of resources.ORDER, pip's dry
    run of each install into the venv (plan/preview.py: only when one is planned; the plan made
    again under the lock reuses its answer while the facts are the same), and the snapshot before
    the changes keeping the wheels of what they replace (`undo_required`: one it cannot keep stops
    the host unchanged)."""
    probe = probe_for(profile)
    dry_runs = DryRuns()
    return lambda conn: keeping_replaced(profile, previewed(conn, build_plan(profile, gather(conn, profile, probe)),
                                                           dry_runs), undo_required=undo_required)


def apply_host(conn: Connection, profile: Profile, reporter: Reporter, *,
               lock_timeout: float = 300.0,
               show_plan: Callable[[HostPlan], None] | None = None,
               planner: Planner | None = None) -> HostOutcome:
    """Converge one host: gather, plan; if anything differs: lock, and gather and plan again if
    another apply held the lock since the facts were read (remote.lock_untouched); prelude, run the
    changes in order, handlers, confirm, postlude.
    `planner` (default: the profile's) says what the host converges to.

    A converged host costs one facts round trip and no write: not even the lock is taken.
    """
    started, costs_from = time.monotonic(), len(conn.stats.host_cpu)
    planner = planner or profile_planner(profile)
    plan = planner(conn)
    if plan.converged or plan.errors:
        return _finish(conn, reporter, _unchanged(plan, show_plan), started, costs_from)
    with host_lock(conn, profile, reporter, lock_timeout) as found:
        if not remote.lock_untouched(plan.facts.contents.get(profile.comfyui.lock), found):
            plan = planner(conn)          # an apply held the lock since those facts: what is there now
        outcome = _unchanged(plan, show_plan)
        if plan.converged or plan.errors:
            return _finish(conn, reporter, outcome, started, costs_from)
        run_step = StepRunner(conn, reporter, profile.timeouts)
        if not run_step.around(plan.prelude, "prelude", "before the changes", outcome, fatal=True):
            return _finish(conn, reporter, outcome, started, costs_from)      # nothing was changed
        gone = False
        recorded = set(plan.owed)           # handlers the host already holds as owed
        written: set[str] = set()           # ...and those this run recorded
        for change in plan.changes:
            reporter.line(conn.name, f"{change.resource}: {change.summary} ...")
            reporter.log(conn.name, "change", resource=change.resource, key=change.key,
                         action=change.action, summary=change.summary)
            try:
                # Owed from before the first step: an apply killed after this change and before
                # its handler leaves the host saying so (plan/owed.py). Recorded again when an
                # earlier run's record is there: it names this run's change (the core finishes
                # a checkout its record names).
                for name in sorted(change.notify - written):
                    if plan.handlers.get(name) and plan.handlers[name].steps:
                        run_step(owed.record(profile, name, change))
                        recorded.add(name)
                        written.add(name)
                for step in change.steps:
                    run_step(step)
            except ProvisionError as err:
                outcome.error = f"{change.resource}: {reporter.redact(str(err))}"
                reporter.failure(conn.name, f"{change.resource}: {err}", err, resource=change.resource)
                gone = isinstance(err, ConnectError)
                break
            outcome.applied.append(change)
            reporter.line(conn.name, f"✓ {change.resource}: {change.summary}", "green")
        # Handlers run even after a later failure: what did change must be loaded. Those an
        # interrupted apply owed run too, changes or not. Not when the connection is gone
        # (interrupted, the host stopped answering): nothing runs there now, the records stay owed.
        notified = [] if gone else sorted({name for change in outcome.applied for name in change.notify}
                                          | set(plan.owed))
        for name in notified:
            if plan.owed.get(name):
                reporter.line(conn.name, f"{plan.owed[name].describe()}: running it now", "yellow")
            if _run_handler(conn, plan.handlers[name], run_step, reporter, outcome) and name in recorded:
                try:
                    run_step(owed.clear(profile, name))
                except ProvisionError as err:
                    outcome.error = outcome.error or f"handler {name}: {reporter.redact(str(err))}"
        if outcome.error is None and (outcome.applied or outcome.handlers):
            _confirm(conn, planner, outcome)
        if outcome.error is None:
            run_step.around(plan.postlude, "postlude", "after the changes", outcome, fatal=False)
    return _finish(conn, reporter, outcome, started, costs_from)


def _run_handler(conn: Connection, handler: Handler, run_step: StepRunner, reporter: Reporter,
                 outcome: HostOutcome) -> bool:
    """Run one notified handler's steps; True when it ran them all. A handler that cannot run
    here is a warning."""
    if handler.missing:
        reporter.line(conn.name, handler.missing, "yellow")
        return False
    try:
        for step in handler.steps:
            run_step(step)
    except ProvisionError as err:
        outcome.error = outcome.error or f"handler {handler.name} failed: {reporter.redact(str(err))}"
        reporter.failure(conn.name, f"handler: {err}", err, handler=handler.name)
        for step in handler.diagnose:
            lines = [reporter.redact(x) for x in run_step.diagnose(step)]
            for line in lines:
                reporter.line(conn.name, line, "dim")
            reporter.log(conn.name, "diagnosis", handler=handler.name, lines=lines)
            outcome.diagnostics.extend(lines)
        for step in handler.on_failure:
            try:
                run_step(step)
            except ProvisionError as undo_err:
                reporter.line(conn.name, f"{step.what} failed: {undo_err}", "red")
                continue
            reporter.line(conn.name, step.what, "yellow")
            outcome.error += f"; {step.what}"
        return False
    outcome.handlers.append(handler.name)
    reporter.line(conn.name, f"✓ handler: {handler.what}", "green")
    return True


def _unchanged(plan: HostPlan, show_plan: Callable[[HostPlan], None] | None) -> HostOutcome:
    if show_plan:
        show_plan(plan)
    outcome = HostOutcome(plan.host, plan)
    if plan.errors:
        outcome.error = "; ".join(plan.errors)
    return outcome


def _finish(conn: Connection, reporter: Reporter, outcome: HostOutcome, started: float,
            costs_from: int) -> HostOutcome:
    """Log the outcome, with what the apply cost the host: CPU seconds by kind of command (its
    supervisors' own measure; a command that never finished counts nothing)."""
    outcome.seconds = time.monotonic() - started
    cpu: dict[str, list[float]] = {}
    for kind, seconds in conn.stats.host_cpu[costs_from:]:
        cpu.setdefault(kind, []).append(seconds)
    reporter.log(conn.name, "done", changed=outcome.changed, error=outcome.error,
                 seconds=round(outcome.seconds, 3),
                 host_cpu={k: {"commands": len(v), "seconds": round(sum(v), 3)} for k, v in sorted(cpu.items())})
    return outcome


def _confirm(conn: Connection, planner: Planner, outcome: HostOutcome) -> None:
    """Re-read the facts: every applied change must now be gone from the plan."""
    after = planner(conn)
    outcome.facts_after = after.facts
    if after.changes or after.errors:
        what = "; ".join([f"{c.resource}: {c.summary}" for c in after.changes] + list(after.errors))
        outcome.error = f"did not converge after apply: {what}"


def _last_json(stdout: str) -> Any:
    """A program's answer: its last stdout line, as JSON (None when it is not JSON)."""
    lines = [x for x in stdout.splitlines() if x.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


def _warned(answers: dict[str, Any], step: Step) -> list[str]:
    """The `warnings` a step's answer carries (what a snapshot could not keep)."""
    answer = answers.get(step.answer) if isinstance(step, Run) and step.answer else None
    found = answer.get("warnings") if isinstance(answer, dict) else None
    return [str(x) for x in found] if isinstance(found, list) else []


def _answered(answers: dict[str, Any], step: Step) -> str:
    """`: 20260301-120000-123` after a step whose answer names an id."""
    answer = answers.get(step.answer) if isinstance(step, Run) and step.answer else None
    if isinstance(answer, dict) and answer.get("id"):
        return f": {answer['id']}{' (unchanged since)' if answer.get('reused') else ''}"
    return ""
