"""Stand-ins for what tests and `make demo` cannot reach: GPU hosts, wheels, the plugin's git repo.

Names are imported lazily so that a stand-in run by a sandbox venv's bare python (ComfyUI's
main.py -> comfyui_server) can import this package without packaging or the rest of provisioner.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SandboxHost": "host",
    "make_sandbox_host": "host",
    "make_venv_template": "host",
    "set_vram_used": "host",
    "add_plugin_tag": "gitrepo",
    "make_plugin_repo": "gitrepo",
    "build_impostor_nunchaku": "wheels",
    "build_nunchaku_wheel": "wheels",
    "build_package_wheelhouse": "wheels",
    "build_torch_wheel": "wheels",
    "build_wheel": "wheels",
    "current_python_tag": "wheels",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
