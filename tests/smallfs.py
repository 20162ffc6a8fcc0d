"""Size-limited tmpfs mounts: a disk that fills, for the tests of what provision does then. Needs
root (mount works in this project's test machines); where it cannot mount, the test is skipped
with the reason."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def mount(where: Path, nbytes: int) -> Path:
    """A fresh tmpfs of `nbytes` at `where` (created)."""
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={nbytes},mode=0755", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"needs a size-limited tmpfs and mount refused ({proc.stderr.strip() or proc.returncode}): "
                    "run as root, or in a container with CAP_SYS_ADMIN")
    return where


def resize(where: Path, nbytes: int) -> None:
    """Grow or shrink a mounted tmpfs (what freeing space on a full disk comes to)."""
    subprocess.run(["mount", "-o", f"remount,size={nbytes}", str(where)], check=True, capture_output=True)


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)
