"""Which ComfyUI-nunchaku plugin runs with which backend and which ComfyUI core; refuses a bad mix at plan time.

The core is judged from its own files wherever they are there (master between releases reports an
old version): comfy/ldm/qwen_image/model.py (plugin v1.0+ builds on it; v1.2.0+ passes
`use_additional_t_cond` to it) and comfy_extras/nodes_qwen.py (the Edit-2509 text encoder node).
A core without the file is judged by its version, and the plan says so.

The core judged is the one the plan leads to: when `comfyui.version` moves the checkout, the pair
(plugin tag, core) is checked at that version before either moves: from that version's own files
through the host's git when the checkout already holds it, else (and on a host without ComfyUI)
from the version's number, with a note.
"""

from __future__ import annotations

import posixpath

from packaging.version import InvalidVersion, Version

from provisioner.catalog import cores
from provisioner.catalog.compat import (CORE_MODEL, EDIT_NODES, FAMILY_NODES, LAST_WITHOUT_QWEN_IMAGE, NEEDLE,
                                        QWEN_IMAGE_PLUGIN, T_COND_CORE, core_incompatibility, family_incompatibility,
                                        incompatibility, needs_t_cond, plugin_version,
                                        qwen_image_incompatibility)
from provisioner.config.model import Profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Probe
from provisioner.facts.parse import parse_comfyui_version
from provisioner.resources import core as checkout, plugin
from provisioner.resources.base import Note, ResourcePlan, changes

name = "compat"


RELATIVE = (CORE_MODEL, EDIT_NODES, "comfyui_version.py", "pyproject.toml")   # the core's files read


def _paths(profile: Profile) -> tuple[str, str, str, str]:
    model, nodes, version_py, pyproject = (posixpath.join(profile.comfyui.root, rel) for rel in RELATIVE)
    return model, nodes, version_py, pyproject


def _family_node(profile: Profile) -> str | None:
    family = profile.model.family
    entry = FAMILY_NODES.get(family) if family else None
    return entry[0] if entry else None


def probe(profile: Profile) -> Probe:
    """The core's files as they are, and, when `comfyui.version` pins it, the same files at that version."""
    model, nodes, version_py, pyproject = _paths(profile)
    grep: tuple[tuple[str, str], ...] = ((model, NEEDLE), (model, cores.ROTARY.needle or ""))
    if node := _family_node(profile):
        grep += ((nodes, node),)
    show = tuple(checkout.shown(profile, rel) for rel in RELATIVE) if profile.comfyui.version else ()
    return Probe(stat=(model, nodes), read=(version_py, pyproject), grep=grep, show=show)


def _core_version(profile: Profile, facts: Facts) -> str | None:
    _, _, version_py, pyproject = _paths(profile)
    return facts.comfyui_version or parse_comfyui_version(facts.contents.get(version_py),
                                                          facts.contents.get(pyproject))


def _version_above(version: str | None, floor: Version, *, inclusive: bool = True) -> bool:
    try:
        v = Version(version) if version is not None else None
    except InvalidVersion:
        return False
    return v is not None and (v >= floor if inclusive else v > floor)


class _Core:
    """What the core has: from its files when they are there, else from its version (noted).

    The core is the checkout as it is, or, when the plan moves it to `comfyui.version`, that version:
    its files as the host's git shows them when the checkout holds it, else only its number."""

    def __init__(self, profile: Profile, facts: Facts) -> None:
        self.profile, self.facts = profile, facts
        self.guessed: dict[str, list[str]] = {}     # missing file -> what its version was taken to mean
        goal = checkout.target(profile, facts)
        self.goal = goal if goal is not None and goal.moves else None
        if self.goal is None:
            self.version = _core_version(profile, facts)
        elif self.goal.local:
            self.version = parse_comfyui_version(self._text("comfyui_version.py"), self._text("pyproject.toml"))
        else:
            number = self.goal.version.removeprefix("v")
            self.version = number if _version_above(number, Version("0")) else None

    def _text(self, relative: str) -> str | None:
        return self.facts.shown.get(checkout.shown(self.profile, relative))

    def exists(self, path: str) -> bool:
        if self.goal is not None:
            return self.goal.local and self._text(self._relative(path)) is not None
        state = self.facts.files.get(path)
        return state is not None and state.exists

    def _relative(self, path: str) -> str:
        return posixpath.relpath(path, self.profile.comfyui.root)

    def _contains(self, path: str, needle: str) -> bool:
        if self.goal is not None:
            return needle in (self._text(self._relative(path)) or "")
        return self.facts.greps.get((path, needle), False)

    def broken(self, brk: cores.Break, checked: list[str]) -> bool:
        """Does this core have `brk`: from its file when it is there, else from its version. What
        decided it goes to `checked`."""
        if brk.path is not None and brk.needle is not None:
            path = posixpath.join(self.profile.comfyui.root, brk.path)
            if self.exists(path):
                checked.append(f"{brk.path} has {brk.what} (read from its source)")
                return not self._contains(path, brk.needle)
            if brk.since is not None:
                self.guessed.setdefault(path, []).append(f"{brk.since} up to {brk.fixed} lacks {brk.needle}")
        found = brk.affects(cores.version_of(self.version))
        checked.append(f"not the {brk.what} ({brk.thread.split(';')[0]}; judged from the version number)")
        return found

    def has(self, path: str, needle: str | None, floor: Version, what: str, *, inclusive: bool = True) -> bool:
        """Does the core have `what`: `needle` in `path` (or just `path`), else version vs `floor`."""
        if self.exists(path):
            return needle is None or self._contains(path, needle)
        self.guessed.setdefault(path, []).append(f"{'>=' if inclusive else '>'} {floor} has {what}")
        return _version_above(self.version, floor, inclusive=inclusive)

    @property
    def notes(self) -> list[Note]:
        if self.goal is not None and not self.goal.local and self.guessed:
            why = "; ".join(w for ws in self.guessed.values() for w in ws)
            return [Note(name, f"{checkout.label(self.goal.version)} is not on the host yet: the plugin and the "
                               f"model family are judged from its version number ({why})", level="info")]
        at = f" at {self.goal.version}" if self.goal is not None else ""
        return [Note(name, f"{path}{at} not found: decided from the ComfyUI version {self.version} "
                           f"({'; '.join(why)})", level="info") for path, why in self.guessed.items()]


def plan(profile: Profile, facts: Facts) -> ResourcePlan:
    """No changes: a PlanError for a plugin/backend, plugin/core or model/core mix that cannot work."""
    tag, family = profile.plugin.tag, profile.model.family
    listed = facts.remote_tags.get((plugin.path(profile), profile.plugin.repo, tag))
    if listed is not None and listed.tags is not None and tag not in listed.tags:
        # No such release: the plugin resource says so (with the nearest tags); what an imagined
        # version would need of the backend or the core ("update ComfyUI") is no advice.
        return changes()
    reason = incompatibility(tag, profile.backend.version)
    if reason:
        raise PlanError(reason)
    release = plugin_version(tag)
    if release is None:
        return changes(notes=[Note(name, f"plugin.tag {tag!r} is not a release tag: its backend and ComfyUI "
                                         "requirements are not checked")])
    model, nodes, _, _ = _paths(profile)
    core = _Core(profile, facts)
    if core.version is None and not core.exists(model):
        which = (f"{checkout.label(core.goal.version)} (not on the host yet)" if core.goal is not None
                 else f"no ComfyUI core at {profile.comfyui.root}")
        return changes(notes=[Note(name, f"{which}: cannot tell whether it runs ComfyUI-nunchaku {tag} and "
                                         f"model.family {family}")])
    qwen_image = core.has(model, None, LAST_WITHOUT_QWEN_IMAGE, "comfy/ldm/qwen_image", inclusive=False)
    reasons = [qwen_image_incompatibility(tag, qwen_image, core.version)]
    if qwen_image and needs_t_cond(tag):
        reasons.append(core_incompatibility(tag, core.has(model, NEEDLE, T_COND_CORE, NEEDLE), core.version))
    if family and (node := _family_node(profile)):
        has = core.has(nodes, node, FAMILY_NODES[family][1], node)
        reasons.append(family_incompatibility(family, has, core.version))
    checked: list[str] = []                       # what the core was found to have, for the warning
    if qwen_image:
        checked.append("comfy/ldm/qwen_image is there")
        if needs_t_cond(tag):
            checked.append(f"QwenTimestepProjEmbeddings takes {NEEDLE}")
    # The known breaks hit the v1.0+ plugins, which build on the core's Qwen-Image (catalog/cores.py).
    if qwen_image and not any(reasons) and release >= QWEN_IMAGE_PLUGIN:
        for brk in cores.BREAKS:
            if brk.hits(release) and core.broken(brk, checked):
                reasons.append(cores.refusal(brk, tag, core.version))
                break
    found = [r for r in reasons if r]
    if found:
        raise PlanError("; ".join(found))
    return changes(notes=core.notes + _unknown_ground(tag, core.version, checked))


def _unknown_ground(tag: str, core: str | None, checked: list[str]) -> list[Note]:
    """A warning for a core past what the catalog, or this plugin tag, knows: what was checked and
    what was not."""
    version = cores.version_of(core)
    if version is None:
        return []
    plugin, adapted = cores.plugin_release(tag), cores.last_adapted(tag)
    if not cores.known(version):
        why = (f"ComfyUI {core} is newer than any release the catalog knows ({cores.NEWEST.tag}, "
               f"checked {cores.CHECKED})")
    elif plugin is not None and adapted is not None and version > adapted.version:
        why = (f"ComfyUI {core} came after {adapted.tag}, the last core before ComfyUI-nunchaku {tag} "
               f"({plugin.date}), which upstream has not adapted to it")
    else:
        return []
    return [Note(name, f"{why}: checked: {'; '.join(checked)}; not checked: {'; '.join(cores.UNSEEN)}, and "
                       f"any other core change since: apply with --verify-gate, which rolls back a host whose "
                       f"generations fail")]
