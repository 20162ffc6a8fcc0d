"""What the stand-in ComfyUI logs while it starts, shaped by real start-up logs of ComfyUI 0.3.64
(captures/comfyui-0.3.64/extra/startup.*.log and internal_logs_raw.*.json): its banner, then
ComfyUI-nunchaku's block, which holds one `Node ... import failed:` traceback per node group when
the nunchaku backend does not import, then the import times, `Starting server` and the URL.

Each item is one log entry as ComfyUI's /internal/logs/raw lists it: a block is one entry.
"""

from __future__ import annotations

from provisioner.sandbox.comfyui_nodes import load_capture

RAW = "extra/internal_logs_raw.with-comfyui-nunchaku.json"
CAPTURED_PLUGIN = "/srv/comfy-base/custom_nodes/ComfyUI-nunchaku"   # where the capture had it
PLUGIN_HEAD = "=" * 40 + " ComfyUI-nunchaku Initialization"
MISSING = "ModuleNotFoundError: No module named 'nunchaku'"
NOT_FOUND = "Nunchaku version: Package 'nunchaku' not found."
PLUGIN_VERSION = "1.1.0"


def banner(device: str, vram_total_mib: int, torch: str, python: str, cpu: bool,
           version: str = "0.3.64") -> list[str]:
    """ComfyUI's first lines: memory, torch, the device it picked, versions."""
    return ["Checkpoint files will always be loaded safely.\n",
            f"Total VRAM {vram_total_mib} MB, total RAM 64215 MB\n",
            f"pytorch version: {torch}\n",
            f"Set vram state to: {'DISABLED' if cpu else 'NORMAL_VRAM'}\n",
            f"Device: {device}\n",
            f"Python version: {python}\n",
            f"ComfyUI version: {version}\n"]


def _captured_block() -> list[str]:
    entries = [str(e["m"]) for e in load_capture(RAW)["entries"]]
    start = next(i for i, m in enumerate(entries) if m.startswith(PLUGIN_HEAD))
    end = next(i for i in range(start + 1, len(entries)) if entries[i].startswith("====="))
    return entries[start:end + 1]


def plugin_block(plugin_path: str, backend: str | None, backend_error: str | None) -> list[str]:
    """ComfyUI-nunchaku's start-up block. `backend`: the installed nunchaku's version, None when it
    is not installed (the capture as it is); `backend_error`: the error importing it raises."""
    block = [m.replace(CAPTURED_PLUGIN, plugin_path) for m in _captured_block()]
    if backend is None:
        return block
    if backend_error is None:                # everything imports: the banner and the versions
        return [block[0], f"Nunchaku version: {backend}\n", f"ComfyUI-nunchaku version: {PLUGIN_VERSION}\n",
                block[-1]]
    return [m.replace(NOT_FOUND, f"Nunchaku version: {backend}").replace(MISSING, backend_error)
            for m in block if not m.startswith("Could not parse nunchaku version")]


def import_failed(path: str, error: str) -> list[str]:
    """What ComfyUI logs for a custom node that fails to import (nodes.py, load_custom_node), and goes on."""
    return ["Traceback (most recent call last):\n",
            '  File "/opt/ComfyUI/nodes.py", line 2131, in load_custom_node\n',
            "    module_spec.loader.exec_module(module)\n", f"{error}\n",
            f"Cannot import {path} module for custom nodes: {error.split(': ', 1)[-1]}\n"]


def closing(custom_nodes: list[str], url: str, failed: tuple[str, ...] = ()) -> list[str]:
    """After the custom nodes: their import times (`failed` ones marked as ComfyUI marks them), then
    the server starts listening."""
    times = [f"   0.0 seconds{' (IMPORT FAILED)' if p in failed else ''}: {p}\n" for p in custom_nodes]
    return ["\nImport times for custom nodes:\n", *times, "\n", "Starting server\n\n", f"To see the GUI go to: {url}\n"]


def died(message: str) -> str:
    """A start-up that fails before the port opens (a driver torch cannot reach, say)."""
    return ("Traceback (most recent call last):\n"
            '  File "/opt/ComfyUI/main.py", line 147, in <module>\n'
            "    import execution\n"
            '  File "/opt/ComfyUI/comfy/model_management.py", line 231, in <module>\n'
            "    total_vram = get_total_memory(get_torch_device()) / (1024 * 1024)\n"
            f"{message}\n")
