"""Verification generations through ComfyUI's HTTP API: reachability, device, nodes, readiness,
timings, VRAM, images.

Import from the modules (`verify.run`, `verify.checks`, `verify.comfyui`, ...): this package
re-exports nothing.
"""
