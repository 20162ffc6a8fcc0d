"""The ComfyUI-nunchaku node pack: a git checkout in custom_nodes/ detached at the pinned tag."""

from __future__ import annotations

import difflib
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone

from packaging.version import Version

from provisioner import remote
from provisioner.catalog.compat import plugin_version
from provisioner.config.model import Profile
from provisioner.errors import FactsError, PlanError
from provisioner.facts.model import Facts, GitCheckout, NodePack, Probe, RemoteTags, same_repo
from provisioner.facts.snapshots import Checkout
from provisioner.resources import pins, retention
from provisioner.resources.base import RESTART, Change, Note, ResourcePlan, Run, Step, changes

name = "plugin"

# ComfyUI imports every folder of custom_nodes/ except those ending in ".disabled": a backup or a
# half-done clone named this way can never be loaded as a second copy of the plugin.
_SKIP = ".disabled"


def path(profile: Profile) -> str:
    return posixpath.join(profile.comfyui.custom_nodes, profile.plugin.name)


def probe(profile: Profile) -> Probe:
    """The checkout, and the repository's tags when the checkout lacks the pinned one (the facts
    program asks the host's git only then: a converged host costs no network); custom_nodes/ for
    the backups and unfinished clones beside it (retention.py)."""
    dest = path(profile)
    return Probe(git=(dest,), remote_tags=((dest, profile.plugin.repo, profile.plugin.tag),),
                 listing=(profile.comfyui.custom_nodes,), node_packs=(profile.comfyui.custom_nodes,))


def nearest_tags(tag: str, tags: Sequence[str], limit: int = 5) -> list[str]:
    """The existing tags closest to `tag`: by version around it (newest first), else by spelling."""
    want = plugin_version(tag)
    versioned = sorted((v, t) for t in tags if (v := plugin_version(t)) is not None)
    if want is None or not versioned:
        return difflib.get_close_matches(tag, list(tags), n=limit, cutoff=0.0)
    below = [t for v, t in reversed(versioned) if v < want]
    above = [t for v, t in versioned if v > want]
    picked = [t for v, t in versioned if v == want][:limit]      # `v1.1` for `v1.1.0`
    while (below or above) and len(picked) < limit:     # alternate outwards from where `tag` would be
        for side in (below, above):
            if side and len(picked) < limit:
                picked.append(side.pop(0))
    return sorted(picked, key=lambda t: plugin_version(t) or Version("0"), reverse=True)


def tag_check(resource: str, key: str, tag: str, repo: str, answer: RemoteTags | None, *,
              or_commit: bool = False) -> Note | None:
    """PlanError when `repo` lacks the tag the setting `key` pins; a Note (of `resource`) when the
    host could not ask it. `or_commit`: the setting takes a commit as well."""
    if answer is None or answer.local:
        return None
    if answer.tags is None:
        return Note(resource, f"could not list the tags of {repo} from the host ({answer.error}): "
                              f"{key} {tag} is only checked when apply fetches it")
    if tag in answer.tags:
        return None
    what = f"{key} {tag} is not a tag of {repo}"
    near = nearest_tags(tag, answer.tags)
    if not near:
        raise PlanError(f"{what}, which has no tags" + (": pin a commit" if or_commit else ""))
    raise PlanError(what + (" (a branch is never pinned): pin one of its tags or a commit" if or_commit
                            else ": pin one of its tags"), near)


git = remote.git_argv     # every git a step runs: nothing a checkout configures runs (remote/__init__.py)


def copies(profile: Profile, facts: Facts) -> list[tuple[NodePack, str]]:
    """Every other folder of custom_nodes/ that is the plugin too, enabled or not, with what says
    so (ComfyUI-Manager and the Comfy Registry name it `comfyui-nunchaku`); provision's own backups
    and unfinished clones are not copies."""
    found = facts.node_packs.get(profile.comfyui.custom_nodes) or ()
    return [(pack, why) for pack in found
            if pack.path != path(profile) and ".provision-" not in pack.name
            and (why := pack.copy_of(profile.plugin.repo))]


def _one_copy(profile: Profile, facts: Facts) -> tuple[Note, ...]:
    """A PlanError when another enabled copy would load beside the plugin (ComfyUI imports both and
    keeps whichever registered last); a note naming the disabled ones."""
    dest, found = path(profile), copies(profile, facts)
    enabled = [(p, why) for p, why in found if p.enabled]
    if enabled:
        (other, why), *more = enabled
        also = f" (and {', '.join(p.path for p, _ in more)})" if more else ""
        if facts.git.get(dest, GitCheckout(dest, False)).exists:
            raise PlanError(f"{dest} and {other.path}{also} are both the plugin ({other.name}: {why}) and "
                            f"ComfyUI loads both: disable {other.name} (move it into "
                            f"{profile.comfyui.custom_nodes}/.disabled/, as ComfyUI-Manager does) or remove it")
        raise PlanError(f"the plugin is already installed as {other.path}{also} ({why}): a clone at {dest} "
                        f"would be a second copy that ComfyUI loads too; set plugin.name: {other.name} and "
                        f"plugin.adopt: true to take that copy over in place, or disable it (move it into "
                        f"{profile.comfyui.custom_nodes}/.disabled/, as ComfyUI-Manager does)")
    disabled = [p.path for p, _ in found]
    return (Note(name, f"disabled copies of the plugin, not loaded by ComfyUI: {', '.join(disabled)}"),) if disabled else ()


def _own_pack(profile: Profile, facts: Facts) -> str | None:
    """What says the folder at plugin.name is the plugin (for plugin.adopt), or None."""
    dest = path(profile)
    found = facts.node_packs.get(profile.comfyui.custom_nodes) or ()
    return next((why for p in found if p.path == dest and (why := p.copy_of(profile.plugin.repo))), None)


def state(co: GitCheckout) -> dict[str, object] | None:
    if not co.exists:
        return None
    return {"tag": ", ".join(co.tags) or None, "commit": co.head, "remote": co.remote,
            "dirty": list(co.dirty)}


def _listing(files: tuple[str, ...], limit: int = 8) -> str:
    more = f" and {len(files) - limit} more" if len(files) > limit else ""
    return ", ".join(files[:limit]) + more


def _clone(repo: str, ref: str, dest: str, *, timeout: float, into_place: bool = True) -> Run:
    """One step (remote.CLONE): a full clone of `repo` beside `dest` (not `--depth 1 --branch`: it
    can be re-tagged later), detached at `ref` (the tag, or the commit the lock pins it to), then
    renamed to `dest`; or left beside it (`into_place=False`) for a caller that first moves `dest`
    aside, then runs `_into_place`."""
    return Run(remote.clone_argv(repo, _tmp(dest), ref, dest if into_place else None),
               what=f"clone {repo} at {ref}" + (f" into {dest}" if into_place else " beside " + dest),
               timeout=timeout)


def _into_place(dest: str) -> Run:
    return Run(("mv", _tmp(dest), dest), what=f"move the checkout into {dest}")


def _tmp(dest: str) -> str:
    return f"{dest}.provision-tmp{_SKIP}"


def plan(profile: Profile, facts: Facts, *, now: datetime | None = None) -> ResourcePlan:
    """`now` names the backup folder; tests pin it, the engine leaves it to the clock. The backups
    beyond retention.KEEP_BACKUPS go with the change that makes another, or alone."""
    result, backed_up = _plan(profile, facts, now)
    listed = facts.listings.get(profile.comfyui.custom_nodes)
    if not result.changes:
        unfinished = [n for n in retention.temps(listed) if n == f"{profile.plugin.name}.provision-tmp{_SKIP}"]
        tidy = retention.cleanup(name, profile.comfyui.custom_nodes,
                                 retention.surplus_backups(listed, profile.plugin.name) + unfinished,
                                 f"plugin backups beyond the newest {retention.KEEP_BACKUPS}, unfinished clones")
        return replace(result, changes=(tidy,) if tidy else ())
    (change,) = result.changes
    surplus = retention.surplus_backups(listed, profile.plugin.name, adding=backed_up)
    if not surplus:
        return result
    step = retention.remove_step(profile.comfyui.custom_nodes, surplus,
                                 f"remove the oldest plugin backups (the newest {retention.KEEP_BACKUPS} are kept)")
    warn = f"{', '.join(surplus)} removed: only the newest {retention.KEEP_BACKUPS} backups are kept"
    return replace(result, changes=(replace(change, steps=change.steps + (step,),
                                            warnings=change.warnings + (warn,)),))


def _plan(profile: Profile, facts: Facts, now: datetime | None) -> tuple[ResourcePlan, int]:
    """The change (or none) and how many backups it makes."""
    spec, dest = profile.plugin, path(profile)
    co = facts.git.get(dest)
    if co is None:
        raise FactsError(f"facts lack the git state of {dest}: the plugin probe did not run")
    note = tag_check(name, "plugin.tag", spec.tag, spec.repo, facts.remote_tags.get((dest, spec.repo, spec.tag)))
    notes = ((note,) if note else ()) + _one_copy(profile, facts)
    pin = pins.git(profile, "plugin", spec.repo, spec.tag)     # under a lock: the commit the tag was
    wanted = pin.commit if pin else spec.tag
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    backup = f"{dest}.provision-backup-{stamp}{_SKIP}"
    after: dict[str, object] = {"tag": spec.tag, "commit": pin.commit if pin else f"(the commit of {spec.tag})",
                                "remote": spec.repo, "dirty": []}
    label = f"{spec.name} {spec.tag}"

    if not co.exists:
        return changes(Change("plugin", dest, "create", f"clone {label} into {dest}", None, after,
                              (_clone(spec.repo, wanted, dest, timeout=profile.timeouts.git_s),),
                              notify=RESTART), notes=notes), 0
    if co.foreign:
        raise PlanError(f"{dest} cannot be read: {co.error}; give it to that user, or remove it")
    if co.error:
        # git is missing or failing: what is there cannot be judged, so nothing is moved.
        raise PlanError(f"{dest} cannot be read by the host's git ({co.error}); install or repair git "
                        "on the host, then plan again")
    adopted = _own_pack(profile, facts) if spec.adopt else None
    if not co.is_repo:
        if not (spec.force or adopted):
            why = _own_pack(profile, facts)
            raise PlanError(f"{dest} exists but is not a git checkout" + (
                f" ({why}): set plugin.adopt: true to take it over (it is moved aside once a clone is ready)"
                if why else "; move it away, or set plugin.force: true to move it aside and clone"))
        warn = f"{dest} is not a git checkout: it is moved to {backup} once the clone is ready, nothing is deleted"
        # The clone first: a clone that fails leaves the folder where it was.
        replaced = (_clone(spec.repo, wanted, dest, timeout=profile.timeouts.git_s, into_place=False),
                    Run(("mv", dest, backup), what=f"back up {dest}"), _into_place(dest))
        verb = f"adopt {dest} ({adopted}): clone {label} in its place" if adopted else f"clone {label} and move {dest} aside"
        return changes(Change("plugin", dest, "replace", verb,
                              state(co), after, replaced, notify=RESTART, warnings=(warn,)), notes=notes), 1

    remote_ok = same_repo(co.remote, spec.repo)
    tag_ok = co.head == pin.commit if pin else spec.tag in co.tags
    if remote_ok and tag_ok and not co.dirty:
        return changes(notes=notes), 0
    if not spec.force and co.dirty:
        raise PlanError(f"{dest} has local modifications ({_listing(co.dirty)}); commit or "
                        "discard them, or set plugin.force: true to back them up and reset")
    if not (spec.force or adopted) and not remote_ok:
        raise PlanError(f"{dest} comes from {co.remote or 'no origin'}, not {spec.repo}; set plugin.repo to it, or "
                        + ("plugin.adopt: true to take it over" if _own_pack(profile, facts) else "plugin.force: true")
                        + " to switch origin")

    steps: list[Step] = []
    summary: list[str] = []
    warnings: list[str] = []
    if co.dirty:
        steps += [Run(("cp", "-a", dest, backup), what=f"back up {dest} to {backup}"),
                  Run(git(dest, "reset", "--quiet", "--hard"), what="discard local modifications"),
                  Run(git(dest, "clean", "-fd", "--quiet"), what="remove untracked files")]
        summary.append(f"discard {len(co.dirty)} local modification(s)")
        warnings.append(f"{dest}: {_listing(co.dirty)} would be lost; backed up first to {backup}")
    if not remote_ok:
        verb = "set-url" if co.remote else "add"
        steps.append(Run(git(dest, "remote", verb, "origin", spec.repo),
                         what="point origin at the profile's repo"))
        summary.append(f"switch origin {co.remote or '(none)'} -> {spec.repo}")
        warnings.append(f"{dest}: origin {co.remote or '(none)'} is replaced by {spec.repo}")
    if not (remote_ok and tag_ok):
        # --force: the pinned tag is origin's; a stale local tag of that name must not win.
        steps += [Run(git(dest, "fetch", "--quiet", "--force", "--tags", "origin"),
                      what="fetch tags", timeout=profile.timeouts.git_s),
                  Run(git(dest, "checkout", "--quiet", "--detach", wanted),
                      what=f"checkout {wanted}")]
        was = ", ".join(co.tags) or (co.head or "no commit")[:12]
        summary.append(f"checkout {spec.name} {was} -> {spec.tag}" + (f" ({pin.commit[:12]}, locked)" if pin else ""))
    else:
        after["commit"] = co.head
    return changes(Change("plugin", dest, "update", "; ".join(summary), state(co), after,
                          tuple(steps), notify=RESTART, warnings=tuple(warnings)), notes=notes), int(bool(co.dirty))


# --- a snapshot's custom nodes (a rollback) ------------------------------------------------------

def shown_checkout(co: Checkout | None) -> dict[str, object] | None:
    """A checkout a snapshot recorded, as a plan shows it."""
    if co is None:
        return None
    if not co.repo:
        return {"repo": "not a git checkout"}
    return {"tag": ", ".join(co.tags) or None, "commit": co.commit, "remote": co.remote, "dirty": list(co.dirty)}


def checkout_commit(where: str, commit: str, fetched: list[tuple[str, str]]) -> tuple[Run]:
    """A rollback's checkout of `commit`; the commit itself is brought in before any change
    (`fetch_commits` of what is added to `fetched`)."""
    fetched.append((where, commit))
    return (Run(git(where, "checkout", "--quiet", "--detach", commit), what=f"checkout {commit[:12]}"),)


# Fetch only when the commit is not there (a rollback must work offline when it can), then check it is.
_HAVE = ('c=$1; shift; "$@" cat-file -e "$c^{commit}" 2>/dev/null && exit 0; "$@" fetch --quiet --force --tags '
         'origin || exit; "$@" cat-file -e "$c^{commit}" 2>/dev/null && exit 0; '
         'echo "commit $c is neither in the checkout nor on its origin" >&2; exit 1')


def fetch_commits(fetched: Sequence[tuple[str, str]]) -> Change | None:
    """A rollback's first git change: every commit its checkouts move to, fetched where it is not there
    and checked to be there before any checkout moves, so a commit gone from its origin (force-pushed
    away) stops the rollback while the host is still as it was."""
    if not fetched:
        return None
    steps = tuple(Run(("sh", "-c", _HAVE, "sh", commit, *git(where)), timeout=900.0,
                      what=f"fetch {commit[:12]} into {where} unless it is there, and check it is")
                  for where, commit in fetched)
    return Change("custom_nodes", "commits", "update", f"fetch and check {len(fetched)} commit(s) the rollback "
                  "checks out before anything changes", None,
                  {"commits": [f"{where} {commit[:12]}" for where, commit in fetched]}, steps)


def restore_nodes(profile: Profile, want: Mapping[str, Checkout | None], have: Mapping[str, Checkout | None],
                  stamp: str, problems: list[str], notes: list[Note], fetched: list[tuple[str, str]]) -> list[Change]:
    """Every custom node as a snapshot recorded it (a rollback's desired state): each checkout at its
    commit and origin (the commits it moves to added to `fetched`), one that is gone cloned again,
    local modifications backed up and discarded; one the snapshot lacks moved aside, never deleted.
    What cannot be restored is added to `problems`; `stamp` names the folders moved aside."""
    found = [_node(profile, node, want.get(node), have.get(node), stamp, problems, notes, fetched)
             for node in sorted(set(want) | set(have))]
    return [c for c in found if c is not None]


def _node(profile: Profile, node: str, want: Checkout | None, have: Checkout | None, stamp: str,
          problems: list[str], notes: list[Note], fetched: list[tuple[str, str]]) -> Change | None:
    path = posixpath.join(profile.comfyui.custom_nodes, node)
    aside = f"{path}.provision-rollback-{stamp}{_SKIP}"
    foreign = next((co.owner for co in (have, want) if co is not None and co.owner is not None), None)
    if foreign is not None:
        notes.append(Note(name, f"custom node {node} is another user's checkout (uid {foreign}): provision "
                                "neither reads nor changes it, so a rollback leaves it as it is"))
        return None
    if want is None:
        if have is None:
            return None
        return Change("custom_nodes", path, "remove", f"move {node} aside: the snapshot has no such custom node",
                      shown_checkout(have), None, (Run(("mv", path, aside), what=f"move {path} aside"),), notify=RESTART,
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
                      f"clone {node} at {want.commit[:12]}", shown_checkout(have), after,
                      (*moved, _clone(want.remote, want.commit, path, timeout=900.0)), notify=RESTART,
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
        steps += checkout_commit(path, want.commit, fetched)
        was = ", ".join(have.tags) or (have.commit or "no commit")[:12]
        summary.append(f"checkout {node} {was} -> {', '.join(want.tags) or want.commit[:12]}")
    if not steps:
        return None
    return Change("custom_nodes", path, "update", "; ".join(summary), shown_checkout(have), after, tuple(steps),
                  notify=RESTART, warnings=tuple(warnings))
