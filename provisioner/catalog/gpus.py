"""Which GPUs run which of Nunchaku's kernels, by CUDA compute capability."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class GpuInfo(Protocol):
    """What the catalog needs of a GPU (facts.model.Gpu is one)."""

    @property
    def name(self) -> str: ...

    @property
    def compute_capability(self) -> tuple[int, int]: ...


def is_blackwell(compute_capability: Sequence[int]) -> bool:
    """Blackwell (sm_100, sm_120) runs Nunchaku's FP4 files; earlier GPUs run the INT4 ones."""
    return bool(compute_capability) and compute_capability[0] >= 10


def auto_precision(compute_capability: Sequence[int]) -> str:
    """What `model.precision: auto` means on a GPU of this compute capability."""
    return "fp4" if is_blackwell(compute_capability) else "int4"
