"""Saved plans (Terraform's `plan -out`, then `apply PLANFILE`): what was reviewed is what is applied.

`provision plan PROFILE --out PLAN` writes, for each host, the changes it would make and the facts
they were planned from (every fact that a plan reads, less what moves by itself: free VRAM and disk,
timings, PIDs). `provision apply PLAN` plans each host again from its facts now and applies only when
those facts are the saved ones and the plan is the same changes; a host whose facts changed is
refused, naming what changed, and the profile must be the one the plan was made from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from provisioner.config.model import Profile
from provisioner.errors import UsageError
from provisioner.facts.gather import gather
from provisioner.facts.model import Facts
from provisioner.facts.parse import facts_to_json
from provisioner.plan.apply import Planner
from provisioner.plan.build import HostPlan, build_plan, keeping_replaced, probe_for
from provisioner.plan.preview import previewed

FORMAT = "provision saved plan 1"
# Facts that change by themselves between a plan and its apply: they say nothing about what to do.
VOLATILE = ("elapsed_s", "vram_free_mib", "vram_used_mib", "free", "mtime_ns", "pid", "cmdline", "main_pid", "http")
SHOWN = 5          # changed facts named in a refusal


def fingerprint(facts: Facts) -> dict[str, Any]:
    """The facts as flat `path: value` pairs, what moves by itself left out."""
    flat: dict[str, Any] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, Mapping):
            for key, sub in value.items():
                if key not in VOLATILE:
                    walk(sub, f"{path}.{key}" if path else str(key))
        elif isinstance(value, list) and value and all(isinstance(v, (Mapping, list)) for v in value):
            for index, sub in enumerate(value):
                walk(sub, f"{path}[{index}]")
        else:
            flat[path] = value
    walk(facts_to_json(facts), "")
    return flat


def changed_facts(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """`path: then -> now` for each fact that differs (the first SHOWN, then how many more)."""
    keys = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    lines = [f"{k}: {_short(saved.get(k))} -> {_short(now.get(k))}" for k in keys[:SHOWN]]
    return lines + ([f"and {len(keys) - SHOWN} more"] if len(keys) > SHOWN else [])


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def changes_of(plan: HostPlan) -> list[str]:
    """The plan as it is reviewed: one line per change, and the handlers it owes."""
    return [f"{c.action} {c.resource} {c.key}: {c.summary}" for c in plan.changes] + \
        [f"owed {name}" for name in sorted(plan.owed)]


def profile_digest(data: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def write(path: str, profile_file: str, profile_data: Mapping[str, Any], plans: Mapping[str, HostPlan]) -> None:
    doc = {"format": FORMAT, "profile": str(Path(profile_file).resolve()), "profile_sha256": profile_digest(profile_data),
           "hosts": {name: {"changes": changes_of(p), "facts": fingerprint(p.facts)} for name, p in sorted(plans.items())}}
    Path(path).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


@dataclass(frozen=True)
class SavedPlan:
    file: str
    profile: str
    profile_sha256: str
    hosts: Mapping[str, Mapping[str, Any]]

    def planner(self, profile: Profile, host: str, *, undo_required: bool = False) -> Planner:
        """The host's plan now, as `plan --out` made it (pip's dry run, the snapshot keeping what
        the changes replace: see `profile_planner`), refused (an error of the plan) when it has
        changes and either its facts or its changes are not the saved ones. A plan without changes
        is what it is: the confirmation after the apply, or a host someone converged meanwhile."""
        saved = self.hosts[host]
        probe = probe_for(profile)

        def plan(conn: Any) -> HostPlan:
            now = keeping_replaced(profile, previewed(conn, build_plan(profile, gather(conn, profile, probe))),
                                   undo_required=undo_required)
            if now.converged or now.errors:
                return now
            differ = changed_facts(saved["facts"], fingerprint(now.facts))
            if differ:
                return replace(now, errors=(f"its facts changed since {self.file} was written ({'; '.join(differ)}): "
                                            "plan again and review",))
            if changes_of(now) != list(saved["changes"]):
                return replace(now, errors=(f"its plan is not the one {self.file} holds (the same facts give other "
                                            "changes: the Hub or a release moved?): plan again and review",))
            return now
        return plan


def read(path: str) -> SavedPlan | None:
    """The saved plan at `path`, or None when the file is no saved plan (a profile)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
            if not head.lstrip().startswith(b"{"):
                return None
            doc = json.loads(head + fh.read())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    try:
        return SavedPlan(path, str(doc["profile"]), str(doc["profile_sha256"]), dict(doc["hosts"]))
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"{path}: a damaged saved plan (write it again with `provision plan PROFILE --out {path}`)") from None


def checked_profile(saved: SavedPlan, load: Callable[[str], Any]) -> Any:
    """The profile the plan was made from, loaded; UsageError when it changed since."""
    loaded = load(saved.profile)
    if profile_digest(loaded.data) != saved.profile_sha256:
        raise UsageError(f"{saved.file}: the profile {saved.profile} changed since this plan was written: "
                         "plan again and review")
    return loaded
