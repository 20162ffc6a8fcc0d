"""Verification generations through ComfyUI's HTTP API: reachability, nodes, timings, VRAM, images.

Names are imported lazily: the sandbox ComfyUI stand-in reuses `verify.ws` from a bare venv (no
Pillow), which must not pull in the checks.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Check": "checks", "HostVerification": "checks", "RunResult": "checks",
    "ComfyClient": "comfyui", "PromptHistory": "comfyui", "PromptRejected": "comfyui",
    "ImageCheck": "images", "check_image": "images", "thumbnail": "images",
    "verify_host": "run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
