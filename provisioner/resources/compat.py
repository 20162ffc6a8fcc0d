"""Which ComfyUI-nunchaku plugin runs with which backend and which ComfyUI core; refuses a bad mix at plan time."""

from __future__ import annotations

import posixpath

from packaging.version import InvalidVersion, Version

from provisioner.config.model import Profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Probe
from provisioner.facts.parse import parse_comfyui_version
from provisioner.resources.base import Note, ResourcePlan, changes

name = "compat"

NEEDLE = "use_additional_t_cond"
CORE_MODEL = "comfy/ldm/qwen_image/model.py"
# Upstream facts (ComfyUI-nunchaku __init__.py): v1.0.x-v1.2.x log "requires nunchaku >= v1.0.0"
# (min_nunchaku_version = "1.0.0"); the v0.3 plugins only accepted the 0.3 backends.
BACKEND_RANGES: tuple[tuple[Version, Version, Version | None], ...] = (
    # (first plugin version, min backend, backend upper bound exclusive)
    (Version("1.0.0"), Version("1.0.0"), None),
    (Version("0.3.0"), Version("0.3.0"), Version("1.0.0")),
)
# v1.2.0 passes use_additional_t_cond= to core's QwenTimestepProjEmbeddings (ComfyUI-nunchaku #779).
T_COND_PLUGIN = Version("1.2.0")
LAST_WITHOUT_T_COND = "v1.1.0"
# ComfyUI core gained the parameter with Qwen-Image-Layered (Comfy-Org/ComfyUI #11408, merged
# 2025-12-19, after 0.5.1 was tagged): 0.6.0 is the first release with it. Between the two, master
# still reports 0.5.1, which is why the signature itself (grep) decides whenever the file is there.
T_COND_CORE = Version("0.6.0")


def _plugin_version(tag: str) -> Version | None:
    try:
        return Version(tag.removeprefix("v"))
    except InvalidVersion:
        return None


def incompatibility(plugin_tag: str, backend_version: str) -> str | None:
    """Why this plugin tag cannot run on this backend version, or None (also for an unknown tag)."""
    plugin = _plugin_version(plugin_tag)
    try:
        backend = Version(backend_version)
    except InvalidVersion:
        return f"backend version {backend_version!r} is not a version"
    if plugin is None:
        return None
    for first, low, high in BACKEND_RANGES:
        if plugin >= first:
            if Version(backend.base_version) < low:
                return f"ComfyUI-nunchaku {plugin_tag} requires nunchaku >= v{low}, not {backend_version}"
            if high is not None and backend >= high:
                return (f"ComfyUI-nunchaku {plugin_tag} supports nunchaku {low.major}.{low.minor}.x only, "
                        f"not {backend_version}: use plugin.tag v1.1.0 with backend 1.x")
            return None
    return f"ComfyUI-nunchaku {plugin_tag} predates the 0.3 backends: use plugin.tag v1.1.0"


def needs_t_cond(plugin_tag: str) -> bool:
    plugin = _plugin_version(plugin_tag)
    return plugin is not None and plugin >= T_COND_PLUGIN


def core_incompatibility(plugin_tag: str, core_has_t_cond: bool, core_version: str | None) -> str | None:
    """Why the plugin cannot load on this ComfyUI core, or None."""
    if not needs_t_cond(plugin_tag) or core_has_t_cond:
        return None
    return (f"ComfyUI-nunchaku {plugin_tag} needs a ComfyUI core whose QwenTimestepProjEmbeddings takes "
            f"{NEEDLE} (ComfyUI >= {T_COND_CORE}); this host has {core_version or 'an unknown version'}: "
            f"pin plugin.tag {LAST_WITHOUT_T_COND} or update ComfyUI")


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
    if _plugin_version(tag) is None:
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
