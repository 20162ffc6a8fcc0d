"""Rollback as a plan: read the host's snapshots and its state now, choose the snapshot, and plan
the changes back to it (resources/snapshot.py); `apply_host` runs it like any apply.

The snapshot is chosen once, at the first plan: the plan under the lock and the confirmation after
the changes compare with the same one, even though the rollback's own prelude records a newer one.
Like an apply's, the plan carries what the engine owes the host (`engine_plan`): a rollback killed
after a change and before its restart leaves the restart owed, and the next run performs it even
when no change is left; what its killed workflow uploads left is removed like an apply's.
"""

from __future__ import annotations

from provisioner.config.model import Profile
from provisioner.connection.base import Connection
from provisioner.errors import PlanError
from provisioner.facts.gather import gather
from provisioner.facts.snapshots import read_snapshots
from provisioner.plan.apply import Planner
from provisioner.plan.build import HostPlan, engine_plan, host_plan, probe_for
from provisioner.resources import snapshot, workflow
from provisioner.resources.base import changes


def rollback_planner(profile: Profile, to: str | None = None) -> Planner:
    """What a host needs to run snapshot `to` again (an id or its start; None: the one taken
    before the last apply). Two round trips: the facts (for the handler and the verification
    after) and the snapshot program (the snapshots, and the state now)."""
    probe = probe_for(profile)
    chosen: dict[str, str] = {}

    def plan(conn: Connection) -> HostPlan:
        facts = gather(conn, profile, probe)
        found = read_snapshots(conn, profile, now=True)
        try:
            target = snapshot.choose(found, chosen.get(conn.name, to))
            chosen[conn.name] = target.id
            if found.now is None:
                raise PlanError("the snapshot program did not read the host's state")
            return engine_plan(profile, facts, [snapshot.restore(profile, target, found.now, facts=facts),
                                                changes(*workflow.unfinished(profile, facts))])
        except PlanError as err:
            return host_plan(facts, [], [f"rollback: {err}"])

    return plan
