"""Upstream truth as data and pure rules, read from nunchaku's and ComfyUI-nunchaku's own code:
which GPUs run which kernels (gpus), the model files and their headers (models), how release
wheels are named and which host they install on (wheels), the dependency floors of each release
(requirements), and which plugin, backend and ComfyUI core go together (compat). No I/O here: the
resources apply these rules to a host's facts, and config checks profiles against them.
"""
