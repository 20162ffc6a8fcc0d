"""Handlers owed by an interrupted apply or rollback, recorded on the host until they have run.

A handler runs after the changes that notified it; an apply killed in between (the controller
killed, the connection lost) used to lose it: the next apply found only what was left to change,
notified nothing, and ComfyUI kept running the old plugin. So before the first change that
notifies handler H runs, the engine writes a marker `<state_dir>/owed/H` (atomically: a Put),
and removes it only after H ran successfully. The facts read the markers, the plan shows them,
and apply runs every owed handler even when no change is left. Reading them is facts/owed.py's.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import time
from collections.abc import Mapping

from provisioner.config.model import Profile
from provisioner.facts.model import Facts, Probe
from provisioner.facts.owed import Owed, folder, read
from provisioner.resources.base import Change, Handler, Put, Run


def probe(profile: Profile) -> Probe:
    """The markers, and what a write killed halfway left beside them or in the state folder."""
    return Probe(markers=(folder(profile),), listing=(profile.comfyui.root, profile.comfyui.state_dir, folder(profile)))


def linked_away(profile: Profile, facts: Facts) -> str | None:
    """Why provision cannot write its records on this host: its folder in the root is a link (what
    runs as ComfyUI's user could point it anywhere the engine, as root, would then write)."""
    entries = facts.listings.get(profile.comfyui.root) or ()
    if any(e.name == posixpath.basename(profile.comfyui.state_dir) and e.kind == "link" for e in entries):
        return (f"{profile.comfyui.state_dir} is a link: provision keeps its lock, snapshots and records "
                "there and will not write through one (make it a folder)")
    # Nothing provision makes in its folder is a link: one there (wheels/, owed/, snapshots/) was put by another.
    links = sorted(e.name for e in facts.listings.get(profile.comfyui.state_dir) or () if e.kind == "link")
    if links:
        return (f"{posixpath.join(profile.comfyui.state_dir, links[0])} is a link: provision did not make it "
                "and will not write through one (remove it)")
    return None


def split(owed: Mapping[str, Owed], handlers: Mapping[str, Handler],
          profile: Profile) -> tuple[dict[str, Owed], list[str]]:
    """The owed handlers this apply can run, and a line for each it cannot (the profile no longer
    offers it, or has no means to run it here): those are for a person to do, then remove."""
    runnable, cannot = {}, []
    for name, item in sorted(owed.items()):
        handler = handlers.get(name)
        if handler is not None and handler.steps:
            runnable[name] = item
        else:
            why = handler.missing if handler is not None and handler.missing else "this profile has no such handler"
            cannot.append(f"{item.describe()}; it cannot run here ({why}): do it yourself, then remove "
                          f"{posixpath.join(folder(profile), name)}")
    return runnable, cannot


def record(profile: Profile, handler: str, change: Change) -> Put:
    """The step that records `handler` as owed by `change`, before the change runs."""
    marker = {"handler": handler, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "change": f"{change.resource}: {change.summary}",
              "by": f"{socket.gethostname()} pid {os.getpid()}"}
    return Put(posixpath.join(folder(profile), handler), (json.dumps(marker) + "\n").encode(),
               what=f"record that {handler} is owed")


def clear(profile: Profile, handler: str) -> Run:
    """The step that removes the marker once `handler` ran successfully."""
    return Run(("rm", "-f", posixpath.join(folder(profile), handler)), what=f"{handler} is no longer owed")
