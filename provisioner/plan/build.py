"""Turn (profile, facts) into a HostPlan. Pure: nothing here touches a host."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from provisioner.config.model import Profile
from provisioner.errors import PlanError
from provisioner.facts.gather import base_probe
from provisioner.facts.model import Facts, Probe, Space
from provisioner.plan import owed
from provisioner.facts.owed import Owed
from provisioner.resources import ORDER, retention, snapshot
from provisioner.resources.base import Change, Fetch, Handler, Note, ResourcePlan, Step, resumable, size_text


@dataclass(frozen=True)
class HostPlan:
    """What one host needs. `errors` are reasons it cannot be converged (shown, host fails);
    `owed`: handlers an interrupted apply left to run (the host recorded them), run by the next."""

    host: str
    facts: Facts
    changes: tuple[Change, ...] = ()
    notes: tuple[Note, ...] = ()
    errors: tuple[str, ...] = ()
    handlers: Mapping[str, Handler] = field(default_factory=dict)   # by name, as changes notify them
    owed: Mapping[str, Owed] = field(default_factory=dict)          # by handler name
    prelude: tuple[Step, ...] = ()              # before the first change (a snapshot); see ResourcePlan
    postlude: tuple[Step, ...] = ()             # after the changes were confirmed

    @property
    def converged(self) -> bool:
        return not self.changes and not self.errors and not self.owed

    @property
    def notify(self) -> frozenset[str]:
        out: frozenset[str] = frozenset(self.owed)
        for change in self.changes:
            out |= change.notify
        return out


def probe_for(profile: Profile) -> Probe:
    """Everything the facts script must look at for this profile: one merged probe."""
    probe = base_probe(profile) | owed.probe(profile)
    for resource in ORDER:
        probe = probe | resource.probe(profile)
    return probe


DISK_MARGIN_BYTES = 2**30  # room left on each filesystem for ComfyUI's outputs, logs and temp files


def disk_problems(facts: Facts, changes: Sequence[Change]) -> dict[str, list[str]]:
    """Each filesystem that the planned downloads do not fit on (with the margin), and the
    resources whose files land there. Grouped by the filesystem each file lands on, as the host
    resolves its folder (models/ may be a link to another disk), not by the ComfyUI root's."""
    need: dict[int | str, tuple[Space, int, list[str]]] = {}
    for change in changes:
        for step in change.steps:
            if not isinstance(step, Fetch) or not step.size:
                continue
            space = facts.space_for(step.dest)
            key = space.dev if space.dev >= 0 else space.dir
            _, total, names = need.get(key, (space, 0, []))
            need[key] = (space, total + step.size - resumable(facts, step.dest, step.size),
                         names + [change.resource] * (change.resource not in names))
    problems = {}
    for space, total, names in need.values():
        if total and total + DISK_MARGIN_BYTES > space.free:
            what = "the model files" if names == ["model"] else "the downloads"
            hint = " or choose a smaller model.variant" if "model" in names else ""
            problems[f"not enough disk at {space.dir}: {what} need {size_text(total)} "
                     f"(+{size_text(DISK_MARGIN_BYTES)} margin), {size_text(space.free)} free; "
                     f"free space there{hint}"] = names
    return problems


def owner_problem(profile: Profile, facts: Facts, changes: Sequence[Change]) -> str | None:
    """Files provision writes under ComfyUI's root must belong to the root's owner: a login that
    is neither that owner nor root, with changes to make there, works as the owner through sudo
    (facts/gather.py: `works_as`); one that cannot become the owner is refused before any change,
    with sudo's reason."""
    login = facts.login
    writes = any(not getattr(step, "system", False) for c in changes for step in c.steps)
    if not writes or login.uid in (None, 0) or login.root_owner_uid in (None, login.uid) or login.works_as:
        return None
    if login.works_as_error:
        return (f"{profile.comfyui.root} belongs to {login.root_owner}, whom provision works there as: "
                f"{login.works_as_error}")
    return (f"{profile.comfyui.root} belongs to {login.root_owner}, and provision would write there as "
            f"{login.user}: set ansible_become: true (sudo) to work there as {login.root_owner}, connect as "
            f"{login.root_owner} (ansible_user), or give the root to {login.user}")


def build_plan(profile: Profile, facts: Facts) -> HostPlan:
    """Ask every resource what differs. Every resource is asked even after one fails, so a
    single `provision plan` shows all the reasons a host cannot be converged, not just the first."""
    results: list[ResourcePlan] = []
    errors: dict[str, list[str]] = {}           # message -> the resources that raised it
    for resource in ORDER:
        try:
            results.append(resource.plan(profile, facts))
        except PlanError as err:
            # One cause (a GPU nunchaku cannot run) reaches several resources: say it once.
            errors.setdefault(str(err), []).append(resource.name)
    for message, names in disk_problems(facts, [c for r in results for c in r.changes]).items():
        errors.setdefault(message, []).extend(names)
    foreign = owner_problem(profile, facts, [c for r in results for c in r.changes])
    if foreign:
        errors.setdefault(foreign, []).append("apply")
    lines = tuple(f"{', '.join(names)}: {message}" for message, names in errors.items())
    return engine_plan(profile, facts, results, lines)


def engine_plan(profile: Profile, facts: Facts, results: Sequence[ResourcePlan],
                errors: Sequence[str] = ()) -> HostPlan:
    """The resources' plans plus what the engine itself owes the host, whatever the run converges
    it to (an apply, a rollback): the temporary files killed writes left in its own folders, and
    the handlers an interrupted run recorded and never ran (plan/owed.py)."""
    results = list(results)
    if why := owed.linked_away(profile, facts):
        errors = (*errors, f"state: {why}")
    for where in (profile.comfyui.state_dir, owed.folder(profile)):
        leftovers = retention.temps(facts.listings.get(where))
        cleanup = retention.cleanup("state", where, leftovers, "what killed writes left")
        if cleanup:
            results.append(ResourcePlan(changes=(cleanup,)))
    runnable, cannot = owed.split(owed.read(profile, facts), {h.name: h for r in results for h in r.handlers},
                                  profile)
    results.append(ResourcePlan(notes=tuple(Note("apply", line) for line in cannot)))
    return host_plan(facts, results, errors, runnable)


def host_plan(facts: Facts, results: Sequence[ResourcePlan], errors: Sequence[str] = (),
              owed_handlers: Mapping[str, Owed] | None = None) -> HostPlan:
    """One HostPlan of resource plans, in their order."""
    return HostPlan(facts.host, facts, tuple(c for r in results for c in r.changes),
                    tuple(n for r in results for n in r.notes), tuple(errors),
                    {h.name: h for r in results for h in r.handlers}, dict(owed_handlers or {}),
                    tuple(s for r in results for s in r.prelude), tuple(s for r in results for s in r.postlude))


def keeping_replaced(profile: Profile, plan: HostPlan, *, undo_required: bool = False) -> HostPlan:
    """An apply's plan whose snapshot before the changes keeps the wheels of the distributions they
    replace, known once pip's dry run ran (plan/preview.py), and says so; `undo_required` (the
    verify gate): one it cannot keep stops the host before any change."""
    before = snapshot.before_apply(profile, plan.facts, plan.changes, undo_required=undo_required)
    return replace(plan, prelude=before.prelude, notes=plan.notes + before.notes)
