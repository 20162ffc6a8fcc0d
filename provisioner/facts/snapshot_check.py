"""A snapshot read back from a host is untrusted: whatever can write `<root>/.provision/` (ComfyUI
and its custom nodes own the root) can edit one. Before anything plans from it, each snapshot is
held to the shape `remote/snapshot.py` writes (`SCHEMA`: types, names, commits, versions, URLs) and
every path it names to the place it belongs (`Places`): custom nodes are plain names in
custom_nodes/, model files lie under models/, workflow folders inside the root or the profile's own,
kept wheels in the snapshots' wheel store, and the file a kept wheel is put back at (where pip
installed it from) in the wheel folder or a local find-links folder of the profile. The first problem is named by its field: `state/models/PATH: ...`.

Fields this does not know are allowed (a later format may add some); the fields it knows are not."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit

from provisioner.config.model import Profile

_LINE = "^[^\\u0000-\\u001f\\u007f]*$"                  # one line of text
_SHA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_TEXT = {"type": ["string", "null"], "maxLength": 100_000}
_NAME = "^(?!\\.)[^/\\u0000-\\u001f\\u007f]{1,255}$"   # one folder entry: not hidden, not . or ..
# A git origin to clone from: never an option (`-u…`) nor a remote helper (`ext::sh -c …`).
_REMOTE = "^(?!-)(?!.*::)[^\\u0000-\\u001f\\u007f\\s]{1,2000}$"

CHECKOUT: dict[str, Any] = {
    "type": ["object", "null"],
    "required": ["repo"],
    "properties": {
        "repo": {"type": "boolean"},
        "commit": {"type": ["string", "null"], "pattern": "^[0-9a-f]{40}([0-9a-f]{24})?$"},
        "remote": {"type": ["string", "null"], "pattern": _REMOTE},
        "tags": {"type": "array", "items": {"type": "string", "pattern": _LINE, "maxLength": 255}},
        "dirty": {"type": "array", "items": {"type": "string", "maxLength": 4096}},
    },
}
DIST: dict[str, Any] = {
    "type": "object",
    "required": ["name", "version"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9]([A-Za-z0-9._-]{0,200}[A-Za-z0-9])?$"},
        "version": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9.+!_-]{0,200}$"},
        "kind": {"enum": ["index", "file", "url", "dir", "vcs"]},
        "url": {"type": "string", "pattern": "^(?!-)[^\\u0000-\\u001f\\u007f\\s]{1,4000}$"},
        "sha256": _SHA,
    },
}
WORKFLOW_FILE: dict[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": ["string", "null"]}, "sha256": _SHA,
                   "size": {"type": "integer", "minimum": 0}},
}
STATE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "comfyui": CHECKOUT,
        "comfyui_version": _TEXT,
        "custom_nodes": {"type": "object", "propertyNames": {"pattern": _NAME}, "additionalProperties": CHECKOUT},
        "distributions": {"type": ["object", "null"], "additionalProperties": DIST},
        "venv_error": _TEXT,
        "models": {"type": "object", "additionalProperties": {
            "type": "object", "properties": {"size": {"type": "integer", "minimum": 0},
                                             "sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"}}}},
        "workflows": {"type": "object", "additionalProperties": {
            "type": ["object", "null"], "propertyNames": {"pattern": _NAME}, "additionalProperties": WORKFLOW_FILE}},
    },
}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["format", "id", "state"],
    "properties": {
        "format": {"const": 1},
        "id": {"type": "string", "pattern": "^[0-9]{8}-[0-9]{6}-[0-9]{3}$"},
        "time": _TEXT,
        "taken": _TEXT,
        "profile": {"type": ["object", "null"], "properties": {"name": _TEXT}},
        "state": STATE,
        "wheels": {"type": "object", "additionalProperties": {
            "type": "string", "pattern": "^wheels/[0-9a-f]{64}/(?!\\.)[^/\\u0000-\\u001f\\u007f]{1,255}$"}},
        "unkept": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


@dataclass(frozen=True)
class Places:
    """Where the paths of a host's snapshots may lead, for one profile."""

    root: str
    models: str
    workflows: str                       # the profile's workflow folder (it may lie outside the root)
    wheel_sources: tuple[str, ...]       # where a distribution installed from a file may have come from

    @classmethod
    def of(cls, profile: Profile) -> Places:
        spec = profile.comfyui
        links = (_local(link) for link in (*profile.pip.find_links, *(spec.torch.find_links if spec.torch else ())))
        local = tuple(posixpath.normpath(link) for link in links if link)
        return cls(spec.root, posixpath.join(spec.root, "models"),
                   posixpath.normpath(posixpath.join(spec.root, profile.workflow.dest)),
                   (spec.wheel_dir, *local))


def _local(link: str) -> str | None:
    """A find-links entry's folder on the host, when it is one (not a URL)."""
    if link.startswith("/"):
        return link
    parts = urlsplit(link)
    return unquote(parts.path) if parts.scheme == "file" and parts.path.startswith("/") else None


def within(path: str, folder: str) -> bool:
    """Whether `path`, absolute and already normal (no `..`, no `//`), lies in `folder` or is it."""
    top = posixpath.normpath(folder)
    return path.startswith("/") and posixpath.normpath(path) == path and \
        (path == top or path.startswith(top.rstrip("/") + "/"))


@lru_cache(maxsize=1)
def _validator() -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(SCHEMA)


def _field(path: Any) -> str:
    return "/".join(str(p) for p in path) or "the top level"


def _clip(text: str) -> str:
    return text if len(text) <= 160 else text[:150] + "…"


def _paths(raw: Mapping[str, Any], places: Places) -> Iterator[tuple[str, str]]:
    """(field, why) for each path of a well-shaped snapshot that leads outside its place."""
    state = raw.get("state") or {}
    for path in state.get("models") or {}:
        if not within(path, places.models) or path == places.models:
            yield f"state/models/{path}", f"not a file under {places.models}"
    for folder in state.get("workflows") or {}:
        if not (within(folder, places.root) or within(folder, places.workflows)):
            yield f"state/workflows/{folder}", f"not a folder inside {places.root} nor {places.workflows}"
    kept = raw.get("wheels") or {}
    for key, dist in (state.get("distributions") or {}).items():
        if dist.get("kind") == "file" and key in kept:       # a rollback puts the kept file back there
            source = unquote(urlsplit(dist.get("url") or "").path)
            if not any(within(source, place) for place in places.wheel_sources):
                yield (f"state/distributions/{key}/url",
                       f"{source or 'no file'} is not in {' nor '.join(places.wheel_sources)}")
        elif dist.get("kind") == "url" and not str(dist.get("url") or "").startswith(("https://", "http://")):
            yield f"state/distributions/{key}/url", "not an http(s) URL"


def problem(raw: Any, places: Places) -> str | None:
    """Why a snapshot document (as stored on the host) cannot be planned from, or None: the first
    field that is not what `remote/snapshot.py` writes, or a path outside its place."""
    error = next(iter(sorted(_validator().iter_errors(raw), key=lambda e: list(map(str, e.absolute_path)))), None)
    if error is not None:
        return f"{_clip(_field(error.absolute_path))}: {_clip(error.message)}"
    for where, why in _paths(raw, places):
        return f"{_clip(where)}: {_clip(why)}"
    return None


def state_problem(raw: Any, places: Places) -> str | None:
    """`problem` for the state a host runs now, as the snapshot program reads it."""
    return problem({"format": 1, "id": "00000000-000000-000", "state": raw}, places)
