"""Which CUDA builds PyTorch publishes for each torch minor, which NVIDIA driver each CUDA needs, and
the torchvision that goes with each torch (no I/O).

Sources (collected 2026, see each table):
- `FLAVOURS`, `TORCHVISION`: the CUDA indexes of download.pytorch.org per torch minor, from
  pytorch.org/get-started/previous-versions (2.6, 2.9), the PyTorch dev-discuss post "Wheel variants
  for PyTorch release 2.10 published" (2.10), and third-party snapshots of the index for 2.5, 2.7,
  2.8 and 2.11. The torchvision of torch 2.X is 0.(X+15), its patch release the torch's own.
- `DRIVER_MIN`: NVIDIA's CUDA Toolkit Release Notes, section "CUDA Driver", Table 3 "CUDA Toolkit
  and Corresponding Driver Versions", Linux x86_64, each CUDA's GA release
  (docs.nvidia.com/cuda/cuda-toolkit-release-notes). This is the driver whose `nvidia-smi` reports
  that CUDA version. Minor-version compatibility (Table 2: any 12.x runtime on a driver >= 525)
  would accept older drivers, but without PTX JIT for newer kernels; the stricter table is used.
  CUDA 12.1 is not in the collected table: a cu121 build is never chosen by `auto`, and a pinned
  one is not checked against the driver.
"""

from __future__ import annotations

import re

from packaging.version import InvalidVersion, Version

INDEX_URL = "https://download.pytorch.org/whl/{flavour}"

FLAVOURS: dict[str, tuple[str, ...]] = {     # torch minor -> CUDA versions published, oldest first
    "2.5": ("11.8", "12.1", "12.4"),
    "2.6": ("11.8", "12.4", "12.6"),
    "2.7": ("11.8", "12.6", "12.8"),
    "2.8": ("12.6", "12.8", "12.9"),
    "2.9": ("12.6", "12.8", "13.0"),
    "2.10": ("12.6", "12.8", "13.0"),
    "2.11": ("12.6", "12.8", "13.0"),
}
TORCHVISION: dict[str, str] = {"2.5": "0.20", "2.6": "0.21", "2.7": "0.22", "2.8": "0.23", "2.9": "0.24",
                               "2.10": "0.25", "2.11": "0.26"}
DRIVER_MIN: dict[str, str] = {               # CUDA -> minimum Linux x86_64 driver (Table 3, GA)
    "11.8": "520.61.05",
    "12.4": "550.54.14",
    "12.6": "560.28.03",
    "12.8": "570.26",
    "12.9": "575.51.03",
    "13.0": "580.65.06",
}

_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?$")


def flavour(cuda: str) -> str:
    """`12.8` -> `cu128`: the name of its PyTorch index and of torch's local version label."""
    major, _, minor = cuda.partition(".")
    return f"cu{major}{minor}"


def minor_of(version: str) -> str | None:
    """`2.9.1` or `2.9` -> `2.9`; None for anything that is not X.Y or X.Y.Z."""
    m = _VERSION.match(version)
    return f"{m[1]}.{m[2]}" if m else None


def requirements(version: str) -> tuple[str, str, str]:
    """The pip requirements of a torch version (X.Y: its newest patch release; X.Y.Z: exactly it)
    and its torchvision and torchaudio, which pin that torch."""
    m = _VERSION.match(version)
    if not m:
        raise ValueError(f"{version!r} is not a torch version like 2.9 or 2.9.1")
    minor = f"{m[1]}.{m[2]}"
    patch = m[3]
    vision = TORCHVISION.get(minor) or f"0.{int(m[2]) + 15}"
    if patch is None:
        return f"torch=={minor}.*", f"torchvision=={vision}.*", f"torchaudio=={minor}.*"
    return f"torch=={minor}.{patch}", f"torchvision=={vision}.{patch}", f"torchaudio=={minor}.{patch}"


def torchvision_of(version: str) -> str:
    """The torchvision release paired with a torch version: `2.9.1` -> `0.24.1`, `2.9` -> `0.24`."""
    m = _VERSION.match(version)
    if not m:
        raise ValueError(f"{version!r} is not a torch version like 2.9 or 2.9.1")
    vision = TORCHVISION.get(f"{m[1]}.{m[2]}") or f"0.{int(m[2]) + 15}"
    return vision + (f".{m[3]}" if m[3] is not None else "")


def matches(installed: str, version: str) -> bool:
    """Is an installed torch (`2.9.1+cu128`) the profile's `2.9` / `2.9.1`? The local label is the
    CUDA build, compared separately."""
    try:
        have = Version(installed)
    except InvalidVersion:
        return False
    m = _VERSION.match(version)
    if not m or have.pre is not None or have.dev is not None:
        return False
    want = (int(m[1]), int(m[2])) + ((int(m[3]),) if m[3] is not None else ())
    return have.release[:len(want)] == want and len(have.release) >= 2


def _driver(text: str) -> Version | None:
    try:
        return Version(text.strip())
    except InvalidVersion:
        return None


def driver_supports(driver: str, cuda: str) -> bool | None:
    """Does this NVIDIA driver run torch built with `cuda`? None: the catalog does not know that CUDA."""
    floor, have = DRIVER_MIN.get(cuda), _driver(driver)
    if floor is None or have is None:
        return None
    return have >= Version(floor)


def newest_supported(torch_minor: str, driver: str) -> str | None:
    """The newest CUDA PyTorch publishes for this torch minor that this driver runs, or None."""
    for cuda in reversed(FLAVOURS.get(torch_minor, ())):
        if driver_supports(driver, cuda):
            return cuda
    return None
