"""What provision leaves on a host, and how much of it is kept: every bound in one place.

- Wheels in `<root>/.provision/wheels/`: only those of the backend the host runs once the apply is
  done (the backend resource's). Any other wheel, and the `.part` of one, goes with the change that
  installs the backend, or alone. A snapshot needs none of them: it keeps its own link to each
  wheel it names (`.provision/snapshots/wheels/`, bounded by `snapshots.keep`).
- Plugin backups (`<plugin>.provision-backup-STAMP.disabled`, made by `plugin.force`): the newest
  `KEEP_BACKUPS`; older ones go with the change that makes a new one, or alone.
- Temporary siblings a killed upload or clone left (`.NAME.XXXX.provision-tmp`, a container's
  `NAME.provision-tmp`, the plugin's `NAME.provision-tmp.disabled`) in the folders provision
  writes to: the next apply removes them (under the host lock, so never another apply's).

Pure, like every resource: the folders are listed by the facts program (`listing` probe); the
removals are Run steps of ordinary changes, shown by `plan` like any other.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from provisioner.facts.model import Entry
from provisioner.resources.base import Change, Run

KEEP_BACKUPS = 3
_TEMP = re.compile(r"^.+\.provision-tmp(?:\.disabled)?$")


def is_temp(name: str) -> bool:
    """A temporary sibling of an upload or clone that never reached its final name."""
    return bool(_TEMP.match(name))


def temps(entries: Sequence[Entry] | None) -> list[str]:
    return [e.name for e in entries or () if is_temp(e.name)]


def stale_wheels(entries: Sequence[Entry] | None, distribution: str, keep: Version | None) -> list[str]:
    """Wheels of `distribution` (and their `.part`) other than version `keep` (None: every one).
    Files that are not such wheels are not provision's to judge, and stay."""
    stale = []
    for entry in entries or ():
        name = entry.name.removesuffix(".part")
        try:
            dist, version, _, _ = parse_wheel_filename(name)
        except InvalidWheelFilename:
            continue
        if dist == canonicalize_name(distribution) and version != keep:
            stale.append(entry.name)
    return stale


def backups(entries: Sequence[Entry] | None, plugin_name: str) -> list[str]:
    """The plugin's backups, oldest first (their stamps sort as times)."""
    pattern = re.compile(rf"^{re.escape(plugin_name)}\.provision-backup-\d{{8}}-\d{{6}}\.disabled$")
    return sorted(e.name for e in entries or () if pattern.match(e.name))


def surplus_backups(entries: Sequence[Entry] | None, plugin_name: str, adding: int = 0) -> list[str]:
    """The oldest backups beyond `KEEP_BACKUPS`, counting `adding` new ones this change makes."""
    found = backups(entries, plugin_name)
    return found[:max(0, len(found) + adding - KEEP_BACKUPS)]


def remove_step(folder: str, names: Sequence[str], what: str) -> Run:
    return Run(("rm", "-rf", *(posixpath.join(folder, n) for n in names)), what=what)


def cleanup(resource: str, folder: str, names: Sequence[str], what: str) -> Change | None:
    """A change that only removes `names` from `folder` (None when there is nothing to remove)."""
    if not names:
        return None
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return Change(resource, folder, "remove", f"remove {what} from {folder}: {shown}",
                  {"present": list(names)}, {"present": []}, (remove_step(folder, names, f"remove {what}"),))
