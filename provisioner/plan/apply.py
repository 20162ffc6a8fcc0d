"""Execute a HostPlan over a Connection: lock, run each change's steps, run handlers, confirm.

The host is locked for the whole apply by a small process that holds `flock` on
`<state_dir>/lock` while our channel stays open; if this process dies, the channel closes and the
lock goes with it, so a lock can never go stale. Convergence is confirmed by gathering the facts
again and re-planning: a change that "succeeded" but left a difference is a failure.
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

from provisioner.config.model import Profile
from provisioner.connection.base import Connection
from provisioner.connection.docker import DockerConnection
from provisioner.errors import ApplyError, LockedError, ProvisionError
from provisioner.facts.gather import gather
from provisioner.facts.model import Facts, Probe
from provisioner.plan import fetch_script
from provisioner.plan.build import HostPlan, build_plan, probe_for
from provisioner.plan.progress import Reporter
from provisioner.plan.render import describe_step
from provisioner.resources.base import RESTART, Change, Fetch, Push, Put, Run, Step

LOCK_SCRIPT = r"""
import fcntl, os, sys, time
path, timeout, owner = sys.argv[1], float(sys.argv[2]), sys.argv[3]
os.makedirs(os.path.dirname(path), exist_ok=True)
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
deadline, told = time.monotonic() + timeout, False
while True:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
    except OSError:
        holder = open(path).read().strip() or "another apply"
        if time.monotonic() > deadline:
            print("busy " + holder, flush=True)
            sys.exit(75)
        if not told:
            print("waiting " + holder, flush=True)
            told = True
        time.sleep(0.2)
os.ftruncate(fd, 0)
os.write(fd, owner.encode())
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the controller closes the channel or goes away
"""


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
              timeout: float) -> Iterator[None]:
    """Hold the host's apply lock for the block, waiting up to `timeout` seconds for it."""
    path = posixpath.join(profile.comfyui.state_dir, "lock")
    owner = f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}"
    with conn.hold(["python3", "-c", LOCK_SCRIPT, path, str(timeout), owner]) as lines:
        for line in lines:
            if line.startswith("waiting "):
                reporter.line(conn.name, f"waiting for the lock held by {line[8:]}", "yellow")
            elif line.startswith("busy "):
                raise LockedError(
                    f"{conn.name}: another apply holds {path} ({line[5:]}); waited {timeout:g}s. "
                    "Let it finish, or raise --lock-timeout")
            elif line == "locked":
                break
        else:
            raise ApplyError(f"{conn.name}: could not take the lock {path} (python3 missing?)")
        yield


class StepRunner:
    """Runs the four kinds of step; the only code that turns steps into connection calls."""

    def __init__(self, conn: Connection, profile: Profile, reporter: Reporter) -> None:
        self.conn, self.profile, self.reporter = conn, profile, reporter

    def __call__(self, step: Step) -> None:
        started = time.monotonic()
        if isinstance(step, Run):
            self.conn.run(step.argv, stdin=step.stdin, timeout=step.timeout)
        elif isinstance(step, Put):
            self.conn.put(step.content, step.dest, mode=step.mode)
        elif isinstance(step, Push):
            size = os.path.getsize(step.src)
            with self.reporter.transfer(self.conn.name, posixpath.basename(step.dest), size) as bar:
                self.conn.put_file(step.src, step.dest, progress=bar)
        elif isinstance(step, Fetch):
            self._fetch(step)
        self.reporter.log(self.conn.name, "step", step=describe_step(step),
                          seconds=round(time.monotonic() - started, 3))

    def _fetch(self, step: Fetch) -> None:
        token = os.environ.get(step.token_env) if step.token_env else None
        self.reporter.redact.add(token)
        request = {
            "url": step.url, "dest": step.dest, "sha256": step.sha256, "size": step.size,
            "token": token, "mode": "fetch",
            "cache": posixpath.join(self.profile.comfyui.state_dir, "checksums.json"),
        }
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
            self.conn.run(["python3", "-c", fetch_script.SOURCE],
                          stdin=json.dumps(request).encode(), stdout_callback=on_line)


def restart_argv(profile: Profile) -> tuple[str, ...] | None:
    restart = profile.comfyui.restart
    if restart is None:
        return None
    if restart.systemd:
        return ("systemctl", "restart", restart.systemd)
    if restart.docker:
        return ("docker", "restart", restart.docker)
    return restart.command or None


def apply_host(conn: Connection, profile: Profile, reporter: Reporter, *,
               lock_timeout: float = 300.0,
               show_plan: Callable[[HostPlan], None] | None = None) -> HostOutcome:
    """Converge one host: gather, plan; if anything differs: lock, gather and plan again (another
    apply may have run meanwhile), run the changes in order, handlers, confirm.

    A converged host costs one facts round trip and no write: not even the lock is taken.
    """
    started = time.monotonic()
    probe = probe_for(profile)
    plan = build_plan(profile, gather(conn, profile, probe))
    if plan.converged or plan.errors:
        return _finish(conn, reporter, _unchanged(plan, show_plan), started)
    with host_lock(conn, profile, reporter, lock_timeout):
        plan = build_plan(profile, gather(conn, profile, probe))
        outcome = _unchanged(plan, show_plan)
        if plan.converged or plan.errors:
            return _finish(conn, reporter, outcome, started)
        run_step = StepRunner(conn, profile, reporter)
        for change in plan.changes:
            reporter.line(conn.name, f"{change.resource}: {change.summary} ...")
            reporter.log(conn.name, "change", resource=change.resource, key=change.key,
                         action=change.action, summary=change.summary)
            try:
                for step in change.steps:
                    run_step(step)
            except ProvisionError as err:
                outcome.error = f"{change.resource}: {reporter.redact(str(err))}"
                reporter.line(conn.name, f"✗ {change.resource}: {err}", "red")
                reporter.log(conn.name, "failed", resource=change.resource, error=str(err))
                break
            outcome.applied.append(change)
            reporter.line(conn.name, f"✓ {change.resource}: {change.summary}", "green")
        # Restart even after a later failure: what did change must be loaded.
        if any(RESTART & change.notify for change in outcome.applied):
            _restart_comfyui(conn, profile, reporter, outcome)
        if outcome.error is None and outcome.applied:
            _confirm(conn, profile, probe, outcome)
    return _finish(conn, reporter, outcome, started)


def _restart_comfyui(conn: Connection, profile: Profile, reporter: Reporter,
                     outcome: HostOutcome) -> None:
    """The handler: restart ComfyUI once, by the profile's means, so it loads what changed."""
    argv, restart = restart_argv(profile), profile.comfyui.restart
    if not argv:
        reporter.line(conn.name, "ComfyUI must be restarted to load the changes "
                      "(no comfyui.restart in the profile)", "yellow")
        return
    restart_conn = conn
    if restart is not None and restart.docker and isinstance(conn, DockerConnection):
        restart_conn = conn.inner  # `docker restart` runs on the container's host, not inside it
    try:
        restart_conn.run(argv)
        outcome.handlers.append("restart-comfyui")
        reporter.line(conn.name, f"✓ handler: restarted ComfyUI ({' '.join(argv)})", "green")
    except ProvisionError as err:
        outcome.error = outcome.error or f"restart of ComfyUI failed: {err}"
        reporter.line(conn.name, f"✗ handler: {err}", "red")


def _unchanged(plan: HostPlan, show_plan: Callable[[HostPlan], None] | None) -> HostOutcome:
    if show_plan:
        show_plan(plan)
    outcome = HostOutcome(plan.host, plan)
    if plan.errors:
        outcome.error = "; ".join(plan.errors)
    return outcome


def _finish(conn: Connection, reporter: Reporter, outcome: HostOutcome, started: float) -> HostOutcome:
    outcome.seconds = time.monotonic() - started
    reporter.log(conn.name, "done", changed=outcome.changed, error=outcome.error,
                 seconds=round(outcome.seconds, 3))
    return outcome


def _confirm(conn: Connection, profile: Profile, probe: Probe, outcome: HostOutcome) -> None:
    """Re-read the facts: every applied change must now be gone from the plan."""
    outcome.facts_after = gather(conn, profile, probe)
    after = build_plan(profile, outcome.facts_after)
    if after.changes or after.errors:
        what = "; ".join([f"{c.resource}: {c.summary}" for c in after.changes] + list(after.errors))
        outcome.error = f"did not converge after apply: {what}"
