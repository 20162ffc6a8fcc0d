"""The desired-state resources, in the order their changes are applied.

An explicit registry (testinfra's "registry as a dict" idea): greppable, no import magic.
compat comes first: it changes nothing, but refuses an incompatible plugin/core/backend mix
(judged at the core the plan leads to) before any other resource plans work on that host; then
ComfyUI itself (core: the checkout; venv: the venv and its torch), what runs in it, and the
service: the unit provision writes, and the handler that restarts ComfyUI. snapshot changes
nothing: it hands the engine the snapshots taken around the changes.
"""

from __future__ import annotations

from provisioner.resources import backend, compat, core, models, packages, plugin, service, snapshot, venv, workflow

ORDER = (compat, core, venv, plugin, backend, packages, models, workflow, service, snapshot)
