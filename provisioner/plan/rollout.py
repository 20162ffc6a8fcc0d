"""One host of an apply: converge it, verify it, and under a verify gate roll back a host whose
apply or verification failed, to the snapshot this apply took before its first change, and verify
it again. `gate_halt` tells the fleet to stop after a batch with such a host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from provisioner import remote
from provisioner.config.model import Profile
from provisioner.connection.base import Connection, as_whom
from provisioner.errors import ProvisionError
from provisioner.facts.model import Facts
from provisioner.facts.snapshots import folder
from provisioner.plan.apply import HostOutcome, Planner, apply_host, profile_planner
from provisioner.facts.gather import gather
from provisioner.plan.build import HostPlan, probe_for
from provisioner.plan.fleet import Stop
from provisioner.plan.progress import Reporter
from provisioner.plan.rollback import RollbackPlanner, rollback_planner
from provisioner.resources import snapshot
from provisioner.verify.checks import Check, HostVerification

Verify = Callable[[Connection, Profile, Facts], HostVerification]
Result = Literal["changed", "unchanged", "rolled_back", "failed"]


def _snapshot_id(outcome: HostOutcome | None, key: str) -> str | None:
    answer = outcome.answers.get(key) if outcome else None
    return answer.get("id") if isinstance(answer, dict) else None


@dataclass
class HostRollout:
    """What happened to one host: its apply, and the rollback when its verification failed."""

    apply: HostOutcome
    rollback: HostOutcome | None = None
    cause: tuple[str, ...] = ()                 # why it was rolled back: the apply's error, failed checks
    failed_checks: tuple[Check, ...] = ()       # the checks of the verification that failed it
    verify_error: str | None = None             # a verification that could not run at all

    @property
    def host(self) -> str:
        return self.apply.host

    @property
    def last(self) -> HostOutcome:
        """The outcome that left the host as it is now."""
        return self.rollback or self.apply

    @property
    def facts(self) -> Facts:
        return self.last.facts

    @property
    def verification(self) -> HostVerification | None:
        return self.last.verification

    @property
    def result(self) -> Result:
        if self.rollback is not None:
            return "failed" if self.rollback.failed else "rolled_back"
        if self.apply.failed or self.verify_error or self.apply.verification_failed:
            return "failed"
        return "changed" if self.apply.changed else "unchanged"

    @property
    def error(self) -> str | None:
        """Why the host is not fine, one line (None when it is)."""
        if self.rollback is not None:
            if self.rollback.failed:
                return f"rollback to {self.restored} failed: {self.rollback.error}"
            restored = self.rollback.verification
            said = ("restored host not verified" if restored is None
                    else "restored host verified" if restored.passed else "restored host failed verification too")
            return f"rolled back to {self.restored}, {said}: {'; '.join(self.cause)}"
        return self.apply.error or self.verify_error

    @property
    def failed(self) -> bool:
        return self.result in ("failed", "rolled_back") or self.last.verification_failed

    @property
    def snapshot_before(self) -> str | None:
        """The snapshot this apply took before its first change (what a rollback returns to)."""
        return _snapshot_id(self.apply, snapshot.BEFORE)

    @property
    def snapshot_after(self) -> str | None:
        """The snapshot of what the host runs after this run: after the apply, or after the rollback."""
        return _snapshot_id(self.last, snapshot.AFTER)

    @property
    def restored(self) -> str | None:
        return self.snapshot_before if self.rollback is not None else None

    def to_json(self) -> dict[str, Any]:
        """The report's `rollout` of this host."""
        return {"result": self.result, "snapshot_before": self.snapshot_before,
                "snapshot_after": self.snapshot_after, "restored": self.restored,
                "reason": self.error if self.result in ("failed", "rolled_back") else None,
                "failed_checks": [c.to_json() for c in self.failed_checks]}


def mark_verified(conn: Connection, profile: Profile, outcome: HostOutcome) -> None:
    """Record on the snapshot of what the run left whether its verification passed (what a later
    default rollback and `history` read); a host that cannot record it is no failure."""
    ident = _snapshot_id(outcome, snapshot.AFTER)
    if ident is None or outcome.verification is None:
        return
    as_whom(conn, False).run(remote.argv("snapshot"), stdin=remote.mark_request(folder(profile), ident, not outcome.verification_failed),
             timeout=60.0, check=False)


def run_host(conn: Connection, profile: Profile, reporter: Reporter, *, verify: Verify | None, gate: bool,
             lock_timeout: float = 300.0, show_plan: Callable[[HostPlan], None] | None = None,
             planner: Planner | None = None, stop: Stop | None = None) -> HostRollout:
    """Apply (the profile's plan, or `planner`'s), then verify (unless `verify` is None). Under the
    gate, a host whose apply or verification failed after its first change is rolled back to the
    snapshot taken before it, and verified again; and a host whose change it could not undo exactly
    (a replaced distribution's wheel that could not be kept) is not changed at all."""
    planner = planner or profile_planner(profile, undo_required=gate)
    outcome = apply_host(conn, profile, reporter, lock_timeout=lock_timeout, show_plan=show_plan, planner=planner)
    took = _snapshot_id(outcome, snapshot.BEFORE)
    changed = took is not None                  # its prelude ran: changes were made, or attempted
    done = HostRollout(outcome)
    if verify is None or (outcome.failed and not (gate and changed)) or (stop and stop.why):
        return done                             # nothing runs on a host once the run was stopped
    reporter.line(conn.name, "verifying: generations through ComfyUI's API ...")
    checked = profile
    if isinstance(planner, RollbackPlanner):        # the rollback verb: the restored state's own profile
        checked, line = planner.verification_profile(conn.name)
        reporter.line(conn.name, line)
    try:
        # A failed apply confirmed nothing: read the host again, so the verification explains what it runs.
        facts = outcome.facts if outcome.facts_after or not outcome.failed else gather(conn, profile, probe_for(profile))
        outcome.verification = verify(conn, checked, facts)
        mark_verified(conn, profile, outcome)
    except ProvisionError as err:
        done.verify_error = f"verification could not run: {reporter.redact(str(err))}"
    if not (gate and changed and (outcome.failed or done.verify_error or outcome.verification_failed)) \
            or (stop and stop.why):
        return done
    checks = tuple(c for c in (outcome.verification.checks if outcome.verification else ()) if not c.passed)
    done.failed_checks = checks
    done.cause = tuple(x for x in [outcome.error, done.verify_error] if x) + tuple(f"{c.name}: {c.detail}" for c in checks)
    reporter.line(conn.name, f"verify gate: rolling back to snapshot {took} ({'; '.join(done.cause) or 'failed'})",
                  "red")
    back = rollback_planner(profile, took)
    done.rollback = apply_host(conn, profile, reporter, lock_timeout=lock_timeout, show_plan=show_plan, planner=back)
    if not done.rollback.failed:
        checked, line = back.verification_profile(conn.name)
        reporter.line(conn.name, f"verifying the restored host: {line}")
        try:
            done.rollback.verification = verify(conn, checked, done.rollback.facts)
            mark_verified(conn, profile, done.rollback)
        except ProvisionError as err:
            done.rollback.error = f"verification after the rollback could not run: {reporter.redact(str(err))}"
    return done


def gate_halt(batch: Mapping[str, HostRollout | BaseException]) -> str | None:
    """Why the rollout stops after this batch: a host rolled back, failed or not reached; None: go on."""
    bad = []
    for name, result in batch.items():
        if isinstance(result, BaseException):
            bad.append(f"{name} failed")
        elif result.result == "rolled_back":
            bad.append(f"{name} was rolled back")
        elif result.failed:
            bad.append(f"{name} failed")
    return f"the verify gate stopped the rollout after {', '.join(bad)}" if bad else None
