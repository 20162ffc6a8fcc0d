"""Rollback as a plan: read the host's snapshots and its state now, choose the snapshot, and plan
the changes back to it (resources/snapshot.py); `apply_host` runs it like any apply.

The snapshot is chosen once, at the first plan: the plan under the lock and the confirmation after
the changes compare with the same one, even though the rollback's own prelude records a newer one.
Like an apply's, the plan carries what the engine owes the host (`engine_plan`): a rollback killed
after a change and before its restart leaves the restart owed, and the next run performs it even
when no change is left; what its killed workflow uploads left is removed like an apply's.
The restored host is verified with the snapshot's own profile (`verification_profile`).
"""

from __future__ import annotations

from collections.abc import Mapping

from provisioner.config.load import check
from provisioner.config.model import Profile, build_profile
from provisioner.connection.base import Connection
from provisioner.errors import PlanError
from provisioner.facts.gather import gather
from provisioner.facts.snapshots import Snapshot, read_snapshots
from provisioner.plan.build import HostPlan, engine_plan, host_plan, probe_for
from provisioner.resources import service, snapshot, workflow
from provisioner.resources.base import changes

# What the verification of a restored host takes from the snapshot's profile: the model, its
# workflow as restored, the required nodes and thresholds, the plugin and backend it explains
# failures with. How ComfyUI is reached (comfyui.*) stays the profile given.
VERIFIED_BY_SNAPSHOT = ("model", "workflow", "verify", "plugin", "backend")


def verification_profile(profile: Profile, target: Snapshot) -> tuple[Profile, str]:
    """The profile to verify a host restored to `target` with, and a line saying which: the
    snapshot's own (validated like a profile file), or the one given where the snapshot has
    none or one that does not validate."""
    data = target.profile_data
    if not isinstance(data, Mapping) or not data:
        return profile, (f"snapshot {target.id} records no profile: the restored host is verified with the "
                         f"profile given ({profile.name})")
    merged = {k: v for k, v in profile.raw.items() if k not in VERIFIED_BY_SNAPSHOT}
    merged.update({k: data[k] for k in VERIFIED_BY_SNAPSHOT if k in data})
    problems = check(merged, {}, f"snapshot {target.id}")
    try:
        if problems:
            raise ValueError(f"{problems[0].key}: {problems[0].message}")
        restored = build_profile(merged, name=target.profile or profile.name, file=profile.file)
    except (ValueError, KeyError, TypeError) as err:
        return profile, (f"snapshot {target.id}'s profile is not valid ({err}): the restored host is verified "
                         f"with the profile given ({profile.name})")
    return restored, (f"verified with snapshot {target.id}'s own profile ({target.profile or '?'}: its workflow, "
                      "required nodes and thresholds)")


class RollbackPlanner:
    """What a host needs to run snapshot `to` again (an id or its start; None: the newest confirmed
    state an apply started from). Two round trips: the facts (for the handler and the verification
    after) and the snapshot program (the snapshots, the state now, the kept wheels' sha256)."""

    def __init__(self, profile: Profile, to: str | None = None) -> None:
        self.profile, self.to = profile, to
        self.probe = probe_for(profile)
        self.chosen: dict[str, tuple[Snapshot, str]] = {}   # host -> the snapshot of the first plan, why

    def __call__(self, conn: Connection) -> HostPlan:
        profile = self.profile
        facts = gather(conn, profile, self.probe)
        found = read_snapshots(conn, profile, now=True, check_wheels=True, units=service.recorded_units(profile))
        try:
            first = self.chosen.get(conn.name)
            target, why = snapshot.choose(found, first[0].id if first else self.to)
            self.chosen.setdefault(conn.name, (target, why))
            why = self.chosen[conn.name][1]
            if found.now is None:
                raise PlanError("the snapshot program did not read the host's state")
            return engine_plan(profile, facts, [snapshot.restore(profile, target, found.now, facts=facts,
                                                                 kept=found.kept, why=why),
                                                changes(*workflow.unfinished(profile, facts))])
        except PlanError as err:
            return host_plan(facts, [], [f"rollback: {err}"])

    def verification_profile(self, host: str) -> tuple[Profile, str]:
        """The profile host's restored state is verified with (see `verification_profile`)."""
        chosen = self.chosen.get(host)
        if chosen is None:
            return self.profile, "no snapshot was chosen: verified with the profile given"
        return verification_profile(self.profile, chosen[0])


def rollback_planner(profile: Profile, to: str | None = None) -> RollbackPlanner:
    return RollbackPlanner(profile, to)
