"""Plans that show everything: each change that carries a dry run (`Change.preview`, pip's
`--dry-run --report` of an install into the venv) has it run on the host, and every distribution
pip would add or move is put into the change's before/after, its diff and `data["pip"]` (where a
snapshot's record of the change can read it), and each installed one it moves into `replaces` (the
snapshot before the change keeps its wheel).

Costs a round trip per such change, and nothing when none is planned: a converged plan stays at one.
"""

from __future__ import annotations

from dataclasses import replace

from provisioner.connection.base import Connection
from provisioner.errors import PlanError
from provisioner.plan.build import HostPlan
from provisioner.resources import dryrun
from provisioner.resources.base import Change


def previewed(conn: Connection, plan: HostPlan) -> HostPlan:
    if not any(c.preview for c in plan.changes):
        return plan
    return replace(plan, changes=tuple(_run(conn, plan, c) if c.preview else c for c in plan.changes))


def _run(conn: Connection, plan: HostPlan, change: Change) -> Change:
    assert change.preview is not None
    result = conn.run(change.preview.argv, timeout=change.preview.timeout, check=False)
    try:
        if not result.ok:
            lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
            raise PlanError(f"pip's dry run failed ({lines[-1].strip() if lines else f'exit {result.exit_code}'})")
        moved = dryrun.moves(result.stdout, plan.facts.env)
    except PlanError as err:
        return replace(change, warnings=change.warnings + (f"{err}: the plan shows only the requirements it names",))
    before = dict(change.before) if isinstance(change.before, dict) else {}
    after = dict(change.after) if isinstance(change.after, dict) else {}
    others = [n for n in moved if n not in after]
    for name, (old, new) in moved.items():
        # A requirement the change names keeps why it is wanted beside the version pip chose.
        before[name], after[name] = old, f"{new}, for {after[name]}" if isinstance(after.get(name), str) else new
    shown = ", ".join(f"{n} {moved[n][0] or '(none)'} -> {moved[n][1]}" for n in others)
    summary = change.summary + (f"; pip also moves {shown}" if others else "")
    return replace(change, summary=summary, before=before, after=after,
                   data={**change.data, "pip": {n: [old, new] for n, (old, new) in moved.items()}},
                   replaces=change.replaces | {n for n, (old, _) in moved.items() if old is not None})
