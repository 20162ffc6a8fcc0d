"""Snapshots of what a host runs, and the rollback to one.

Every plan hands the engine a prelude and a postlude: `remote/snapshot.py` records the host before
the first change (always a new snapshot: it is the point a rollback returns to) and after the
changes were confirmed. `restore` is the rollback: the Changes that make the host run what a
snapshot recorded (custom nodes at their commits, the venv's exact distributions, the workflow
files), computed from the snapshot and the host's state now like any plan, so a rollback is shown
before it runs (`rollback --check`), runs under the lock, restarts ComfyUI once and is confirmed
by planning again. Model files are never downloaded, and deleted only when the profile says so.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from datetime import datetime, timezone

from packaging.version import InvalidVersion, Version

from provisioner import remote
from provisioner.config.model import Profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Probe
from provisioner.facts.snapshots import (Checkout, Dist, HostSnapshots, HostState, ModelFile, Snapshot, WorkflowFile,
                                         folder, workflow_dirs)
from provisioner.resources import backend, retention, service
from provisioner.resources.base import RESTART, Change, Note, Put, ResourcePlan, Run, Step
from provisioner.resources.plugin import git, same_repo

name = "snapshot"

BEFORE_APPLY, AFTER_APPLY = "before apply", "after apply"
BEFORE_ROLLBACK, AFTER_ROLLBACK = "before rollback", "after rollback"
# Where the engine keeps the program's answers ({"id", "time", "reused", ...}) in the outcome.
BEFORE, AFTER = "snapshot_before", "snapshot_after"
TAKE_TIMEOUT_S = 900.0      # keeping a multi-GB wheel file the first time copies it (where no link can)
_SKIP = ".disabled"         # ComfyUI skips custom_nodes/ folders named so: a folder moved aside stays inert


def probe(profile: Profile) -> Probe:
    return Probe()


def profile_record(profile: Profile) -> dict[str, object]:
    """The profile as the snapshot keeps it: its name, file and merged keys."""
    return {"name": profile.name, "file": profile.file, "data": dict(profile.raw)}


def take_step(profile: Profile, taken: str, *, answer: str, reuse: bool = True,
              protect: tuple[str, ...] = ()) -> Run:
    """Run the snapshot program: record the host, keep its wheel files, prune to `snapshots.keep`
    (sparing `protect`). `reuse`: a state equal to the newest snapshot's answers that one."""
    spec = profile.comfyui
    request = remote.snapshot_request(
        mode="take", folder=folder(profile), root=spec.root, python=spec.python, checksums=spec.checksums,
        workflow_dirs=workflow_dirs(profile), taken=taken, profile=profile_record(profile),
        keep=profile.snapshots.keep, protect=protect, reuse=reuse)
    return Run(remote.argv("snapshot"), stdin=request, what=f"snapshot what the host runs ({taken})",
               timeout=TAKE_TIMEOUT_S, answer=answer)


def plan(profile: Profile, facts: Facts) -> ResourcePlan:
    """No change of its own: the snapshots around an apply's changes. The one before never reuses
    an older one, so the newest `before apply` snapshot is always the state the last apply started from."""
    return ResourcePlan(prelude=(take_step(profile, BEFORE_APPLY, answer=BEFORE, reuse=False),),
                        postlude=(take_step(profile, AFTER_APPLY, answer=AFTER),))


def choose(found: HostSnapshots, ident: str | None) -> Snapshot:
    """The snapshot `ident` names (an id or the start of one), or by default the one taken before
    the last apply: a rollback undoes it, and running it again changes nothing more."""
    if ident:
        snap = found.find(ident)
        if snap is None:
            starts = [s.id for s in found.snapshots if s.id.startswith(ident)]
            if starts:
                raise PlanError(f"{ident} is the start of {len(starts)} snapshot ids ({', '.join(starts[:4])}"
                                f"{', …' if len(starts) > 4 else ''}): give more of it")
            have = ", ".join(s.id for s in found.snapshots[-5:]) or "none"
            raise PlanError(f"no snapshot {ident} on this host (its newest: {have}); `provision history` lists them")
        return snap
    before = [s for s in found.snapshots if s.taken == BEFORE_APPLY]
    if not before:
        raise PlanError("no snapshot was taken before an apply on this host: nothing to roll back to "
                        "(`provision history` lists its snapshots; --to ID restores one)")
    return before[-1]


# --- the rollback: snapshot + state now -> changes ------------------------------------------------

def restore(profile: Profile, target: Snapshot, now: HostState, *, facts: Facts | None = None,
            at: datetime | None = None) -> ResourcePlan:
    """Changes that make the host run what `target` recorded; PlanError naming everything that
    cannot be restored. With `facts`, the backend wheels the restored venv does not use go too.
    `at` names the folders moved aside (tests pin it)."""
    stamp = (at or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    problems: list[str] = []
    notes: list[Note] = [Note(name, f"restores snapshot {target.id} ({target.taken}, {target.time}"
                                    f"{', profile ' + target.profile if target.profile else ''})", "info")]
    found: list[Change | None] = [_core(profile, target.state.comfyui, now.comfyui, problems, notes)]
    for node in sorted(set(target.state.custom_nodes) | set(now.custom_nodes)):
        found.append(_node(profile, node, target.state.custom_nodes.get(node), now.custom_nodes.get(node),
                           stamp, problems, notes))
    found.append(_venv(profile, target, now, problems))
    found.extend(_workflows(target.state.workflows, now.workflows, notes))
    found.extend(_models(profile, target.state.models, now.models, notes))
    found.append(_unused_wheels(profile, target, facts))
    if problems:
        raise PlanError("; ".join(problems))
    return ResourcePlan(
        changes=tuple(c for c in found if c is not None), notes=tuple(notes),
        handlers=(service.restart_handler(profile),),
        prelude=(take_step(profile, BEFORE_ROLLBACK, answer=BEFORE, protect=(target.id,)),),
        postlude=(take_step(profile, AFTER_ROLLBACK, answer=AFTER),))


def _shown(co: Checkout | None) -> dict[str, object] | None:
    if co is None:
        return None
    if not co.repo:
        return {"repo": "not a git checkout"}
    return {"tag": ", ".join(co.tags) or None, "commit": co.commit, "remote": co.remote, "dirty": list(co.dirty)}


def _checkout_commit(where: str, commit: str) -> tuple[Run, Run]:
    """Fetch only when the commit is not there already (a rollback must work offline when it can)."""
    have = ('git -c safe.directory="$1" -C "$1" cat-file -e "$2^{commit}" 2>/dev/null || '
            'exec git -c safe.directory="$1" -C "$1" fetch --quiet --force --tags origin')
    return (Run(("sh", "-c", have, "sh", where, commit), what=f"fetch {commit[:12]} unless it is there",
                timeout=900.0),
            Run(git(where, "checkout", "--quiet", "--detach", commit), what=f"checkout {commit[:12]}"))


def _core(profile: Profile, want: Checkout | None, have: Checkout | None, problems: list[str],
          notes: list[Note]) -> Change | None:
    """ComfyUI's own checkout goes back to its commit; it is never reset or cleaned (models/,
    custom_nodes/ and provision's own folder live inside it)."""
    root = profile.comfyui.root
    if want is None or not want.repo or want.commit is None or (have and have.commit == want.commit):
        return None
    if have is None or not have.repo:
        notes.append(Note(name, f"{root} was a git checkout at {want.commit[:12]} and is not one now: "
                                "ComfyUI's own checkout is not restored"))
        return None
    if have.dirty:
        problems.append(f"{root} has modified files ({', '.join(have.dirty[:5])}): a rollback never "
                        "discards changes to ComfyUI's own checkout; commit or discard them")
        return None
    return Change("core", root, "update", f"checkout ComfyUI {(have.commit or 'no commit')[:12]} -> "
                  f"{want.commit[:12]}", _shown(have), _shown(want), _checkout_commit(root, want.commit),
                  notify=RESTART)


def _clone_at(repo: str, commit: str, dest: str) -> tuple[Step, ...]:
    tmp = f"{dest}.provision-tmp{_SKIP}"
    return (Run(("mkdir", "-p", posixpath.dirname(dest)), what="create custom_nodes"),
            Run(("rm", "-rf", tmp), what="remove a clone an earlier run left unfinished"),
            Run(("git", "clone", "--quiet", "--no-checkout", repo, tmp), what=f"clone {repo}", timeout=900.0),
            Run(git(tmp, "checkout", "--quiet", "--detach", commit), what=f"checkout {commit[:12]}"),
            Run(("mv", tmp, dest), what=f"move the checkout into {dest}"))


def _node(profile: Profile, node: str, want: Checkout | None, have: Checkout | None, stamp: str,
          problems: list[str], notes: list[Note]) -> Change | None:
    path = posixpath.join(profile.comfyui.custom_nodes, node)
    aside = f"{path}.provision-rollback-{stamp}{_SKIP}"
    if want is None:
        if have is None:
            return None
        return Change("custom_nodes", path, "remove", f"move {node} aside: the snapshot has no such custom node",
                      _shown(have), None, (Run(("mv", path, aside), what=f"move {path} aside"),), notify=RESTART,
                      warnings=(f"{path} is moved to {aside}; nothing is deleted",))
    if not want.repo:
        if have is None:
            notes.append(Note(name, f"custom node {node} was a plain folder (not a git checkout): its files are "
                                    "not in snapshots, so it cannot be brought back"))
        return None
    if want.dirty:
        notes.append(Note(name, f"custom node {node} had modified files at the snapshot ({', '.join(want.dirty[:5])}): "
                                "snapshots record commits, not modifications; it is restored clean"))
    if want.commit is None:
        return None
    after: dict[str, object] = {"tag": ", ".join(want.tags) or None, "commit": want.commit, "remote": want.remote,
                                "dirty": []}
    if have is None or not have.repo:
        if not want.remote:
            problems.append(f"custom node {node} is not there and the snapshot recorded no origin to clone it from")
            return None
        moved: tuple[Step, ...] = (Run(("mv", path, aside), what=f"move {path} aside"),) if have else ()
        return Change("custom_nodes", path, "replace" if have else "create",
                      f"clone {node} at {want.commit[:12]}", _shown(have), after,
                      moved + _clone_at(want.remote, want.commit, path), notify=RESTART,
                      warnings=(f"{path} is not a git checkout: it is moved to {aside}",) if have else ())
    steps: list[Step] = []
    summary: list[str] = []
    warnings: list[str] = []
    if have.dirty:
        backup = f"{path}.provision-backup-{stamp}{_SKIP}"
        steps += [Run(("cp", "-a", path, backup), what=f"back up {path} to {backup}"),
                  Run(git(path, "reset", "--quiet", "--hard"), what="discard local modifications"),
                  Run(git(path, "clean", "-fd", "--quiet"), what="remove untracked files")]
        summary.append(f"discard {len(have.dirty)} local modification(s)")
        warnings.append(f"{path}: {', '.join(have.dirty[:8])} backed up to {backup}, then discarded")
    if want.remote and not same_repo(have.remote, want.remote):
        steps.append(Run(git(path, "remote", "set-url" if have.remote else "add", "origin", want.remote),
                         what="point origin where it pointed"))
        summary.append(f"origin {have.remote or '(none)'} -> {want.remote}")
    if have.commit != want.commit:
        steps += _checkout_commit(path, want.commit)
        was = ", ".join(have.tags) or (have.commit or "no commit")[:12]
        summary.append(f"checkout {node} {was} -> {', '.join(want.tags) or want.commit[:12]}")
    if not steps:
        return None
    return Change("custom_nodes", path, "update", "; ".join(summary), _shown(have), after, tuple(steps),
                  notify=RESTART, warnings=tuple(warnings))


def _venv(profile: Profile, target: Snapshot, now: HostState, problems: list[str]) -> Change | None:
    """Exactly the snapshot's distributions, torch included: what was added is uninstalled, what
    changed or went is installed again `--no-deps` at its version (`NAME==VERSION` from the
    profile's index, or the very wheel file it came from, kept with the snapshot)."""
    want, have = target.state.distributions, now.distributions
    if want is None:
        problems.append(f"the snapshot could not read the venv ({target.state.venv_error}): its distributions "
                        "cannot be restored")
        return None
    if have is None:
        problems.append(f"the venv {profile.comfyui.venv} cannot be read ({now.venv_error})")
        return None
    added = sorted(set(have) - set(want))
    back = sorted(k for k, d in want.items() if have.get(k) != d)
    if not added and not back:
        return None
    python = profile.comfyui.python
    steps: list[Step] = []
    if added:
        steps.append(Run((python, "-m", "pip", "uninstall", "--yes", "--disable-pip-version-check",
                          *(have[k].name for k in added)), what=f"pip uninstall {' '.join(added)}", timeout=1800.0))
    specs: list[str] = []
    for key in back:
        dist = want[key]
        if dist.kind == "index":
            specs.append(f"{dist.name}=={dist.version}")
        elif dist.kind == "url" and dist.url:
            specs.append(dist.url)
        elif dist.kind == "file" and dist.path and key in target.wheels:
            steps += _put_back(target.wheels[key], dist.path)
            specs.append(dist.path)
        elif dist.kind == "file":
            why = target.unkept.get(key, "not recorded")
            problems.append(f"{dist.name} {dist.version} was installed from {dist.path}, which the snapshot could "
                            f"not keep ({why})")
        else:
            problems.append(f"{dist.name} {dist.version} was installed from a {'folder' if dist.kind == 'dir' else 'VCS'} "
                            f"({dist.url}): a rollback cannot reinstall it")
    if specs:
        # --no-deps: exactly these versions, nothing resolved; --force-reinstall: a same-version
        # distribution from another file is replaced too.
        steps.append(Run((python, "-m", "pip", "install", "--no-deps", "--force-reinstall",
                          "--disable-pip-version-check", *profile.pip.args(), *specs),
                         what=f"pip install --no-deps {' '.join(specs)}", timeout=1800.0))
    before = {k: have[k].shown if k in have else None for k in [*back, *added]}
    after = {k: want[k].shown if k in want else None for k in [*back, *added]}
    parts = [f"{want[k].name} {have[k].version if k in have else '(none)'} -> {want[k].version}" for k in back]
    parts += [f"uninstall {have[k].name} {have[k].version}" for k in added]
    return Change("venv", profile.comfyui.venv, "update", "distributions as in the snapshot: " + ", ".join(parts),
                  before, after, tuple(steps), notify=RESTART)


def _unused_wheels(profile: Profile, target: Snapshot, facts: Facts | None) -> Change | None:
    """The backend wheels in provision's wheel folder that the restored venv does not use (what the
    apply being undone downloaded), removed as the backend change removes those it replaces."""
    held = facts.listings.get(backend.wheel_dir(profile)) if facts else None
    dists = target.state.distributions or {}
    installed = dists.get("nunchaku")
    try:
        keep = Version(installed.version) if installed else None
    except InvalidVersion:
        return None
    used = {posixpath.basename(d.path) for d in dists.values() if d.path}
    stale = [n for n in retention.stale_wheels(held, "nunchaku", keep) if n not in used]
    return retention.cleanup(backend.name, backend.wheel_dir(profile), stale, "wheels the restored backend does not use")


def _put_back(kept: str, dest: str) -> tuple[Run, ...]:
    """The kept wheel back at the path it was installed from, so pip records the same URL."""
    tmp = f"{dest}.provision-tmp"
    return (Run(("mkdir", "-p", posixpath.dirname(dest)), what=f"create {posixpath.dirname(dest)}"),
            Run(("cp", kept, tmp), what=f"copy the kept {posixpath.basename(dest)}"),
            Run(("mv", tmp, dest), what=f"put {posixpath.basename(dest)} back where it was installed from"))


def _text(f: WorkflowFile | None) -> str | None:
    return None if f is None else f.text


def _workflows(want: Mapping[str, Mapping[str, WorkflowFile] | None],
               have: Mapping[str, Mapping[str, WorkflowFile] | None], notes: list[Note]) -> list[Change]:
    """Each workflow folder the snapshot recorded back to its files: changed ones rewritten, added
    ones removed (a folder it recorded as absent goes too). Folders it did not record stay."""
    found: list[Change] = []
    for where, files in sorted(want.items()):
        now = have.get(where) or {}
        for file in sorted(set(files or {}) | set(now)):
            path = posixpath.join(where, file)
            old, new = now.get(file), (files or {}).get(file)
            if old == new:
                continue
            if new is None:
                found.append(Change("workflow", path, "remove", f"remove {path} (not in the snapshot)",
                                    _text(old) or "", None, (Run(("rm", "-f", path), what=f"remove {path}"),)))
            elif new.text is None:
                notes.append(Note(name, f"{path} differs from the snapshot, which recorded only its sha256 "
                                        f"({new.size} bytes, not text): it is left as it is"))
            else:
                steps: tuple[Step, ...] = (Put(path, new.text.encode(), what=f"write {path}"),)
                if files is not None and not have.get(where):
                    steps = (Run(("mkdir", "-p", where), what="create the workflow folder"), *steps)
                found.append(Change("workflow", path, "update" if old else "create",
                                    f"{'restore' if old else 'create'} {path} as in the snapshot",
                                    _text(old), new.text, steps))
        if files is None and have.get(where) is not None:
            found.append(Change("workflow", where, "remove", f"remove the folder {where} (not in the snapshot)",
                                None, None, (Run(("sh", "-c", 'rmdir "$1" 2>/dev/null || true', "sh", where),
                                                 what=f"remove {where} if empty"),)))
    return found


def _models(profile: Profile, want: Mapping[str, ModelFile], have: Mapping[str, ModelFile],
            notes: list[Note]) -> list[Change]:
    """Model files are kept: one the snapshot lacks is deleted only under `snapshots.remove_models`;
    one it has that differs or went is reported, never downloaded."""
    found: list[Change] = []
    extra: list[str] = []
    for path in sorted(set(want) | set(have)):
        w, h = want.get(path), have.get(path)
        if w is not None and h is None:
            notes.append(Note(name, f"{path} was there at the snapshot and is gone: a rollback never downloads "
                                    "model files (apply a profile that names it)"))
        elif w is not None and h is not None and (w.size != h.size or (w.sha256 and h.sha256 and w.sha256 != h.sha256)):
            notes.append(Note(name, f"{path} differs from the snapshot's ({h.size} bytes now, {w.size} then): "
                                    "a rollback never downloads model files"))
        elif w is None and h is not None:
            if profile.snapshots.remove_models:
                found.append(Change("model", path, "remove", f"delete {path} (not in the snapshot; "
                                    "snapshots.remove_models is on)", {"size": h.size, "sha256": h.sha256}, None,
                                    (Run(("rm", "-f", path), what=f"delete {path}"),)))
            else:
                extra.append(posixpath.basename(path))
    if extra:
        notes.append(Note(name, f"kept {len(extra)} model file(s) the snapshot lacks ({', '.join(extra[:5])}"
                                f"{' …' if len(extra) > 5 else ''}); snapshots.remove_models: true deletes them", "info"))
    return found


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
    for path in sorted(set(old.models) | set(new.models)):
        m, n = old.models.get(path), new.models.get(path)
        if m == n:
            continue
        if m is not None and n is not None and m.size == n.size and (m.sha256 is None or n.sha256 is None):
            continue                  # only hashed since: the same file
        verb = "added" if m is None else "removed" if n is None else "changed"
        lines.append(f"model {path} {verb}")
    return lines
