"""Python dependency floors upstream states, and how they combine (no I/O).

Sources, read at each tag:
- nunchaku-ai/nunchaku `pyproject.toml` `[project].dependencies` (setup.py adds none): the wheel's
  Requires-Dist. It is installed with --no-deps, so these must be installed by the packages
  resource. 1.2.0 raised diffusers to >=0.36.
- nunchaku-ai/ComfyUI-nunchaku `requirements.txt` (comments dropped; v1.0.0/v1.0.1 list
  `accelerate` twice, as upstream does). The plugin still says diffusers>=0.35 at v1.2.1.

The highest floor wins; the torch family is never installed by a plan, only checked: pip may not
swap the CUDA build the backend wheel was compiled against.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import Specifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

_UPSTREAM_DEPS = ("einops", "huggingface-hub>=0.34", "peft>=0.17", "protobuf", "sentencepiece",
                  "torchvision>=0.20")
BACKEND_REQUIRES: dict[str, tuple[str, ...]] = {
    "1.0.1": ("accelerate>=1.9", "diffusers>=0.35.1", *_UPSTREAM_DEPS, "transformers>=4.53.3"),
    "1.1.0": ("accelerate>=1.9", "diffusers>=0.35.1", *_UPSTREAM_DEPS, "transformers>=4.54"),
    "1.2.0": ("accelerate>=1.9", "diffusers>=0.36", *_UPSTREAM_DEPS, "transformers>=4.54"),
    "1.2.1": ("accelerate>=1.9", "diffusers>=0.36", *_UPSTREAM_DEPS, "transformers>=4.54"),
}

_PULID = ("insightface", "opencv-python", "facexlib", "onnxruntime", "timm")
_V100 = ("diffusers>=0.35", "accelerate", "sentencepiece", "protobuf", "huggingface_hub>=0.34", "tomli",
         "peft>=0.17", "accelerate>=1.10", *_PULID)
_V102 = ("diffusers>=0.35", "transformers>=4.54", "sentencepiece", "protobuf", "huggingface_hub>=0.34",
         "tomli", "peft>=0.17", "accelerate>=1.10", *_PULID)
PLUGIN_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "v1.0.0": _V100, "v1.0.1": _V100,
    "v1.0.2": _V102, "v1.1.0": _V102, "v1.2.0": _V102, "v1.2.1": _V102,
}

# Installed with torch, for the torch build: held at their installed versions by every pip install.
HELD = frozenset({"torch", "torchvision", "torchaudio", "triton"})
HELD_PREFIX = "nvidia-"


def is_held(name: str) -> bool:
    key = canonicalize_name(name)
    return key in HELD or key.startswith(HELD_PREFIX)


def backend_requires(version: str) -> tuple[str, ...] | None:
    """The Requires-Dist of a nunchaku release, or None for a release this catalog does not know."""
    try:
        return BACKEND_REQUIRES.get(Version(version).public)
    except InvalidVersion:
        return None


def requirements_txt(text: str) -> tuple[str, ...]:
    """The requirement lines of a requirements.txt: comments, blanks and pip options dropped."""
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            out.append(line)
    return tuple(out)


@dataclass(frozen=True)
class Floor:
    """One package's combined requirement and where its parts came from."""

    requirement: Requirement
    origin: str                       # "nunchaku 1.2.1 Requires-Dist; profile said >=0.35"

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)


class Conflict(ValueError):
    """Two sources ask for versions no release can satisfy together."""


def _said(origin: str, req: Requirement) -> str:
    return f"{origin} said {req.specifier or 'any version'}"


def combine(name: str, sourced: Sequence[tuple[str, Requirement]]) -> Floor:
    """The highest lower bound of all sources, with every other bound kept (`<`, `==`, `~=`).

    Raises Conflict when the result admits no version (profile `diffusers<0.36` against a backend
    that requires >=0.36), naming both sources.
    """
    lowers: list[tuple[Version, str, Specifier]] = []
    others: list[tuple[str, Specifier]] = []
    for origin, req in sourced:
        for spec in req.specifier:
            if spec.operator in (">=", ">"):
                lowers.append((Version(spec.version), origin, spec))
            else:
                others.append((origin, spec))
    top = max(lowers, key=lambda item: (item[0], item[2].operator == ">")) if lowers else None
    kept = [top[2]] if top else []
    kept += [spec for _, spec in others]
    specifier = SpecifierSet(",".join(str(s) for s in kept))
    pins = [Version(spec.version) for _, spec in others if spec.operator in ("==", "===")
            and "*" not in spec.version]
    probe = pins[0] if pins else (top[0] if top and top[2].operator == ">=" else None)
    if probe is not None and not specifier.contains(probe, prereleases=True):
        raise Conflict(f"{name}: " + "; ".join(_said(o, r) for o, r in sourced if r.specifier)
                       + ": no version satisfies all of them")
    extras = sorted({e for _, r in sourced for e in r.extras})
    text = name + (f"[{','.join(extras)}]" if extras else "") + str(specifier)
    winner = top[1] if top else (others[0][0] if others else sourced[0][0])
    rest = [_said(o, r) for o, r in sourced if o != winner and str(r.specifier) != str(specifier)]
    return Floor(Requirement(text), "; ".join([winner, *dict.fromkeys(rest)]))


def floors(sources: Iterable[tuple[str, Iterable[Requirement]]]) -> dict[str, Floor]:
    """Combine requirements by canonical name, in first-seen order. Raises Conflict."""
    grouped: dict[str, list[tuple[str, Requirement]]] = {}
    names: dict[str, str] = {}
    for origin, reqs in sources:
        for req in reqs:
            key = canonicalize_name(req.name)
            grouped.setdefault(key, []).append((origin, req))
            names.setdefault(key, req.name)
    return {key: combine(names[key], sourced) for key, sourced in grouped.items()}


def parse(lines: Iterable[str]) -> tuple[Requirement, ...]:
    """Requirements from upstream lines; one that does not parse is skipped, not fatal."""
    out = []
    for line in lines:
        try:
            out.append(Requirement(line))
        except InvalidRequirement:
            continue
    return tuple(out)


def marker_environment(python_version: str | None, machine: str | None) -> dict[str, str]:
    """Environment-marker values of a Linux host: its interpreter's version and machine where known."""
    values = {k: str(v) for k, v in default_environment().items()}
    if python_version:
        values["python_full_version"] = python_version
        values["python_version"] = ".".join(python_version.split(".")[:2])
    values.update(sys_platform="linux", platform_system="Linux", os_name="posix",
                  platform_machine=machine or values["platform_machine"])
    return values


def satisfied(req: Requirement, installed: str | None) -> bool:
    """Does the installed version meet the specifier?

    `prereleases=True` matches pip's own check of an installed distribution: pip calls an
    installed 0.36.0.dev0 good enough for `>=0.35`, so a stricter test would plan forever.
    """
    if installed is None:
        return False
    try:
        version = Version(installed)
    except InvalidVersion:
        return False
    return req.specifier.contains(version, prereleases=True)
