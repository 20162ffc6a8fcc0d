"""ComfyUI core releases the catalog knows, and the known breaks of ComfyUI-nunchaku by the core (no I/O).

Checked 2026-12-07 against Comfy-Org/ComfyUI's release pages and changelog and the issue threads
cited below (no code copied). A date is the release's own where it was read, else its month.

Each break is judged from the core's own source where a probe can see it (`needle` in `path`: the
symbol the plugin imports from the core); a break whose cause the threads do not show in a file the
plugin reads is judged from the version number (`versions`). A core newer than `NEWEST`, or a
plugin tag on a core released after it (the last core upstream could adapt that tag to), is not
refused but warned about: `unchecked` says what no rule here covers.
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

CHECKED = "2026-12-07"
RELEASES_SOURCE = "Comfy-Org/ComfyUI releases and changelog"


@dataclass(frozen=True)
class Release:
    """A release of one upstream project: its tag and the day (or month) it was published."""

    tag: str
    date: str
    source: str
    note: str = ""

    @property
    def version(self) -> Version:
        return Version(self.tag.removeprefix("v"))


CORE_RELEASES: tuple[Release, ...] = tuple(Release(tag, date, source, note) for tag, date, source, note in (
    # The three the real tier runs (tests/real): each tag's comfyui_version.py read in the checkout.
    ("v0.3.48", "2025-08-01", "ComfyUI git tag v0.3.48", "no comfy/ldm/qwen_image"),
    ("v0.3.60", "2025-09-23", "ComfyUI git tag v0.3.60", "TextEncodeQwenImageEditPlus (Edit-2509)"),
    ("v0.3.64", "2025-10-08", "ComfyUI git tag v0.3.64", ""),
    # From 0.3.x to 0.N.x numbering in December 2025.
    ("v0.4.0", "2025-12-09", RELEASES_SOURCE, "breaks ModelPatcher.pinned (Comfy-Org/ComfyUI#11235)"),
    ("v0.5.1", "2025-12", RELEASES_SOURCE, ""),
    ("v0.6.0", "2025-12", "Comfy-Org/ComfyUI#11408 (merged 2025-12-19, after 0.5.1)",
     "QwenTimestepProjEmbeddings takes use_additional_t_cond"),
    ("v0.8.0", "2026-01", RELEASES_SOURCE, ""),
    ("v0.12.1", "2026-02", "ComfyUI-nunchaku#801, #732", "core commit f8acd9c broke the plugin (~0.12)"),
    ("v0.17.0", "2026-03", RELEASES_SOURCE, ""),
    ("v0.19.0", "2026-04", RELEASES_SOURCE, ""),
    ("v0.23.0", "2026-06", "ComfyUI-nunchaku#820, #822", "apply_rotary_emb moved out of qwen_image/model.py"),
    ("v0.27.0", "2026-06-30", RELEASES_SOURCE, "int8 convrot models (Turing and newer)"),
    ("v0.33.0", "2026-08", RELEASES_SOURCE, ""),
    ("v0.38.0", "2026-10", RELEASES_SOURCE, ""),
    ("v0.45.0", "2026-11", RELEASES_SOURCE, ""),
    ("v0.46.0", "2026-11", RELEASES_SOURCE, ""),
    ("v0.47.0", "2026-12", RELEASES_SOURCE, ""),
    ("v0.47.1", "2026-12-02", RELEASES_SOURCE, "newest release"),
))
NEWEST = CORE_RELEASES[-1]

_PLUGIN_SOURCE = "nunchaku-ai/ComfyUI-nunchaku git tags (commit dates)"
PLUGIN_RELEASES: tuple[Release, ...] = tuple(Release(tag, date, _PLUGIN_SOURCE) for tag, date in (
    ("v1.0.0", "2025-09-05"), ("v1.0.1", "2025-09-14"), ("v1.0.2", "2025-11-02"), ("v1.1.0", "2025-12-26"),
    ("v1.2.0", "2026-01-12"), ("v1.2.1", "2026-01-26"),
))
# ComfyUI-nunchaku's releases page, 2026-12-07: nothing after v1.2.1; the fixes for core 0.12.1
# (#732) and for Qwen-Image-Edit-2511's index_timestep_zero (#790) sit unmerged.
LAST_PLUGIN = PLUGIN_RELEASES[-1]

# convrot: where nunchaku refuses the GPU, ComfyUI's own int8 models are the path (another stack).
CONVROT_CORE = Version("0.27.0")


@dataclass(frozen=True)
class Break:
    """A core change that stops ComfyUI-nunchaku from loading, as a thread reported it."""

    what: str                         # what breaks, in a few words
    symptom: str                      # what the user sees
    thread: str                       # where it was reported
    pin: str                          # what works instead
    path: str | None = None           # the core file the plugin reads (relative to the checkout) ...
    needle: str | None = None         # ... and what it must hold: absent = broken
    versions: tuple[Version, Version] | None = None   # else: [first, fixed) judged by number
    since: Version | None = None      # with `path`: a core without the file is judged by [since, fixed)
    fixed: Version | None = None
    through: Version | None = None    # the newest plugin release that has it (None: every one)

    def hits(self, plugin: Version) -> bool:
        """Does this plugin release have the break (a later one may carry the fix)?"""
        return self.through is None or plugin <= self.through

    def affects(self, version: Version | None) -> bool:
        if self.versions is not None:
            low, high = self.versions
        elif self.since is not None:
            low, high = self.since, self.fixed or Version("999")
        else:
            return False
        return version is not None and low <= version < high


# Plugin v1.0.0 .. v1.2.1 import apply_rotary_emb from comfy/ldm/qwen_image/model.py (its
# models/qwenimage.py, read at each tag); core 0.23 moved it and the DiT loader's import failed
# until Comfy-Org/ComfyUI PR #14364 (merged 2026-06-09) re-added the name.
ROTARY = Break(
    what="apply_rotary_emb, which the plugin imports from it",
    symptom="ImportError: cannot import name 'apply_rotary_emb' from 'comfy.ldm.qwen_image.model' "
            "(the DiT loader does not register)",
    thread="ComfyUI-nunchaku#820, #822; fixed in core by Comfy-Org/ComfyUI PR #14364 (2026-06-09)",
    pin="pin comfyui.version to a core that has it (v0.19.0, or a release with PR #14364)",
    path="comfy/ldm/qwen_image/model.py", needle="apply_rotary_emb",
    # Without the file, 0.23.x is taken as broken (the fix merged within June); the file decides
    # whenever it is there.
    since=Version("0.23.0"), fixed=Version("0.24.0"))
# Core 0.4.0's model management reads ModelPatcher.pinned on a patcher the plugin's loader builds;
# the thread does not show a file of the plugin's own that a probe could read: judged by number.
PINNED = Break(
    what="ModelPatcher.pinned break of core v0.4.0",
    symptom="AttributeError: 'ModelPatcher' object has no attribute 'pinned'",
    thread="Comfy-Org/ComfyUI#11235",
    pin="pin comfyui.version v0.3.64 (with plugin.tag v1.1.0) or v0.6.0 or newer",
    versions=(Version("0.4.0"), Version("0.4.1")))
# "Nunchaku broken again" after core commit f8acd9c, early 2026 (ComfyUI-nunchaku#801); the plugin's
# fix for core 0.12.1 (#732) is unmerged, so every release through v1.2.1 has it. The thread shows no
# file a probe could read: judged by number, for the 0.12 series the threads name. Whether a later core
# still breaks the plugin no thread says: that stays in every warning about a later core (UNSEEN).
AGAIN = Break(
    what="\"Nunchaku broken again\" break of core 0.12",
    symptom="\"Nunchaku broken again\" after core commit f8acd9c",
    thread="ComfyUI-nunchaku#801; the plugin's fix for core 0.12.1, #732, is unmerged",
    pin="pin comfyui.version v0.8.0, the last core before ComfyUI-nunchaku v1.2.1 (a later core is unchecked "
        "for it: apply with --verify-gate)",
    versions=(Version("0.12.0"), Version("0.13.0")), through=Version("1.2.1"))
BREAKS = (ROTARY, PINNED, AGAIN)
# Known from threads, not pinned to versions or a shape a probe can see: named in every warning
# about a later core.
UNSEEN = ("whether a core after 0.12.x still breaks the plugin as ComfyUI-nunchaku#801 reported (core commit "
          "f8acd9c; the plugin's fix #732 is unmerged)",)


def version_of(text: str | None) -> Version | None:
    try:
        return Version(text.removeprefix("v")) if text else None
    except InvalidVersion:
        return None


def known(version: Version) -> bool:
    """Is this core no newer than the newest release the catalog knows?"""
    return version <= NEWEST.version


def plugin_release(tag: str) -> Release | None:
    return next((r for r in PLUGIN_RELEASES if r.tag == tag), None)


def last_adapted(tag: str) -> Release | None:
    """The newest core released before this plugin tag: the last one its authors could adapt it to
    (a month-only date counts as the month's start). None for a tag the catalog does not know."""
    plugin = plugin_release(tag)
    if plugin is None:
        return None
    before = [core for core in CORE_RELEASES if core.date <= plugin.date]
    return before[-1] if before else None


def refusal(brk: Break, plugin_tag: str, core: str | None) -> str:
    """The one line refusing a known-broken pair: the symptom, the thread, the pin that works."""
    return (f"ComfyUI-nunchaku {plugin_tag} on ComfyUI {core or '(unknown version)'} is known broken: "
            f"{brk.symptom} ({brk.thread}): {brk.pin}")
