"""The handlers an interrupted apply or rollback left owed, as the host's records say (the markers
plan/owed.py writes and clears; the facts read them). Here, below the resources, because a
resource reads them too: the core finishes a checkout an interrupted apply left half done.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from provisioner.config import bounded
from provisioner.config.model import Profile
from provisioner.facts.model import Facts


@dataclass(frozen=True)
class Owed:
    """A handler a change notified that has not run since: when, and which change."""

    handler: str
    since: str                      # UTC, "2026-01-02T03:04:05Z"; "" when the marker is unreadable
    change: str                     # "plugin: clone ComfyUI-nunchaku v1.1.0 into …"
    by: str = ""                    # the controller that recorded it: "host pid N"

    @property
    def resource(self) -> str:
        """The resource whose change was interrupted ("" when the marker does not say)."""
        return self.change.partition(": ")[0] if ": " in self.change else ""

    def describe(self) -> str:
        since = self.since.replace("T", " ").replace("Z", " UTC") if self.since else "an unknown time"
        return f"{self.handler} owed since {since} by an interrupted run: {self.change or 'a change'}"


def folder(profile: Profile) -> str:
    return posixpath.join(profile.comfyui.state_dir, "owed")


def read(profile: Profile, facts: Facts) -> dict[str, Owed]:
    """The owed handlers the host recorded, by name. A marker that is not ours to read (damaged,
    hand-written) still says its handler is owed: running a restart once too often is cheap."""
    found: dict[str, Owed] = {}
    for name, text in (facts.markers.get(folder(profile)) or {}).items():
        try:
            data = bounded.loads(text)          # a marker 4000 `[` deep was a RecursionError
            data = data if isinstance(data, dict) else {}
        except ValueError:
            data = {}
        found[name] = Owed(name, str(data.get("since") or ""), str(data.get("change") or ""),
                           str(data.get("by") or ""))
    return found
