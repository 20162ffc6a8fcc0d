"""Where provision keeps its records on the control machine: `$PROVISION_CACHE_DIR`, by default
`$XDG_CACHE_HOME/provision/` (`~/.cache/provision/`). Schema verdicts (config/verdicts.py), Hub
answers (resources/hub_cache.py) and venv answers (facts/venv_record.py) live under it; each is only
a shortcut, and a missing or damaged record means asking again."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PROVISION_CACHE_DIR"


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "provision")
