"""Profiles from YAML: `extends` chains merged, control-machine paths resolved, validated, built."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.config.inventory import Host
from provisioner.config.marks import ATOMIC, Document, KeyPath, Mark, clip, deep_merge, merge_marks, problem, read_yaml
from provisioner.config.model import Profile, build_profile
from provisioner.config.schema import schema_problems
from provisioner.config.semantic import semantic_problems
from provisioner.errors import MAX_PROBLEMS, ConfigError, Problem, stopped

DEFAULT_TEMPLATE_DIR = "../templates"


@dataclass(frozen=True)
class LoadedProfile:
    """A profile file after `extends` merging, path resolution and validation."""

    name: str                                   # file stem: rtx3090.yaml -> "rtx3090"
    file: str                                   # the path as given
    data: Mapping[str, Any]                     # merged mapping, `extends` consumed, paths absolute
    marks: Mapping[KeyPath, Mark] = field(repr=False)
    chain: tuple[str, ...]                      # files read: the profile first, its root parent last
    profile: Profile = field(repr=False)        # built from `data`, before any host overlay

    @property
    def inventory(self) -> str | None:
        """Absolute inventory path the profile names, if any."""
        return self.profile.inventory

    @property
    def hosts(self) -> str:
        """The profile's host pattern (default `all`)."""
        return self.profile.hosts


def resolve_paths(data: Any, base_dir: str) -> Any:
    """Copy of `data` with the control-machine paths it sets made absolute against `base_dir`."""
    if not isinstance(data, Mapping):
        return data

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and value and "\0" not in value:
            return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
        return value

    out = dict(data)
    if "inventory" in out:
        out["inventory"] = absolute(out["inventory"])
    workflow = out.get("workflow")
    if isinstance(workflow, Mapping) and "template_dir" in workflow:
        out["workflow"] = {**workflow, "template_dir": absolute(workflow["template_dir"])}
    backend = out.get("backend")
    if isinstance(backend, Mapping) and isinstance(backend.get("sources"), list):
        sources = [{"wheelhouse": absolute(s["wheelhouse"])}
                   if isinstance(s, Mapping) and "wheelhouse" in s and len(s) == 1 else s
                   for s in backend["sources"]]
        out["backend"] = {**backend, "sources": sources}
    return out


def _chain(path: str, first: Document | None = None) -> tuple[list[Document], list[Problem]]:
    """The profile (`first`, if already read) and its `extends` parents, the profile first;
    problems stop the walk."""
    docs: list[Document] = []
    seen: list[str] = []
    current = path
    while True:
        doc = first if first is not None and not docs else read_yaml(current)
        seen.append(os.path.realpath(current))
        if doc.data is None:
            return docs, [Problem(current, 1, 1, "", "empty file",
                                  "a profile is a YAML mapping; see `provision schema profile`")]
        if not isinstance(doc.data, Mapping):
            kind = "a list" if isinstance(doc.data, list) else f"a {type(doc.data).__name__}"
            return docs, [Problem(current, 1, 1, "", f"top level is {kind}, expected a mapping",
                                  "a profile is a mapping of keys like comfyui:, plugin:, model:")]
        docs.append(doc)
        parent = doc.data.get("extends")
        if parent is None:
            return docs, []
        if not isinstance(parent, str) or not parent or "\0" in parent:
            return docs, [problem(doc.marks, current, ("extends",), "expected a file name",
                                  "like extends: base.yaml")]
        target = os.path.normpath(os.path.join(os.path.dirname(current), parent))
        if os.path.realpath(target) in seen:
            names = [d.file for d in docs] + [target]
            return docs, [problem(doc.marks, current, ("extends",),
                                  "extends cycle: " + " -> ".join(names), "remove one extends")]
        if not os.path.isfile(target):
            what = "is a directory" if os.path.isdir(target) else "not found"
            return docs, [problem(doc.marks, current, ("extends",), f"{clip(target)} {what}",
                                  "the path is relative to this file")]
        current = target


def _merge(docs: list[Document]) -> tuple[dict[str, Any], dict[KeyPath, Mark]]:
    """Fold root parent first, the profile last; each file's relative paths resolved first."""
    data: dict[str, Any] = {}
    marks: dict[KeyPath, Mark] = {}
    for doc in reversed(docs):
        mine = resolve_paths(doc.data, os.path.dirname(os.path.abspath(doc.file)))
        merged = deep_merge(data, mine, ATOMIC)
        marks = merge_marks(merged, marks, doc.marks)
        data = merged
    data.pop("extends", None)
    workflow = data.get("workflow")
    if workflow is None or (isinstance(workflow, Mapping) and "template_dir" not in workflow):
        leaf_dir = os.path.dirname(os.path.abspath(docs[0].file))
        default = os.path.normpath(os.path.join(leaf_dir, DEFAULT_TEMPLATE_DIR))
        data["workflow"] = {**(workflow or {}), "template_dir": default}
    marks[()] = Mark(docs[0].file, 1, 1)
    return data, marks


def check(data: Mapping[str, Any], marks: Mapping[KeyPath, Mark], file: str) -> list[Problem]:
    """Schema problems, and semantic ones where the schema found none at or above the same key."""
    found = schema_problems(data, marks, file, "profile")
    flagged = tuple(p.key for p in found)
    found += [p for p in semantic_problems(data, marks, file)
              if not any(p.key == k or p.key.startswith((k + ".", k + "[")) for k in flagged)]
    found = sorted(found, key=lambda p: (p.file, p.line == 0, p.line, p.col, p.key))  # unplaced last
    return found if len(found) <= MAX_PROBLEMS else [*found[:MAX_PROBLEMS], stopped(file)]


def load_profile(path: str | os.PathLike[str], document: Document | None = None) -> LoadedProfile:
    """Read (unless `document` is the file, already read), merge, resolve and validate a profile.
    Raises ConfigError listing every problem."""
    file = os.fspath(path)
    docs, problems = _chain(file, document)
    if problems:
        raise ConfigError(problems)
    data, marks = _merge(docs)
    problems = check(data, marks, file)
    if problems:
        raise ConfigError(problems)
    name = Path(file).stem
    return LoadedProfile(name, file, data, marks, tuple(d.file for d in docs),
                         build_profile(data, name=name, file=file))


def default_profile() -> LoadedProfile:
    """What `provision facts -i INVENTORY` uses without a profile: every default, ComfyUI at
    /opt/ComfyUI (a host's `provision:` overlay may move it; overlays are validated as usual)."""
    file = "(defaults)"
    data = {"comfyui": {"root": "/opt/ComfyUI"}}
    return LoadedProfile("facts", file, data, {(): Mark(file, 1, 1)}, (file,),
                         build_profile(data, name="facts", file=file))


def profile_for_host(loaded: LoadedProfile, host: Host) -> Profile:
    """The profile with `host.overlay` (its `provision:` vars) merged over it, validated again.

    Problems in the overlay are located in the inventory file and name the host.
    """
    overlay = host.overlay
    if not overlay:
        return loaded.profile
    origin = host.origin or loaded.file
    if not isinstance(overlay, Mapping):
        raise ConfigError([Problem(origin, 0, 0, "provision", f"host {host.name}: expected a mapping")])
    if "extends" in overlay:
        where = problem(host.overlay_marks, origin, ("extends",), "")
        raise ConfigError([Problem(where.file, where.line, where.col, "provision.extends",
                                   f"host {host.name}: extends is not allowed in a host overlay",
                                   "put the keys themselves under provision:")])
    mine = resolve_paths(overlay, os.path.dirname(os.path.abspath(origin)))
    data = deep_merge(loaded.data, mine, ATOMIC)
    marks = merge_marks(data, loaded.marks, host.overlay_marks)
    problems = [_for_host(p, host, origin) for p in check(data, marks, loaded.file)]
    if problems:
        raise ConfigError(problems)
    return build_profile(data, name=loaded.name, file=loaded.file)


def _for_host(found: Problem, host: Host, origin: str) -> Problem:
    key = f"provision.{found.key}" if found.file == origin and found.key else found.key
    return Problem(found.file, found.line, found.col, key, f"host {host.name}: {found.message}",
                   found.hint)
