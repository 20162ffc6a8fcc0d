"""Which ComfyUI-nunchaku plugin runs with which backend and which ComfyUI core; refuses a bad mix at plan time."""

from __future__ import annotations

import posixpath

from packaging.version import InvalidVersion, Version

from provisioner.catalog.compat import (CORE_MODEL, NEEDLE, T_COND_CORE, core_incompatibility, incompatibility,
                                        needs_t_cond, plugin_version)
from provisioner.config.model import Profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Probe
from provisioner.facts.parse import parse_comfyui_version
from provisioner.resources.base import Note, ResourcePlan, changes

name = "compat"

def _paths(profile: Profile) -> tuple[str, str, str]:
    root = profile.comfyui.root
    return (posixpath.join(root, CORE_MODEL), posixpath.join(root, "comfyui_version.py"),
            posixpath.join(root, "pyproject.toml"))


def probe(profile: Profile) -> Probe:
    model, version_py, pyproject = _paths(profile)
    return Probe(stat=(model,), read=(version_py, pyproject), grep=((model, NEEDLE),))


def _core_version(profile: Profile, facts: Facts) -> str | None:
    _, version_py, pyproject = _paths(profile)
    return facts.comfyui_version or parse_comfyui_version(facts.contents.get(version_py),
                                                          facts.contents.get(pyproject))


def plan(profile: Profile, facts: Facts) -> ResourcePlan:
    """No changes: a PlanError for a plugin/backend or plugin/core pair that cannot work together."""
    tag = profile.plugin.tag
    reason = incompatibility(tag, profile.backend.version)
    if reason:
        raise PlanError(reason)
    notes: list[Note] = []
    if plugin_version(tag) is None:
        notes.append(Note(name, f"plugin.tag {tag!r} is not a release tag: its backend and ComfyUI "
                                "requirements are not checked"))
        return changes(notes=notes)
    if not needs_t_cond(tag):
        return changes()
    model = _paths(profile)[0]
    version = _core_version(profile, facts)
    state = facts.files.get(model)
    if state is not None and state.exists:
        has = facts.greps.get((model, NEEDLE), False)
    elif version is not None:
        try:
            has = Version(version) >= T_COND_CORE
        except InvalidVersion:
            has = False
        notes.append(Note(name, f"{CORE_MODEL} not found under {profile.comfyui.root}: decided from the "
                                f"ComfyUI version {version} (>= {T_COND_CORE} has {NEEDLE})", level="info"))
    else:
        notes.append(Note(name, f"no ComfyUI core at {profile.comfyui.root}: cannot tell whether it takes "
                                f"{NEEDLE}, which ComfyUI-nunchaku {tag} needs (ComfyUI >= {T_COND_CORE})"))
        return changes(notes=notes)
    reason = core_incompatibility(tag, has, version)
    if reason:
        raise PlanError(reason)
    return changes(notes=notes)
