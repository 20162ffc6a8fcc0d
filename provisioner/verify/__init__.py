"""Verification generations through ComfyUI's HTTP API: reachability, nodes, timings, VRAM, images.

Import from the modules (`verify.run`, `verify.checks`, `verify.comfyui`, ...): this package
re-exports nothing, so the sandbox ComfyUI stand-in can reuse `verify.ws` from a bare venv
without pulling in Pillow.
"""
