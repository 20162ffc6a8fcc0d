"""Plans that show everything: each change that carries a dry run (`Change.preview`, pip's
`--dry-run --report` of an install into the venv) has it run on the host, and every distribution
pip would add or move is put into the change's before/after, its diff and `data["pip"]` (where a
snapshot's record of the change can read it), and each installed one it moves into `replaces` (the
snapshot before the change keeps its wheel).

Costs a round trip per such change, and nothing when none is planned: a converged plan stays at one.
An apply plans twice (once to see whether anything differs, once more under the lock): given the
same `DryRuns`, the second plan reuses pip's answer to the same dry run while the venv's facts
(its interpreter and distributions: what pip's answer depends on, with its arguments) are the ones
it was run on, so an apply runs each dry run once (pip's start alone is most of a second of CPU).
"""

from __future__ import annotations

import json
from dataclasses import replace

from provisioner.connection.base import Connection, Result, as_whom
from provisioner.errors import PlanError
from provisioner.facts.parse import facts_to_json
from provisioner.plan.build import HostPlan
from provisioner.resources import dryrun
from provisioner.resources.base import Change


class DryRuns:
    """One host's dry-run answers, by the venv's facts they were run on and the dry run itself."""

    def __init__(self) -> None:
        self._answers: dict[tuple[str, tuple[str, ...]], Result] = {}

    def run(self, conn: Connection, venv: str, change: Change) -> Result:
        assert change.preview is not None
        key = (venv, tuple(change.preview.argv))
        if key not in self._answers:
            self._answers[key] = as_whom(conn, False).run(change.preview.argv, timeout=change.preview.timeout, check=False)
        return self._answers[key]


def previewed(conn: Connection, plan: HostPlan, dry_runs: DryRuns | None = None) -> HostPlan:
    if not any(c.preview for c in plan.changes):
        return plan
    dry_runs = dry_runs or DryRuns()
    venv = json.dumps(facts_to_json(plan.facts)["env"], sort_keys=True)
    return replace(plan, changes=tuple(_answered(plan, c, dry_runs.run(conn, venv, c)) if c.preview else c
                                       for c in plan.changes))


def _answered(plan: HostPlan, change: Change, result: Result) -> Change:
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
