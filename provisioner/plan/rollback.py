"""Rollback as a plan: read the host's snapshots and its state now, choose the snapshot, and plan
the changes back to it (resources/snapshot.py); `apply_host` runs it like any apply.

The snapshot is chosen once, at the first plan: the plan under the lock and the confirmation after
the changes compare with the same one, even though the rollback's own prelude records a newer one.
Like an apply's, the plan carries what the engine owes the host (`engine_plan`): a rollback killed
after a change and before its restart leaves the restart owed, and the next run performs it even
when no change is left; what its killed workflow uploads left is removed like an apply's.
The restored host is verified with the profile of the run that made the snapshot's state
(`producer`, `verification_profile`).
"""

from __future__ import annotations

from collections.abc import Mapping

from provisioner.config.load import check
from provisioner.config.model import Profile, build_profile
from provisioner.connection.base import Connection, as_whom
from provisioner.errors import PlanError
from provisioner.facts.gather import gather
from provisioner.facts.snapshots import HostSnapshots, Snapshot, read_snapshots
from provisioner.plan.build import HostPlan, engine_plan, host_plan, probe_for
from provisioner.resources import service, snapshot, workflow
from provisioner.resources.base import changes

# What the verification of a restored host takes from the snapshot's profile: the model, its
# workflow as restored, the required nodes and thresholds, the plugin and backend it explains
# failures with. How ComfyUI is reached (comfyui.*) stays the profile given.
VERIFIED_BY_SNAPSHOT = ("model", "workflow", "verify", "plugin", "backend")


def producer(found: HostSnapshots, target: Snapshot) -> Snapshot | None:
    """The snapshot a run took once it had made `target`'s state (an `after` one with that state,
    the newest not newer than `target`): its profile is the state's own. A `before apply`
    snapshot records the profile of the run about to change the host, not of the one that made it."""
    made = [s for s in found.snapshots
            if s.id <= target.id and s.taken.startswith("after") and s.state == target.state]
    return made[-1] if made else None


def verification_profile(profile: Profile, target: Snapshot, source: Snapshot | None) -> tuple[Profile, str]:
    """The profile to verify a host restored to `target` with, and a line saying which: the profile
    of the run that made its state (`source`, validated like a profile file), or the one given
    where there is none, it recorded none or one that does not validate."""
    if source is None:
        return profile, (f"no snapshot records the run that made snapshot {target.id}'s state: the restored "
                         f"host is verified with the profile given ({profile.name})")
    data = source.profile_data
    if not isinstance(data, Mapping) or not data:
        return profile, (f"snapshot {source.id} records no profile: the restored host is verified with the "
                         f"profile given ({profile.name})")
    merged = {k: v for k, v in profile.raw.items() if k not in VERIFIED_BY_SNAPSHOT}
    merged.update({k: data[k] for k in VERIFIED_BY_SNAPSHOT if k in data})
    if isinstance(merged.get("workflow"), Mapping):
        # Templates are files of the control machine: read from the folder of the profile given, never
        # from one a snapshot names (whatever can edit a host's snapshots would choose which of the
        # controller's files is rendered and sent to that host's ComfyUI).
        mine = profile.raw.get("workflow")
        folder = mine.get("template_dir") if isinstance(mine, Mapping) else None
        merged["workflow"] = {**{k: v for k, v in merged["workflow"].items() if k != "template_dir"},
                              **({"template_dir": folder} if folder is not None else {})}
    problems = check(merged, {}, f"snapshot {source.id}")
    try:
        if problems:
            raise ValueError(f"{problems[0].key}: {problems[0].message}")
        restored = build_profile(merged, name=source.profile or profile.name, file=profile.file)
    except (ValueError, KeyError, TypeError) as err:
        return profile, (f"snapshot {source.id}'s profile is not valid ({err}): the restored host is verified "
                         f"with the profile given ({profile.name})")
    return restored, (f"verified with the profile of the run that made snapshot {target.id}'s state ("
                      f"{source.profile or '?'}, recorded in {source.id}: its workflow, required nodes and thresholds)")


class RollbackPlanner:
    """What a host needs to run snapshot `to` again (an id or its start; None: the newest confirmed
    state an apply started from). Two round trips: the facts (for the handler and the verification
    after) and the snapshot program (the snapshots, the state now, the kept wheels' sha256)."""

    def __init__(self, profile: Profile, to: str | None = None) -> None:
        self.profile, self.to = profile, to
        self.probe = probe_for(profile)
        self.chosen: dict[str, tuple[Snapshot, str]] = {}   # host -> the snapshot of the first plan, why
        self.made_by: dict[str, Snapshot | None] = {}       # host -> the snapshot of the run that made its state

    def __call__(self, conn: Connection) -> HostPlan:
        profile = self.profile
        facts = gather(conn, profile, self.probe)
        found = read_snapshots(as_whom(conn, False), profile, now=True, check_wheels=True, units=service.recorded_units(profile))
        try:
            first = self.chosen.get(conn.name)
            target, why = snapshot.choose(found, first[0].id if first else self.to)
            if conn.name not in self.chosen:
                self.chosen[conn.name] = (target, why)
                self.made_by[conn.name] = producer(found, target)
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
        return verification_profile(self.profile, chosen[0], self.made_by.get(host))


def rollback_planner(profile: Profile, to: str | None = None) -> RollbackPlanner:
    return RollbackPlanner(profile, to)
