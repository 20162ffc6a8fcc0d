"""Which ComfyUI-nunchaku plugin tags run with which nunchaku backend and which ComfyUI core.

Upstream facts, as rules (no I/O): the resource `resources/compat.py` applies them to a host's facts.
"""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

NEEDLE = "use_additional_t_cond"
CORE_MODEL = "comfy/ldm/qwen_image/model.py"
# ComfyUI-nunchaku v1.0+ builds its Qwen-Image DiT on ComfyUI core's comfy/ldm/qwen_image, which
# ComfyUI 0.3.48 (2025-08-01) does not have (checked in a real checkout); Qwen-Image support came
# in the next release.
QWEN_IMAGE_PLUGIN = Version("1.0.0")
LAST_WITHOUT_QWEN_IMAGE = Version("0.3.48")
# The Qwen-Image-Edit-2509 workflows encode with TextEncodeQwenImageEditPlus (comfy_extras/nodes_qwen.py),
# which ComfyUI 0.3.60 has and the plugin's docs require ("ComfyUI >= 0.3.60").
EDIT_NODES = "comfy_extras/nodes_qwen.py"
FAMILY_NODES: dict[str, tuple[str, Version]] = {
    "qwen-image-edit-2509": ("TextEncodeQwenImageEditPlus", Version("0.3.60")),
}
# Upstream facts (ComfyUI-nunchaku __init__.py): v1.0.x-v1.2.x log "requires nunchaku >= v1.0.0"
# (min_nunchaku_version = "1.0.0"); the v0.3 plugins only accepted the 0.3 backends. That check is
# too low for v1.2.x: its nodes/models/zimage.py imports convert_fp16 from nunchaku, which 1.2.0
# added (ComfyUI-nunchaku#777, read at the v1.2.0 and v1.2.1 tags); backend 1.2.0 in turn requires
# diffusers >= 0.36 (requirements.py).
BACKEND_RANGES: tuple[tuple[Version, Version, Version | None, str], ...] = (
    # (first plugin version, min backend, backend upper bound exclusive, why)
    (Version("1.2.0"), Version("1.2.0"), None,
     " (it imports convert_fp16, ComfyUI-nunchaku#777, although its start-up check says >= 1.0.0; and so "
     "diffusers >= 0.36): set backend.version 1.2.1, or pin plugin.tag v1.1.0"),
    (Version("1.0.0"), Version("1.0.0"), None, ""),
    (Version("0.3.0"), Version("0.3.0"), Version("1.0.0"), ""),
)
# v1.2.0 passes use_additional_t_cond= to core's QwenTimestepProjEmbeddings (ComfyUI-nunchaku #779).
# The plugin's own name: its pyproject.toml `[project]` name (the Comfy Registry's id is
# `comfyui-nunchaku`, ComfyUI-Manager's folder too), whatever the repository it is cloned from is called.
PLUGIN_PROJECT = "ComfyUI-nunchaku"
T_COND_PLUGIN = Version("1.2.0")
LAST_WITHOUT_T_COND = "v1.1.0"
# ComfyUI core gained the parameter with Qwen-Image-Layered (Comfy-Org/ComfyUI #11408, merged
# 2025-12-19, after 0.5.1 was tagged): 0.6.0 is the first release with it. Between the two, master
# still reports 0.5.1, which is why the signature itself (grep) decides whenever the file is there.
T_COND_CORE = Version("0.6.0")


def plugin_version(tag: str) -> Version | None:
    try:
        return Version(tag.removeprefix("v"))
    except InvalidVersion:
        return None


def _backend_range(plugin: Version) -> tuple[Version, Version, Version | None, str] | None:
    return next((r for r in BACKEND_RANGES if plugin >= r[0]), None)


def backend_floor(plugin_tag: str) -> Version | None:
    """The lowest backend this plugin tag runs with, or None (an unknown or too old tag)."""
    plugin = plugin_version(plugin_tag)
    found = _backend_range(plugin) if plugin is not None else None
    return found[1] if found else None


def incompatibility(plugin_tag: str, backend_version: str) -> str | None:
    """Why this plugin tag cannot run on this backend version, or None (also for an unknown tag)."""
    plugin = plugin_version(plugin_tag)
    try:
        backend = Version(backend_version)
    except InvalidVersion:
        return f"backend version {backend_version!r} is not a version"
    if plugin is None:
        return None
    found = _backend_range(plugin)
    if found is None:
        return f"ComfyUI-nunchaku {plugin_tag} predates the 0.3 backends: use plugin.tag v1.1.0"
    _first, low, high, why = found
    if Version(backend.base_version) < low:
        return f"ComfyUI-nunchaku {plugin_tag} requires nunchaku >= v{low}, not {backend_version}{why}"
    if high is not None and backend >= high:
        return (f"ComfyUI-nunchaku {plugin_tag} supports nunchaku {low.major}.{low.minor}.x only, "
                f"not {backend_version}: use plugin.tag v1.1.0 with backend 1.x")
    return None


def needs_t_cond(plugin_tag: str) -> bool:
    plugin = plugin_version(plugin_tag)
    return plugin is not None and plugin >= T_COND_PLUGIN


def core_incompatibility(plugin_tag: str, core_has_t_cond: bool, core_version: str | None) -> str | None:
    """Why the plugin cannot load on this ComfyUI core, or None."""
    if not needs_t_cond(plugin_tag) or core_has_t_cond:
        return None
    return (f"ComfyUI-nunchaku {plugin_tag} needs a ComfyUI core whose QwenTimestepProjEmbeddings takes "
            f"{NEEDLE} (ComfyUI >= {T_COND_CORE}); this host has {core_version or 'an unknown version'}: "
            f"pin plugin.tag {LAST_WITHOUT_T_COND} or update ComfyUI")


def qwen_image_incompatibility(plugin_tag: str, core_has_qwen_image: bool, core_version: str | None) -> str | None:
    """Why this plugin cannot load on a core without comfy/ldm/qwen_image, or None."""
    plugin = plugin_version(plugin_tag)
    if plugin is None or plugin < QWEN_IMAGE_PLUGIN or core_has_qwen_image:
        return None
    return (f"ComfyUI-nunchaku {plugin_tag} builds Qwen-Image on ComfyUI core's comfy/ldm/qwen_image, which "
            f"this host's ComfyUI {core_version or '(unknown version)'} does not have (it came after "
            f"{LAST_WITHOUT_QWEN_IMAGE}): update ComfyUI")


def family_incompatibility(family: str, core_has_node: bool, core_version: str | None) -> str | None:
    """Why this model family's workflows cannot run on this core, or None."""
    if family not in FAMILY_NODES or core_has_node:
        return None
    node, since = FAMILY_NODES[family]
    return (f"model.family {family} needs ComfyUI >= {since} (its workflows use {node}); this host has "
            f"{core_version or 'an unknown version'}: update ComfyUI, or choose qwen-image or qwen-image-edit")
