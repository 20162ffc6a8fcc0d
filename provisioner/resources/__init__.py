"""The desired-state resources, in the order their changes are applied.

An explicit registry (testinfra's "registry as a dict" idea): greppable, no import magic.
compat comes first: it changes nothing, but refuses an incompatible plugin/core/backend mix
before any other resource plans work on that host; service owns the handler that restarts
ComfyUI; snapshot changes nothing, it hands the engine the snapshots taken around the changes.
"""

from __future__ import annotations

from provisioner.resources import backend, compat, models, packages, plugin, service, snapshot, workflow

ORDER = (compat, plugin, backend, packages, models, workflow, service, snapshot)
