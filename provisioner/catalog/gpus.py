"""Which GPUs run which of Nunchaku's kernels, by CUDA compute capability.

Upstream truth: nunchaku's `check_hardware_compatibility` (nunchaku/utils.py, identical at v1.1.0,
v1.2.0 and v1.2.1) accepts int4 models only on sm_75, sm_80, sm_86, sm_89 and fp4 (`fp4_e2m1_all`)
models only on sm_120, sm_121; any other architecture raises "Unsupported GPU architecture ... due to
the lack of 4-bit tensorcores" -- sm_90 (H100, H200), sm_100 (B200) and sm_70 among them. v1.0.1 took
fp4 on sm_120 only. The wheels carry SASS for exactly these targets (setup.py `get_sm_targets`:
75, 80, 86, 89, 120a, and 121a only when built with CUDA >= 13.0), with no PTX to fall back on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from packaging.version import InvalidVersion, Version

from provisioner.catalog.cores import CONVROT_CORE

Capability = tuple[int, int]
CHECKED = "2026-11-29"                # the day these facts were last checked against upstream

# (major, minor) -> the precision of the models nunchaku runs there
ARCHITECTURES: dict[Capability, str] = {
    (7, 5): "int4",     # Turing (RTX 20, T4)
    (8, 0): "int4",     # Ampere (A100)
    (8, 6): "int4",     # Ampere (RTX 30, A6000)
    (8, 9): "int4",     # Ada (RTX 40, L4, L40)
    (12, 0): "fp4",     # Blackwell (RTX 50, RTX PRO 6000)
    (12, 1): "fp4",     # Blackwell (GB10, DGX Spark)
}
# ComfyUI v0.27.0 (2026-06-30) added int8 "convrot" models that run on Turing and newer: where
# nunchaku refuses the GPU (sm_90 H100/H200, sm_100 B200), that is the path to offer.
CONVROT_SINCE: Capability = (7, 5)
# nunchaku 1.0.1 (utils.py at v1.0.1): fp4 on sm_120 only; sm_121 arrived with 1.1.0.
SM121_SINCE = Version("1.1.0")
# sm_121 code is compiled only by nvcc >= 13.0 (setup.py v1.1.0+): a wheel built with CUDA 12.x has none.
SM121_MIN_BUILD_CUDA = 13


class GpuInfo(Protocol):
    """What the catalog needs of a GPU (facts.model.Gpu is one)."""

    @property
    def name(self) -> str: ...

    @property
    def compute_capability(self) -> tuple[int, int]: ...


def capability_text(cc: Sequence[int]) -> str:
    return f"{cc[0]}.{cc[1]}" if len(cc) >= 2 else "unknown"


def _supported_text() -> str:
    def caps(precision: str) -> str:
        return ", ".join(capability_text(cc) for cc, p in ARCHITECTURES.items() if p == precision)
    return f"int4 on {caps('int4')}; fp4 on {caps('fp4')}"


SUPPORTED = _supported_text()      # "int4 on 7.5, 8.0, 8.6, 8.9; fp4 on 12.0, 12.1"


def _older_backend(backend_version: str | None) -> bool:
    try:
        return backend_version is not None and Version(backend_version) < SM121_SINCE
    except InvalidVersion:
        return False


def precision_for(cc: Sequence[int], backend_version: str | None = None) -> str | None:
    """The precision nunchaku runs on this compute capability, or None where it runs none."""
    key = (cc[0], cc[1]) if len(cc) >= 2 else None
    if key not in ARCHITECTURES:
        return None
    if key == (12, 1) and _older_backend(backend_version):
        return None
    return ARCHITECTURES[key]


def refusal(gpu: GpuInfo, backend_version: str | None = None) -> str | None:
    """One line saying why nunchaku cannot run on this GPU at all, or None when it can."""
    cc = gpu.compute_capability
    if precision_for(cc, backend_version) is not None:
        return None
    if tuple(cc[:2]) == (12, 1):
        return (f"{gpu.name} (compute capability 12.1) needs nunchaku >= {SM121_SINCE}; "
                f"backend {backend_version} takes fp4 on 12.0 only: raise backend.version")
    alternative = (f"; ComfyUI's own int8 convrot models (core >= v{CONVROT_CORE}) run on it: a different stack, "
                   "not a nunchaku variant" if tuple(cc[:2]) >= CONVROT_SINCE else "")
    return (f"{gpu.name} (compute capability {capability_text(cc)}) has no 4-bit tensor cores nunchaku "
            f"supports ({SUPPORTED}): it cannot run SVDQuant models on this GPU{alternative}")

