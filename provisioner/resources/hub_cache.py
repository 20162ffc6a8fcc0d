"""The control machine's record of the Hub's answers, so a converged fleet never depends on the Hub.

Two kinds of entry, in one JSON file (`$PROVISION_CACHE_DIR/hub.json`, default
`$XDG_CACHE_HOME/provision/hub.json`):

- `files`: size and LFS sha256 of a path at a commit. A commit never changes, so these are true
  forever and are never asked again.
- `refs`: the commit a branch (`main`) was the first time it was resolved. It is reused until the
  user asks again (`provision plan --refresh-hub`) or pins `model.revision`: an upstream re-upload
  therefore never starts a fleet-wide download without someone deciding it.

Writes are atomic (a temporary sibling, then rename) under an exclusive lock, and merge with what
another provision process wrote meanwhile.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from provisioner.config import bounded
from provisioner.config.records import cache_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX control machine: threads are still serialised
    fcntl = None  # type: ignore[assignment]

FORMAT = 1
RECORD_CAP = 64 << 20           # the Hub's answers for a fleet's model files: KiBs
_guard = threading.Lock()


def path() -> Path:
    return cache_dir() / "hub.json"


def _key(*parts: str) -> str:
    return " ".join(parts)


def _read(file: Path) -> dict[str, Any]:
    try:
        data = bounded.load_file(file, RECORD_CAP)
    except ValueError:                  # gone, damaged, deep, a FIFO: asked again
        return {"format": FORMAT, "refs": {}, "files": {}}
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return {"format": FORMAT, "refs": {}, "files": {}}
    data.setdefault("refs", {})
    data.setdefault("files", {})
    return data


@contextmanager
def _locked() -> Iterator[Path]:
    file = path()
    file.parent.mkdir(parents=True, exist_ok=True)
    with _guard, open(file.with_name(file.name + ".lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield file


def _update(change: Callable[[dict[str, Any]], None]) -> None:
    with _locked() as file:
        data = _read(file)
        change(data)
        fd, tmp = tempfile.mkstemp(prefix=".hub.", dir=file.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, file)


def commit_of(endpoint: str, repo: str, ref: str) -> str | None:
    """The commit `ref` was recorded as, or None."""
    entry = _read(path())["refs"].get(_key(endpoint, repo, ref))
    return entry.get("commit") if isinstance(entry, dict) else None


def file_at(endpoint: str, repo: str, commit: str, path_in_repo: str) -> tuple[int, str | None] | None:
    """(size, sha256) of a file at a commit, as the Hub answered once, or None."""
    entry = _read(path())["files"].get(_key(endpoint, repo, commit, path_in_repo))
    if not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
        return None
    return entry["size"], entry.get("sha256")


def record(endpoint: str, repo: str, ref: str, commit: str, path_in_repo: str, size: int,
           sha256: str | None) -> None:
    """Remember a Hub answer; a branch's commit only the first time (or after `forget_refs`)."""
    def change(data: dict[str, Any]) -> None:
        if ref != commit:
            data["refs"].setdefault(_key(endpoint, repo, ref), {
                "commit": commit, "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        data["files"][_key(endpoint, repo, commit, path_in_repo)] = {"size": size, "sha256": sha256}
    _update(change)


def forget_refs() -> None:
    """Ask the Hub again which commit each branch is now (the file entries stay: commits are forever)."""
    if path().exists():
        _update(lambda data: data.__setitem__("refs", {}))
