"""ComfyUI itself: the checkout at `comfyui.root`, pinned to `comfyui.version` (a tag or commit of
`comfyui.repo`), and its requirements.txt met in the venv with the torch family held.

Like the plugin's checkout: a host without one gets a clone (made beside the root, then renamed), a
checkout elsewhere is moved (fetching only when it lacks the version), a dirty one stops the plan
unless `force`, or unless an apply killed inside its `git checkout` left it so (the owed restart
that apply recorded names the core's change): that checkout is finished. Unlike the plugin,
ComfyUI's root holds what is not ComfyUI's: the venv, models, custom_nodes/, provision's own
.provision/ and workflows/ (ignored or untracked files), so only modified TRACKED files make it
dirty, and `force` sets them aside with `git stash` (nothing is deleted, nothing is copied: the
root may hold 30 GB of models). Moving the core moves its requirements: the
change that checks out a version also installs what that version's requirements.txt asks for.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from packaging.requirements import Requirement

from provisioner import remote
from provisioner.catalog import requirements as upstream
from provisioner.config.model import Profile
from provisioner.errors import FactsError, PlanError
from provisioner.facts import owed
from provisioner.facts.model import Facts, GitCheckout, Probe, canonical
from provisioner.facts.snapshots import Checkout
from provisioner.resources import pins
from provisioner.resources.base import RESTART, Action, Change, Note, ResourcePlan, Run, Step, changes
from provisioner.resources.hold import held_install
from provisioner.resources.plugin import checkout_commit, git, same_repo, shown_checkout, tag_check

name = "core"
REQUIREMENTS = "requirements.txt"
STATE = ".provision"                        # provision's own folder in the root (ComfySpec.state_dir)
_COMMIT = re.compile(r"^[0-9a-f]{7,40}$")


def is_commit(version: str) -> bool:
    return bool(_COMMIT.match(version))


def ref(version: str) -> str:
    """What `git show REF:path` reads a file of `version` through: the tag's ref, or the commit."""
    return version if is_commit(version) else f"refs/tags/{version}"


def label(version: str) -> str:
    return f"ComfyUI {version[:12] if is_commit(version) else version}"


def shown(profile: Profile, path: str) -> tuple[str, str]:
    """The `show` probe key of `path` (relative to the root) at the pinned version."""
    assert profile.comfyui.version is not None
    return profile.comfyui.root, f"{ref(profile.comfyui.version)}:{path}"


def probe(profile: Profile) -> Probe:
    """The checkout (a base fact), its requirements.txt, the same file at the pinned version, and
    the repository's tags when the checkout lacks the pinned one (only then: no network when converged)."""
    spec = profile.comfyui
    if spec.version is None:
        return Probe()
    tags = () if is_commit(spec.version) else ((spec.root, spec.repo, spec.version),)
    return Probe(read=(posixpath.join(spec.root, REQUIREMENTS),), show=(shown(profile, REQUIREMENTS),),
                 remote_tags=tags)


def checkout(profile: Profile, facts: Facts) -> GitCheckout:
    root = profile.comfyui.root
    co = facts.git.get(root)
    if co is None:
        raise FactsError(f"facts lack the git state of {root}: the base probe did not run")
    if co.foreign:
        raise PlanError(f"{root} cannot be read: {co.error}; unset comfyui.version, or run provision as that "
                        "user (ansible_become_user)")
    return co


def modified(co: GitCheckout) -> tuple[str, ...]:
    """Tracked files changed in ComfyUI's checkout; untracked ones (workflows, .provision/) are its user's."""
    return tuple(p for p in co.dirty if p not in co.untracked)


def interrupted(profile: Profile, facts: Facts) -> str | None:
    """The core's change an apply was killed in, as the owed restart it left says (plan/owed.py
    records it before the change's first step); None when no such record is on the host. Its
    plan refused local modifications (or set them aside), so any the checkout now has are the
    ones the killed `git checkout` left."""
    found = [o for o in owed.read(profile, facts).values() if o.resource == name]
    return found[0].change if found else None


def at_version(profile: Profile, co: GitCheckout) -> bool:
    """Is the checkout ComfyUI's repository at the pinned version?"""
    version, spec = profile.comfyui.version, profile.comfyui
    if version is None:
        return True
    if not (co.exists and co.is_repo and same_repo(co.remote, spec.repo)):
        return False
    pin = locked_commit(profile)
    if pin is not None:
        return co.head == pin
    return version in co.tags or (is_commit(version) and (co.head or "").startswith(version))


def locked_commit(profile: Profile) -> str | None:
    """Under a lock, the commit the lock pins the tag `comfyui.version` to (a commit needs none)."""
    version = profile.comfyui.version
    if version is None or is_commit(version):
        return None
    pin = pins.git(profile, name, profile.comfyui.repo, version)
    return pin.commit if pin else None


@dataclass(frozen=True)
class Target:
    """The core the plan leads to: its version, whether the host has its files already (a checkout
    holding that tag or commit), and whether the checkout must move to get there."""

    version: str
    local: bool
    moves: bool


def target(profile: Profile, facts: Facts) -> Target | None:
    """None when `comfyui.version` is not set (the core is not provision's)."""
    spec = profile.comfyui
    if spec.version is None:
        return None
    co = checkout(profile, facts)
    if is_commit(spec.version):
        local = facts.shown.get(shown(profile, REQUIREMENTS)) is not None
    else:
        answer = facts.remote_tags.get((spec.root, spec.repo, spec.version))
        local = bool(answer and answer.local)
    return Target(spec.version, local and co.is_repo, not at_version(profile, co))


def _tag_check(profile: Profile, facts: Facts) -> Note | None:
    """plugin.tag_check for comfyui.version; a commit needs none."""
    spec = profile.comfyui
    assert spec.version is not None
    if is_commit(spec.version):
        return None
    return tag_check(name, "comfyui.version", spec.version, spec.repo,
                     facts.remote_tags.get((spec.root, spec.repo, spec.version)), or_commit=True)


# -- requirements.txt ---------------------------------------------------------------------------

def requirements_text(profile: Profile, facts: Facts, goal: Target) -> str | None:
    """ComfyUI's requirements.txt at the version the plan leads to; None until it is checked out."""
    if not goal.moves:
        return facts.contents.get(posixpath.join(profile.comfyui.root, REQUIREMENTS))
    return facts.shown.get(shown(profile, REQUIREMENTS)) if goal.local else None


def unmet(text: str, facts: Facts) -> list[tuple[Requirement, str | None]]:
    """The requirements the venv does not meet, with what it has. The torch family is left out:
    ComfyUI lists torch, torchvision and torchaudio unpinned, and the ones installed are kept."""
    env = facts.env
    markers = upstream.marker_environment(env.version, facts.arch)
    out = []
    for req in upstream.parse(upstream.requirements_txt(text)):
        if upstream.is_held(req.name) or (req.marker is not None and not req.marker.evaluate(markers)):
            continue
        have = env.version_of(req.name)
        if not upstream.satisfied(req, have):
            out.append((req, have))
    return out


@dataclass(frozen=True)
class Install:
    """The steps meeting ComfyUI's requirements, and how the plan shows them."""

    steps: tuple[Step, ...]
    summary: str
    before: dict[str, object]
    after: dict[str, object]

    @property
    def replaces(self) -> frozenset[str]:
        """The installed distributions it moves (the snapshot keeps their wheels)."""
        return frozenset(canonical(n) for n, have in self.before.items() if have)


def install(profile: Profile, facts: Facts, text: str | None, origin: str) -> Install | None:
    """pip install of what `text` asks and the venv lacks (None: all met), or of the whole file
    when its text is not known before the checkout (`text` None); the torch family held either way.
    `origin` names the core in the plan (ComfyUI v0.3.64)."""
    pip = profile.pip.args()
    path = posixpath.join(profile.comfyui.root, REQUIREMENTS)
    if text is None:
        return Install((held_install(profile, *pip, "-r", path, what=f"pip install -r {path}", timeout=3600.0),),
                       f"pip install -r requirements.txt of {origin}", {},
                       {"requirements": f"all of {path} ({origin}'s, read once checked out)"})
    missing = unmet(text, facts)
    if not missing:
        return None
    specs = tuple(str(req) for req, _ in missing)
    shown_specs = ", ".join(f"{spec} ({'have ' + have if have else 'missing'})" for spec, (_, have) in
                            zip(specs, missing))
    return Install((held_install(profile, *pip, *specs, what=f"pip install {' '.join(specs)}", timeout=3600.0),),
                   f"pip install {shown_specs}",
                   {req.name: have for req, have in missing},
                   {req.name: f"{req.specifier or 'any'} ({origin} requirements.txt)" for req, _ in missing})


def moves_root_aside(profile: Profile, facts: Facts) -> bool:
    """Does the plan move a root that is not a checkout aside (`force`), with all it holds?"""
    if profile.comfyui.version is None or not profile.comfyui.force:
        return False
    co = checkout(profile, facts)
    return co.exists and not co.is_repo and not only_ours(co)


def venv_kept(profile: Profile, facts: Facts) -> bool:
    """Is the venv the facts saw still there once the core's change ran (not moved aside inside
    the root)? Else the venv resource creates one, and installs these requirements with it."""
    spec = profile.comfyui
    inside = spec.venv.startswith(spec.root.rstrip("/") + "/")
    return facts.env.exists and not facts.env.error and not (inside and moves_root_aside(profile, facts))


# -- the plan -----------------------------------------------------------------------------------

def only_ours(co: GitCheckout) -> bool:
    """A root that holds nothing but provision's own state (the apply lock, taken before the clone)."""
    return co.exists and not co.is_repo and set(co.entries) <= {STATE}


def _clone(profile: Profile, version: str, co: GitCheckout) -> tuple[Step, ...]:
    """Clone beside the root, check out the version, then rename: an interrupted run never leaves a
    half checkout at the root. A root holding only provision's state (its lock is held) has that
    moved into the clone first: the open lock moves with its folder."""
    spec = profile.comfyui
    tmp = f"{spec.root}.provision-tmp"
    if not only_ours(co):
        return (Run(remote.clone_argv(spec.repo, tmp, version, spec.root),
                    what=f"clone {spec.repo} at {version} into {spec.root}", timeout=1800.0),)
    state = posixpath.join(spec.root, STATE)
    return (Run(remote.clone_argv(spec.repo, tmp, version), what=f"clone {spec.repo} at {version} beside {spec.root}",
                timeout=1800.0),
            Run(("mv", state, posixpath.join(tmp, STATE)), what=f"move {state} into the clone"),
            Run(("rmdir", spec.root), what=f"remove the empty {spec.root}"),
            Run(("mv", tmp, spec.root), what=f"move the checkout into {spec.root}"))


def _state(co: GitCheckout) -> dict[str, object] | None:
    if not co.exists:
        return None
    return {"version": ", ".join(co.tags) or None, "commit": co.head, "remote": co.remote,
            "modified": list(modified(co))}


def _listing(files: tuple[str, ...], limit: int = 8) -> str:
    more = f" and {len(files) - limit} more" if len(files) > limit else ""
    return ", ".join(files[:limit]) + more


def plan(profile: Profile, facts: Facts, *, now: datetime | None = None) -> ResourcePlan:
    """`now` stamps a backup; tests pin it, the engine leaves it to the clock."""
    spec = profile.comfyui
    goal = target(profile, facts)
    if goal is None:
        return changes()
    version, root = goal.version, spec.root
    co = checkout(profile, facts)
    pin = locked_commit(profile)
    wanted = pin or version
    note = _tag_check(profile, facts)
    notes = [note] if note else []
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    after: dict[str, object] = {"version": version, "commit": wanted if pin or is_commit(version)
                                else f"(the commit of {version})", "remote": spec.repo, "modified": []}
    steps: list[Step] = []
    summary: list[str] = []
    warnings: list[str] = []
    action: Action = "update"

    if not co.exists or only_ours(co):
        action, summary = "create", [f"clone {label(version)} into {root}"]
        steps += _clone(profile, wanted, co)
    elif not co.is_repo:
        if not spec.force:
            raise PlanError(f"{root} exists but is not a git checkout of ComfyUI, so comfyui.version cannot "
                            "pin it: move it away (keep its models/ and custom_nodes/), unset comfyui.version, "
                            "or set comfyui.force: true to move it aside and clone")
        backup = f"{root}.provision-backup-{stamp}"
        action, summary = "replace", [f"move {root} aside and clone {label(version)}"]
        warnings.append(f"{root} is not a git checkout: it is moved to {backup} with all it holds (models, "
                        "custom_nodes, a venv inside it), nothing is deleted")
        steps += [Run(("mv", root, backup), what=f"move {root} to {backup}"), *_clone(profile, wanted, co)]
    else:
        changed, remote_ok = modified(co), same_repo(co.remote, spec.repo)
        if not goal.moves:
            return changes(_requirements_change(profile, facts, goal), notes=notes)
        # git writes the files before it moves HEAD: after a kill in between, what differs from
        # HEAD (and the new files in the way) are the checkout's own, and --force finishes it.
        finish = interrupted(profile, facts)
        if finish and changed:
            summary.append(f"finish the checkout an interrupted apply left half done ({len(changed)} "
                           "file(s) differ from HEAD)")
            warnings.append(f"{root}: an apply was killed inside its checkout ({finish}): {_listing(changed)} "
                            f"are checked out as {version} has them (git checkout --force); untracked and "
                            "ignored files are left as they are")
            changed = ()
        if changed and not spec.force:
            raise PlanError(f"{root} has local modifications ({_listing(changed)}); commit or discard them, "
                            "or set comfyui.force: true to set them aside (git stash) and check out "
                            f"{version}")
        if not remote_ok and not spec.force:
            raise PlanError(f"{root} comes from {co.remote or 'no origin'}, not {spec.repo}; set comfyui.repo "
                            "to it, or comfyui.force: true to switch origin")
        if changed:
            steps.append(Run(git(root, "-c", "user.name=provision", "-c", "user.email=provision@localhost",
                                 "stash", "push", "--quiet", "--message",
                                 f"provision {stamp}: local changes set aside to check out {version}"),
                             what="set local modifications aside (git stash)"))
            summary.append(f"stash {len(changed)} local modification(s)")
            warnings.append(f"{root}: {_listing(changed)} set aside in git stash (`git -C {root} stash list`)")
        if not remote_ok:
            verb = "set-url" if co.remote else "add"
            steps.append(Run(git(root, "remote", verb, "origin", spec.repo), what="point origin at comfyui.repo"))
            summary.append(f"switch origin {co.remote or '(none)'} -> {spec.repo}")
            warnings.append(f"{root}: origin {co.remote or '(none)'} is replaced by {spec.repo}")
        if not (goal.local and remote_ok):
            # --force: the pinned tag is origin's; a stale local tag of that name must not win.
            steps.append(Run(git(root, "fetch", "--quiet", "--force", "--tags", "origin"), what="fetch tags",
                             timeout=1800.0))
        force = ("--force",) if finish else ()
        steps.append(Run(git(root, "checkout", "--quiet", *force, "--detach", wanted), what=f"checkout {wanted}"))
        was = ", ".join(co.tags) or (co.head or "no commit")[:12]
        summary.append(f"checkout ComfyUI {was} -> {version}" + (f" ({wanted[:12]}, locked)" if pin else ""))
    before = None if only_ours(co) else _state(co)
    needed = None
    if venv_kept(profile, facts):
        needed = install(profile, facts, requirements_text(profile, facts, goal), label(version))
        if needed is not None:
            steps += needed.steps
            summary.append(needed.summary)
            after.update(needed.after)
            if before is not None:
                before.update(needed.before)
    return changes(Change(name, root, action, "; ".join(summary), before, after, tuple(steps), notify=RESTART,
                          warnings=tuple(warnings), replaces=needed.replaces if needed else frozenset()),
                   notes=notes)


def _requirements_change(profile: Profile, facts: Facts, goal: Target) -> Change | None:
    """The core stays where it is, but its requirements.txt is not met (a package removed, a venv
    provision did not make): install what is missing."""
    if not venv_kept(profile, facts):
        return None
    needed = install(profile, facts, requirements_text(profile, facts, goal), label(goal.version))
    if needed is None:
        return None
    path = posixpath.join(profile.comfyui.root, REQUIREMENTS)
    return Change(name, path, "update", needed.summary, needed.before, needed.after, needed.steps, notify=RESTART,
                  replaces=needed.replaces)


def restore(profile: Profile, want: Checkout | None, have: Checkout | None, problems: list[str],
            notes: list[Note], fetched: list[tuple[str, str]]) -> Change | None:
    """ComfyUI's own checkout back to the commit a snapshot recorded (a rollback; the commit added to
    `fetched`); it is never reset or cleaned (models/, custom_nodes/ and provision's own folder live
    inside it)."""
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
                  f"{want.commit[:12]}", shown_checkout(have), shown_checkout(want), checkout_commit(root, want.commit, fetched),
                  notify=RESTART)
