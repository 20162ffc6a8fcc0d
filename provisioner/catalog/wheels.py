"""How nunchaku's release wheels are named and which host they install on (no I/O).

Upstream truth, from nunchaku-ai/nunchaku at each tag (setup.py, .github/workflows/release-build.yaml):

- The local version label is `+torch{A.B}` up to 1.2.0 and `+cu{X.Y}torch{A.B}` from 1.2.1
  (setup.py v1.2.1 L71-77: `torch.version.cuda` of the torch the wheel was built against).
- Wheels are `cpXY-cpXY-linux_x86_64` / `win_amd64`, built for CPython 3.10-3.13 only.
- Up to 1.2.0 the label hides the CUDA the wheel was compiled with: 1.1.0 and 1.2.0 built torch 2.9
  and the "pre" torch with CUDA 13.0, torch 2.7/2.8 with 12.8 (`BUILT_WITH`). A torch of another
  CUDA major cannot load that wheel's kernels (nunchaku issue #774: "DLL load failed ... _C").
- A "pre" (nightly) torch is published under the NEXT minor: 1.0.1's matrix entry "2.9" became
  `+torch2.10`, and "pre" in 1.1.0-1.2.1 became `torch2.11` (`NIGHTLY_BUILT`). Those wheels were
  compiled against a dev snapshot, not the stable release that later took the number.

Which wheel a host installs is decided with `packaging.tags` against the tags the host's own
interpreter accepts, never by comparing strings; the torch minor is never approximated
(ComfyUI-nunchaku's installer falls back to a lower torch, and the `undefined symbol` that follows
is upstream's commonest failure).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from packaging.tags import Tag, parse_tag
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

CUDA_IN_LABEL_SINCE = Version("1.2.1")
CHECKED = "2026-12-07"                # the day these facts were last checked against upstream

# release -> torch major.minor of the label -> CUDA the wheel was compiled with (release-build.yaml).
# 1.2.1 and later say it in the label itself.
BUILT_WITH: dict[str, dict[str, str]] = {
    "1.0.1": {"2.5": "12.4", "2.6": "12.4", "2.7": "12.8", "2.8": "12.8", "2.10": "12.8"},
    "1.1.0": {"2.7": "12.8", "2.8": "12.8", "2.9": "13.0", "2.11": "13.0"},
    "1.2.0": {"2.7": "12.8", "2.8": "12.8", "2.9": "13.0", "2.11": "13.0"},
}
# release -> torch labels compiled against a nightly torch ("pre"), published as the next minor.
NIGHTLY_BUILT: dict[str, frozenset[str]] = {
    "1.0.1": frozenset({"2.10"}), "1.1.0": frozenset({"2.11"}),
    "1.2.0": frozenset({"2.11"}), "1.2.1": frozenset({"2.11"}),
}
# release -> torch minor -> the CUDA builds upstream published (release-build.yaml at each tag, and the
# release pages, checked 2026-12-07). No official wheel exists for any torch above 2.10 stable: the
# 2.11 ones were compiled against a January 2026 nightly, and the ecosystem's default since October
# 2026, torch 2.14 with CUDA 13, has none. A community fork's 1.3.0.dev wheels are not in this table.
TORCH_BUILDS: dict[str, dict[str, tuple[str, ...]]] = {
    **{release: {minor: (cuda,) for minor, cuda in table.items()} for release, table in BUILT_WITH.items()},
    "1.2.1": {"2.8": ("12.8",), "2.9": ("12.8", "13.0"), "2.10": ("12.8", "13.0"), "2.11": ("12.8", "13.0")},
}
_CUDA_LABEL = re.compile(r"^cu(\d+)\.(\d+)torch(\d+)\.(\d+)$|^torch(\d+)\.(\d+)$")


def release_tag(version: str) -> str:
    """GitHub tag of a backend version: `1.0.1` -> `v1.0.1`; dev builds drop the dot: `v0.3.1dev20250609`."""
    v = Version(version)
    if v.dev is not None:
        return f"v{v.base_version}dev{v.dev}"
    return f"v{v.public}"


@dataclass(frozen=True)
class HostTorch:
    """The torch of a host's venv, as nunchaku's wheels care about it."""

    version: Version
    cuda: str | None                  # "12.8": torch.version.cuda (None: CPU or ROCm build)
    text: str = ""                    # as the host reports it ("2.6.0a0+ecf3bae40a.nv25.01")

    def __str__(self) -> str:
        return self.text or str(self.version)

    @property
    def minor(self) -> str:
        return f"{self.version.major}.{self.version.minor}"


def read_torch(version: str, cuda: str | None) -> HostTorch:
    """`2.9.1+cu128` (+ `12.8` from torch/version.py) -> HostTorch; the CUDA falls back to the label."""
    v = Version(version)
    if cuda is None and v.local and (m := re.fullmatch(r"cu(\d+)(\d)", v.local)):
        cuda = f"{m[1]}.{m[2]}"
    return HostTorch(v, cuda, version)


def torch_problem(torch: HostTorch) -> str | None:
    """Why no nunchaku release wheel can be built for this torch at all, or None.

    Release wheels are compiled against stable CUDA torch builds; another build of the same
    numbers has another ABI, and a nearby wheel would fail with `undefined symbol` at import."""
    v, local = torch.version, torch.version.local or ""
    if v.dev is not None:
        return f"torch {torch} is a nightly/dev build; nunchaku's wheels are built against stable torch releases"
    if v.pre is not None:
        what = "an NVIDIA NGC container build" if "nv" in local else "a pre-release"
        return f"torch {torch} is {what}; its ABI matches no nunchaku release wheel (build nunchaku from source)"
    if local.startswith("rocm"):
        return f"torch {torch} is a ROCm build; nunchaku's kernels are CUDA only"
    if torch.cuda is None or local == "cpu":
        return f"torch {torch} is a CPU-only build; nunchaku needs a CUDA build of torch"
    return None


def local_label(version: str, torch: HostTorch) -> str:
    """The local version label this host's wheel carries: `torch2.6` or `cu12.8torch2.9`."""
    if Version(version) >= CUDA_IN_LABEL_SINCE:
        return f"cu{torch.cuda}torch{torch.minor}"
    return f"torch{torch.minor}"


def wheel_version(version: str, torch: HostTorch) -> Version:
    return Version(f"{Version(version).public}+{local_label(version, torch)}")


def wheel_filename(version: str, torch: HostTorch, python_tag: str, platform: str) -> str:
    """`nunchaku-1.2.1+cu12.8torch2.9-cp312-cp312-linux_x86_64.whl`: a name as upstream releases it."""
    return f"nunchaku-{wheel_version(version, torch)}-{python_tag}-{python_tag}-{platform}.whl"


def built_with(version: str, label: str) -> str | None:
    """The CUDA a release wheel was compiled with: from the label (1.2.1+) or the matrix table."""
    m = _CUDA_LABEL.match(label)
    if m and m[1]:
        return f"{m[1]}.{m[2]}"
    torch_minor = f"{m[5]}.{m[6]}" if m else None
    return BUILT_WITH.get(Version(version).public, {}).get(torch_minor or "")


def cuda_problem(version: str, torch: HostTorch) -> str | None:
    """The hidden CUDA of 1.1.0/1.2.0 wheels: a torch of another CUDA major cannot load them."""
    label = local_label(version, torch)
    build = built_with(version, label)
    if build is None or torch.cuda is None or build.split(".")[0] == torch.cuda.split(".")[0]:
        return None
    return (f"nunchaku {Version(version).public}+{label} was compiled with CUDA {build}, this torch "
            f"{torch} with CUDA {torch.cuda}: install the torch {torch.minor} cu{build.replace('.', '')} "
            "build, or a backend whose wheel matches")


def nightly_built(version: str, torch: HostTorch) -> bool:
    """Was this host's wheel compiled against a nightly of its torch minor (the "pre" build)?"""
    return torch.minor in NIGHTLY_BUILT.get(Version(version).public, frozenset())


def _minor_key(minor: str) -> tuple[int, ...]:
    return tuple(int(x) for x in minor.split("."))


def official_torch(version: str) -> tuple[str, ...] | None:
    """The torch minors a backend release has wheels for that were built against that stable torch
    (not a nightly), oldest first; None for a release this catalog does not know."""
    builds = TORCH_BUILDS.get(Version(version).public)
    if builds is None:
        return None
    nightly = NIGHTLY_BUILT.get(Version(version).public, frozenset())
    return tuple(sorted((m for m in builds if m not in nightly), key=_minor_key))


def torch_pin(version: str, torch: HostTorch) -> str:
    """The nearest torch build with an official wheel of this release, as a `comfyui.torch` pin:
    the newest minor not above the host's (else the oldest above), in the host's CUDA major where
    upstream built one."""
    minors = official_torch(version) or ()
    below = [m for m in minors if _minor_key(m) <= _minor_key(torch.minor)]
    minor = below[-1] if below else minors[0]
    cudas = TORCH_BUILDS[Version(version).public][minor]
    major = (torch.cuda or "").split(".")[0]
    cuda = next((c for c in reversed(cudas) if c.split(".")[0] == major), cudas[-1])
    return f"comfyui.torch {{version: \"{minor}\", cuda: \"{cuda}\"}}"


def nightly_problem(version: str, torch: HostTorch) -> str | None:
    """Why this host's wheel of this release is not an official build of its torch: upstream
    compiled it against a nightly of that minor. None for an official build or an unknown release."""
    if not nightly_built(version, torch):
        return None
    return (f"nunchaku {Version(version).public}'s torch {torch.minor} wheels were compiled against a torch "
            f"nightly (upstream's \"pre\" build, January 2026), not the stable torch {torch}: their ABI may not "
            f"match (undefined symbol at import); set backend.allow_nightly_built: true to take them anyway, "
            f"or {official_pin(version, torch)}")


def official_pin(version: str, torch: HostTorch) -> str:
    """`pin comfyui.torch {...}`: the nearest torch with an official wheel of this release, and
    which builds have one; "" for a release the catalog does not know."""
    minors = official_torch(version)
    if not minors:
        return ""
    builds = TORCH_BUILDS[Version(version).public]
    listed = "; ".join(f"torch {m} cu{'/cu'.join(c.replace('.', '') for c in builds[m])}" for m in minors)
    return f"pin {torch_pin(version, torch)}, the nearest build with an official wheel ({listed})"


def host_tags(tags: Iterable[str]) -> tuple[Tag, ...]:
    """The interpreter's accepted tags, most preferred first (`py -m pip debug --verbose` order)."""
    out: list[Tag] = []
    for text in tags:
        out.extend(parse_tag(text))
    return tuple(out)


def best_match(names: Iterable[str], want: Version, accepted: tuple[Tag, ...]) -> str | None:
    """Of these file names, the nunchaku wheel of exactly `want` (local label included) that
    installs on an interpreter accepting `accepted`, preferring its most specific tag."""
    rank = {tag: i for i, tag in enumerate(accepted)}
    found: list[tuple[int, str]] = []
    for name in names:
        try:
            dist, ver, _build, tags = parse_wheel_filename(name)
        except (InvalidWheelFilename, InvalidVersion):
            continue
        if dist != canonicalize_name("nunchaku") or ver != want:
            continue
        hits = [rank[t] for t in tags if t in rank]
        if hits:
            found.append((min(hits), name))
    return min(found)[1] if found else None


def wheel_combo(name: str, version: str) -> str | None:
    """`cu12.8torch2.9/cp312/linux_x86_64` for a nunchaku wheel of `version`, None for anything else."""
    try:
        dist, ver, _build, tags = parse_wheel_filename(name)
    except (InvalidWheelFilename, InvalidVersion):
        return None
    if dist != canonicalize_name("nunchaku") or ver.public != Version(version).public:
        return None
    tag = min(tags, key=str)
    return f"{ver.local or 'no torch label'}/{tag.interpreter}/{tag.platform}"
