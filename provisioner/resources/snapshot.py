"""Snapshots of what a host runs, and a snapshot as the desired state of a rollback.

Every plan hands the engine a prelude and a postlude: `remote/snapshot.py` records the host before
the first change (always a new snapshot: it is the point a rollback returns to) and after the
changes were confirmed (a confirmed state). `choose` picks the snapshot a rollback restores;
`restore` hands it to the resources, each planning its own part as it plans a profile (the core
and plugin checkouts, the venv's exact distributions, the backend's wheel folder, the workflow
files, the units, the model files), so a rollback is shown before it runs (`rollback --check`),
runs under the lock, restarts ComfyUI once and is confirmed by planning again. This module plans
nothing of its own: it says which snapshot, and what changed between two (`differences`).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone

from provisioner import remote
from provisioner.config.model import Profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Probe, PythonEnv
from provisioner.facts.snapshots import Checkout, Dist, HostSnapshots, HostState, Snapshot, folder, workflow_dirs
from provisioner.remote.snapshot import ID_RE
from provisioner.catalog.requirements import HELD, HELD_PREFIX
from provisioner.resources import backend, core, models, plugin, releases, service, venv, workflow
from provisioner.resources.base import Change, Note, ResourcePlan, Run

name = "snapshot"

BEFORE_APPLY, AFTER_APPLY = "before apply", "after apply"
BEFORE_ROLLBACK, AFTER_ROLLBACK = "before rollback", "after rollback"
# Where the engine keeps the program's answers ({"id", "time", "reused", ...}) in the outcome.
BEFORE, AFTER = "snapshot_before", "snapshot_after"
TAKE_TIMEOUT_S = 900.0      # keeping a multi-GB wheel file the first time copies it (where no link can)


def probe(profile: Profile) -> Probe:
    return Probe()


def profile_record(profile: Profile) -> dict[str, object]:
    """The profile as the snapshot keeps it: its name, file and merged keys."""
    return {"name": profile.name, "file": profile.file, "data": dict(profile.raw)}


def index_sources(profile: Profile) -> dict[str, object]:
    """What the snapshot program records each index distribution's source from: the venv
    resource's torch source arguments for the torch family, the profile's pip settings for the rest."""
    torch = profile.comfyui.torch
    return {"pip": list(profile.pip.args()), "held": sorted(HELD), "held_prefix": HELD_PREFIX,
            "torch": None if torch is None else list(venv.source_template(torch, profile))}


def venv_known(env: PythonEnv) -> dict[str, object] | None:
    """The venv as the snapshot program lists it, with the fingerprint it holds while true; None
    where the facts have no fingerprint (the snapshot program then asks the venv itself)."""
    if env.fingerprint is None or env.error is not None or not env.exists:
        return None
    return {"fingerprint": env.fingerprint,
            "listed": [{"name": d.name, "version": d.version, "direct_url": d.direct_url}
                       for d in env.distributions.values()]}


def take_step(profile: Profile, taken: str, *, answer: str, reuse: bool = True,
              protect: tuple[str, ...] = (), replaced: tuple[str, ...] = (), undo_required: bool = False,
              venv: PythonEnv | None = None) -> Run:
    """Run the snapshot program: record the host, keep its wheel files, prune to `snapshots.keep`
    (sparing `protect`). `reuse`: a state equal to the newest snapshot's answers that one. An
    `after` snapshot is taken once the changes were confirmed: it records a confirmed state.
    `replaced`: the distributions the run replaces, whose wheels it keeps too (fetched from their
    index and checked); `undo_required`: one it cannot keep fails the take, and the run changes nothing.
    `venv`: the venv as the facts read it; while it keeps their fingerprint (no change touched it),
    the program takes its listing from there instead of starting the venv's interpreter."""
    spec = profile.comfyui
    request = remote.snapshot_request(
        mode="take", folder=folder(profile), root=spec.root, python=spec.python, checksums=spec.checksums,
        workflow_dirs=workflow_dirs(profile), taken=taken, profile=profile_record(profile),
        keep=profile.snapshots.keep, protect=protect, reuse=reuse, sources=index_sources(profile),
        confirmed=taken.startswith("after"), units=service.recorded_units(profile), replaced=replaced,
        undo_required=undo_required, pip_timeout=profile.timeouts.pip_s,
        venv_known=venv_known(venv) if venv is not None else None)
    # Fetching and checking what the run replaces (torch is GBs) adds up to a pip run's time.
    timeout = TAKE_TIMEOUT_S + (profile.timeouts.pip_s if replaced else 0.0)
    return Run(remote.argv("snapshot"), stdin=request, what=f"snapshot what the host runs ({taken})",
               timeout=timeout, answer=answer)


def replaced(changes: Iterable[Change]) -> tuple[str, ...]:
    """The installed distributions the changes replace or remove (canonical names), as the
    resources and pip's dry run said: the snapshot before them keeps their wheels."""
    return tuple(sorted({key for change in changes for key in change.replaces}))


def before_apply(profile: Profile, facts: Facts, changes: Iterable[Change] = (), *,
                 undo_required: bool = False) -> ResourcePlan:
    """The snapshot before an apply's changes, keeping the wheels of what they replace, and the
    note that says so in the plan. It never reuses an older one, so the newest `before apply`
    snapshot is always the state the last apply started from. `undo_required` (the verify gate):
    a wheel it cannot keep fails it, so the apply changes nothing."""
    names = replaced(changes)
    notes: tuple[Note, ...] = ()
    if names:
        dists = facts.env.distributions
        shown = ", ".join(f"{dists[k].name} {dists[k].version}" if k in dists else k for k in names)
        notes = (Note(name, f"before the changes, the snapshot keeps the wheels of {shown}, which they replace (each "
                            "checked against what pip installed): a rollback reinstalls them from there"
                            + ("; one it cannot keep stops this host, unchanged (--verify-gate)" if undo_required
                               else "; one it cannot keep is said before the first change"), "info"),)
    return ResourcePlan(notes=notes, prelude=(take_step(profile, BEFORE_APPLY, answer=BEFORE, reuse=False,
                                                        replaced=names, undo_required=undo_required,
                                                        venv=facts.env),))


def plan(profile: Profile, facts: Facts) -> ResourcePlan:
    """No change of its own: the snapshots around an apply's changes (the one before keeps no
    wheels yet: what the changes replace is known once pip's dry run ran, see `before_apply`)."""
    return ResourcePlan(prelude=before_apply(profile, facts).prelude,
                        postlude=(take_step(profile, AFTER_APPLY, answer=AFTER, venv=facts.env),))


def _unreadable_id(error: str) -> str:
    """The id an error line of the snapshot program names (`ID.json: why`)."""
    return error.split(".json", 1)[0] if ID_RE.match(error[:19]) else ""


def choose(found: HostSnapshots, ident: str | None) -> tuple[Snapshot, str]:
    """The snapshot `ident` names (an id or the start of one), or by default the newest confirmed
    state an apply started from: a rollback undoes the last apply (and the broken state a failed
    one left is skipped), and running it again changes nothing more. With the reason, for the plan.
    A default whose candidate might be a snapshot that cannot be read stops: `--to` is the way past."""
    if ident:
        snap = found.find(ident)
        if snap is None:
            starts = [s.id for s in found.snapshots if s.id.startswith(ident)]
            if starts:
                raise PlanError(f"{ident} is the start of {len(starts)} snapshot ids ({', '.join(starts[:4])}"
                                f"{', …' if len(starts) > 4 else ''}): give more of it")
            have = ", ".join(s.id for s in found.snapshots[-5:]) or "none"
            raise PlanError(f"no snapshot {ident} on this host (its newest: {have}); `provision history` lists them")
        return snap, "asked for by its id"
    before = [s for s in found.snapshots if s.taken == BEFORE_APPLY]
    confirmed = [s for s in before if s.confirmed is not False]
    newest = confirmed[-1].id if confirmed else ""
    unreadable = sorted((e for e in found.errors if _unreadable_id(e) > newest), reverse=True)
    if unreadable:
        raise PlanError(f"snapshot {unreadable[0]} (unreadable) is newer than any this rollback could restore: it "
                        "may be the state to return to, so nothing is changed; repair or remove it, or name the "
                        "snapshot to restore with --to ID (`provision history` lists them)")
    if not confirmed:
        raise PlanError("no confirmed snapshot was taken before an apply on this host: nothing to roll back to "
                        "(`provision history` lists its snapshots; --to ID restores one)")
    skipped = [s.id for s in before if s.confirmed is False and s.id > newest]
    why = "the newest confirmed state an apply started from"
    if skipped:
        why += (f"; skipped {', '.join(skipped)}: what a run that did not finish left, never confirmed "
                "(--to ID restores one anyway)")
    return confirmed[-1], why


# --- the rollback: snapshot + state now -> changes ------------------------------------------------

def restore(profile: Profile, target: Snapshot, now: HostState, *, facts: Facts | None = None,
            kept: Mapping[str, str] | None = None, lister: releases.Lister = releases.list_wheels,
            why: str = "", at: datetime | None = None) -> ResourcePlan:
    """Changes that make the host run what `target` recorded, planned by each resource for its part;
    PlanError naming everything that cannot be restored. `kept`: the kept wheels' sha256 as the host
    reads them now; `lister`: where a gone one is found again; with `facts`, the backend wheels the
    restored venv does not use go too; `why`: the reason the snapshot was chosen, for the plan;
    `at` names the folders moved aside (tests pin it)."""
    stamp = (at or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    problems: list[str] = []
    state = "confirmed" if target.confirmed else "not confirmed" if target.confirmed is False else None
    state = f"{state}, verified" if state and target.verified else f"{state}, failed verification" \
        if state and target.verified is False else state
    notes: list[Note] = [Note(name, f"restores snapshot {target.id} ({target.taken}, {target.time}"
                                    f"{', profile ' + target.profile if target.profile else ''}"
                                    f"{', ' + state if state else ''}){': ' + why if why else ''}", "info")]
    fetch, install = None, None
    try:
        fetch, install = venv.exact(profile, target, now.distributions, now.venv_error, kept,
                                    lambda dist: backend.refetch(profile, dist, lister))
    except PlanError as err:
        problems.append(str(err))
    # What the venv needs and the commits the checkouts move to are fetched and checked before any
    # change: a source that no longer serves a version, or a commit gone from its origin, fails the
    # rollback while the host is still as it was.
    fetched: list[tuple[str, str]] = []
    moves: list[Change | None] = [core.restore(profile, target.state.comfyui, now.comfyui, problems, notes, fetched)]
    moves.extend(plugin.restore_nodes(profile, target.state.custom_nodes, now.custom_nodes, stamp, problems, notes,
                                      fetched))
    found: list[Change | None] = [fetch, plugin.fetch_commits(fetched), *moves, install]
    found.extend(workflow.restore(target.state.workflows, now.workflows, notes))
    try:
        unit_changes, unit_notes = service.restore_units(profile, target.state.units, now.units, facts)
        found.extend(unit_changes)
        notes.extend(unit_notes)
    except PlanError as err:
        problems.append(str(err))
    found.extend(models.restore(profile, target.state.models, now.models, notes))
    found.append(backend.unused_wheels(profile, target.state.distributions or {}, facts))
    if problems:
        raise PlanError("; ".join(problems))
    return ResourcePlan(
        changes=tuple(c for c in found if c is not None), notes=tuple(notes),
        handlers=(service.restart_handler(profile),),
        prelude=(take_step(profile, BEFORE_ROLLBACK, answer=BEFORE, protect=(target.id,),
                           replaced=replaced(c for c in found if c is not None),
                           venv=facts.env if facts is not None else None),),
        postlude=(take_step(profile, AFTER_ROLLBACK, answer=AFTER, venv=facts.env if facts is not None else None),))


# --- history: what changed between two states -------------------------------------------------------

def _at(co: Checkout | None) -> str:
    if co is None:
        return "absent"
    if not co.repo:
        return "a plain folder"
    where = ", ".join(co.tags) or (co.commit or "no commit")[:12]
    return f"{where}{' (modified)' if co.dirty else ''}"


def _dist(d: Dist) -> str:
    return f"{d.name} {d.shown}"


def differences(old: HostState, new: HostState) -> list[str]:
    """What changed from `old` to `new`, one line each; [] when the host runs the same."""
    lines: list[str] = []
    if old.comfyui != new.comfyui or old.comfyui_version != new.comfyui_version:
        lines.append(f"ComfyUI {old.comfyui_version or '?'} {_at(old.comfyui)} -> "
                     f"{new.comfyui_version or '?'} {_at(new.comfyui)}")
    for node in sorted(set(old.custom_nodes) | set(new.custom_nodes)):
        a, b = old.custom_nodes.get(node), new.custom_nodes.get(node)
        if a != b:
            lines.append(f"custom node {node}: {_at(a)} -> {_at(b)}")
    a_d, b_d = old.distributions or {}, new.distributions or {}
    if (old.distributions is None) != (new.distributions is None):
        # A venv made or lost is one line (its torch), not hundreds of `+ package` ones; one that
        # exists but could not be read says why.
        gone, there = (old, new) if old.distributions is None else (new, old)
        torch = (there.distributions or {}).get("torch")
        what = "created" if gone is old else "gone"
        if gone.venv_error and not gone.venv_error.endswith("does not exist"):
            what = f"{'readable again' if gone is old else 'unreadable'} ({gone.venv_error})"
        lines.append(f"venv {what}: {len(a_d or b_d)} distributions" + (f", torch {torch.shown}" if torch else ""))
        a_d = b_d = {}
    for key in sorted(set(a_d) | set(b_d)):
        x, y = a_d.get(key), b_d.get(key)
        if x == y:
            continue
        if x is None and y is not None:
            lines.append(f"+ {_dist(y)}")
        elif y is None and x is not None:
            lines.append(f"- {_dist(x)}")
        elif x is not None and y is not None:
            lines.append(f"~ {x.name} {x.shown} -> {y.shown}")
    for where in sorted(set(old.workflows) | set(new.workflows)):
        a_w, b_w = old.workflows.get(where) or {}, new.workflows.get(where) or {}
        for file in sorted(set(a_w) | set(b_w)):
            if a_w.get(file) != b_w.get(file):
                verb = "added" if file not in a_w else "removed" if file not in b_w else "changed"
                lines.append(f"workflow {posixpath.join(where, file)} {verb}")
    if old.units is not None and new.units is not None:
        for path in sorted(set(old.units) | set(new.units)):
            if old.units.get(path) != new.units.get(path):
                verb = "added" if path not in old.units else "removed" if path not in new.units else "changed"
                lines.append(f"unit {path} {verb}")
    for path in sorted(set(old.models) | set(new.models)):
        m, n = old.models.get(path), new.models.get(path)
        if m == n:
            continue
        if m is not None and n is not None and m.size == n.size and (m.sha256 is None or n.sha256 is None):
            continue                  # only hashed since: the same file
        verb = "added" if m is None else "removed" if n is None else "changed"
        lines.append(f"model {path} {verb}")
    return lines
