"""Turn (profile, facts) into a HostPlan. Pure: nothing here touches a host."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from provisioner.config.model import Profile
from provisioner.errors import PlanError
from provisioner.facts.gather import base_probe
from provisioner.facts.model import Facts, Probe
from provisioner.resources import ORDER
from provisioner.resources.base import Change, Handler, Note, ResourcePlan, Step


@dataclass(frozen=True)
class HostPlan:
    """What one host needs. `errors` are reasons it cannot be converged (shown, host fails)."""

    host: str
    facts: Facts
    changes: tuple[Change, ...] = ()
    notes: tuple[Note, ...] = ()
    errors: tuple[str, ...] = ()
    handlers: Mapping[str, Handler] = field(default_factory=dict)   # by name, as changes notify them
    prelude: tuple[Step, ...] = ()              # before the first change (a snapshot); see ResourcePlan
    postlude: tuple[Step, ...] = ()             # after the changes were confirmed

    @property
    def converged(self) -> bool:
        return not self.changes and not self.errors

    @property
    def notify(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for change in self.changes:
            out |= change.notify
        return out


def probe_for(profile: Profile) -> Probe:
    """Everything the facts script must look at for this profile: one merged probe."""
    probe = base_probe(profile)
    for resource in ORDER:
        probe = probe | resource.probe(profile)
    return probe


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
    lines = tuple(f"{', '.join(names)}: {message}" for message, names in errors.items())
    return host_plan(facts, results, lines)


def host_plan(facts: Facts, results: Sequence[ResourcePlan], errors: Sequence[str] = ()) -> HostPlan:
    """One HostPlan of resource plans, in their order."""
    return HostPlan(facts.host, facts, tuple(c for r in results for c in r.changes),
                    tuple(n for r in results for n in r.notes), tuple(errors),
                    {h.name: h for r in results for h in r.handlers},
                    tuple(s for r in results for s in r.prelude), tuple(s for r in results for s in r.postlude))
