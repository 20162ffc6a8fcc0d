"""The control machine's record of each host's venv answer (its interpreter, wheel tags and
distributions), kept with the fingerprint the facts program gave it (`venv_fingerprint` in
remote/facts.py). While a host reports the same fingerprint, it starts no interpreter in the venv
(about 50 ms of CPU on the host, the facts program's slowest job) and the plan reads the answer
recorded here. One small JSON file per (host, venv python) under `$PROVISION_CACHE_DIR/venvs/`,
replaced atomically; a missing or damaged file only means asking the venv again."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from provisioner.config import bounded
from provisioner.config.records import cache_dir

RECORD_CAP = 64 << 20           # a venv's answer is tens of KiB
# Bumped whenever the venv answer gains a field a reader relies on (2: each distribution's
# direct_url, which the snapshot program records): an older record is asked again, not trusted.
FORMAT = 2


def _file(host: str, python: str) -> Path:
    return cache_dir() / "venvs" / (hashlib.sha256(f"{host}\0{python}".encode()).hexdigest()[:32] + ".json")


def recorded(host: str, python: str) -> dict[str, Any] | None:
    """The venv answer last recorded for `host`'s `python`, with its "fingerprint"; or None."""
    try:
        entry = bounded.load_file(_file(host, python), RECORD_CAP)
    except ValueError:                  # gone, damaged, deep, a FIFO: asked again
        return None
    ok = isinstance(entry, dict) and isinstance(entry.get("fingerprint"), str) and isinstance(entry.get("info"), dict)
    return entry if ok and entry.get("python") == python and entry.get("format") == FORMAT else None


def merge(host: str, python: str, answer: Any, before: dict[str, Any] | None) -> Any:
    """The host's venv answer in full: the recorded one when the host says it is unchanged, else
    the new one, recorded when it carries a fingerprint."""
    if not isinstance(answer, dict):
        return answer
    if answer.get("unchanged"):
        if before is not None and answer.get("fingerprint") == before["fingerprint"]:
            return before
        return {"python": python, "exists": True, "error": "the controller's record of this venv is gone; run again"}
    if isinstance(answer.get("info"), dict) and isinstance(answer.get("fingerprint"), str):
        _write(_file(host, python), dict(answer, format=FORMAT))
    return answer


def _write(file: Path, entry: dict[str, Any]) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".venv.", dir=file.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(entry, fh)
        os.replace(tmp, file)
    except OSError:
        pass                            # no record: the next run asks the venv again
