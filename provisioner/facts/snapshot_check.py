"""A snapshot read back from a host is untrusted: whatever can write `<root>/.provision/` (ComfyUI
and its custom nodes own the root) can edit one. Before anything plans from it, each snapshot is
held to the shape `remote/snapshot.py` writes (`SCHEMA`: types, names, commits, versions, URLs) and
every path it names to the place it belongs (`Places`): custom nodes are plain names in
custom_nodes/, model files lie under models/, workflow folders inside the root or the profile's own,
kept wheels in the snapshots' wheel store, and the file a kept wheel is put back at (where pip
installed it from) directly in the wheel folder or a local find-links folder of the profile. The
pip source arguments an index distribution is fetched again with (`sources`) are only what
provision records (`--no-index`, `--index-url`, `--extra-index-url`, `--find-links`), never an
option that writes or reads elsewhere (`--dest`, `--log`, `-r`, ...); a local one names one of the
profile's own sources or lies in one of its folders. The first problem is named by its field:
`state/models/PATH: ...`.

Fields this does not know are allowed (a later format may add some); the fields it knows are not."""

from __future__ import annotations

import posixpath
import re
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
_WORD = "^[^\\u0000-\\u001f\\u007f\\s]{1,4000}$"      # one argument: no whitespace, no control
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
        # canonical name -> the pip source arguments it is fetched again with (checked by `_sources`)
        "sources": {"type": "object", "additionalProperties": {
            "type": "array", "maxItems": 64, "items": {"type": "string", "pattern": _WORD}}},
    },
}


@dataclass(frozen=True)
class Places:
    """Where the paths of a host's snapshots may lead, for one profile."""

    root: str
    models: str
    workflows: str                       # the profile's workflow folder (it may lie outside the root)
    wheel_sources: tuple[str, ...]       # where a distribution installed from a file may have come from
    # The profile's own pip source values (index URLs, find-links; torch's with `{flavour}` unfilled),
    # and the local folders among them: where a recorded local pip source may point.
    pip_values: tuple[str, ...] = ()
    pip_folders: tuple[str, ...] = ()

    @classmethod
    def of(cls, profile: Profile) -> Places:
        spec, pip = profile.comfyui, profile.pip
        links = (*pip.find_links, *(spec.torch.find_links if spec.torch else ()))
        local = tuple(posixpath.normpath(link) for link in map(_local, links) if link)
        indexes = (pip.index_url, *pip.extra_index_urls, spec.torch.index_url if spec.torch else None)
        values = tuple(v for v in (*indexes, *links) if v)
        folders = tuple(posixpath.normpath(v) for v in map(_local, (i for i in indexes if i)) if v)
        return cls(spec.root, posixpath.join(spec.root, "models"),
                   posixpath.normpath(posixpath.join(spec.root, profile.workflow.dest)),
                   (spec.wheel_dir, *local), values, (spec.wheel_dir, *local, *folders))


def _local(link: str) -> str | None:
    """A find-links entry's folder on the host, when it is one (not a URL)."""
    if link.startswith("/"):
        return link
    parts = urlsplit(link)
    return unquote(parts.path) if parts.scheme == "file" and parts.path.startswith("/") else None


def within(path: str, folder: str) -> bool:
    """Whether `path`, absolute and already normal (no `..`, no `//`), lies in `folder` or is it.
    A `{flavour}` in `folder` (torch's find-links, a folder per CUDA build) stands for one name."""
    top = posixpath.normpath(folder)
    if not (path.startswith("/") and posixpath.normpath(path) == path):
        return False
    if "{flavour}" in top:
        pattern = re.escape(top.rstrip("/")).replace(re.escape("{flavour}"), "[^/]+")
        return re.fullmatch(pattern + "(/.*)?", path, re.S) is not None
    return path == top or path.startswith(top.rstrip("/") + "/")


def place_of(path: str, folders: tuple[str, ...]) -> str | None:
    """The folder among `folders` that `path` lies in (a `{flavour}` filled as in `path`), or None."""
    for folder in folders:
        if within(path, folder):
            top = posixpath.normpath(folder)
            if "{flavour}" not in top:
                return top
            pattern = re.escape(top.rstrip("/")).replace(re.escape("{flavour}"), "[^/]+")
            match = re.match(pattern + "(?=/|$)", path)
            return match.group() if match else None
    return None


def _filled(template: str, value: str) -> bool:
    """Whether `value` is `template` with its `{flavour}` (if any) filled by one name."""
    pattern = re.escape(template).replace(re.escape("{flavour}"), "[A-Za-z0-9._+-]+")
    return re.fullmatch(pattern, value) is not None


_SOURCE_OPTIONS = ("--index-url", "--extra-index-url", "--find-links")


def _sources(args: list[str], places: Places) -> str | None:
    """Why a recorded list of pip source arguments is not one provision writes, or None. Remote
    indexes are what they were (an old mirror still serves the old version); a local folder or
    file:// index is one of the profile's own sources or lies in a folder of one."""
    at = 0
    while at < len(args):
        option = args[at]
        if option == "--no-index":
            at += 1
            continue
        if option not in _SOURCE_OPTIONS:
            return (f"{option[:80]} is not a pip source option provision records "
                    f"({', '.join(_SOURCE_OPTIONS)}, --no-index)")
        if at + 1 >= len(args) or args[at + 1].startswith("-"):
            return f"{option} has no value"
        value = args[at + 1]
        at += 2
        if value.startswith(("https://", "http://")) or any(_filled(own, value) for own in places.pip_values):
            continue
        if option != "--find-links" and not value.startswith("file://"):
            return f"{option} {value[:80]}: not an http(s) or file:// URL"
        folder = _local(value) if value.startswith("file://") or value.startswith("/") else None
        # A local find-links folder is no more than an index anywhere (which is kept as recorded):
        # torch's lie in a folder per CUDA build that a torch move changes, so any absolute one passes.
        if option == "--find-links" and folder is not None and posixpath.normpath(folder) == folder:
            continue
        if folder is None or not any(within(folder, place) for place in places.pip_folders):
            return (f"{option} {value[:80]}: not one of the profile's pip sources nor in "
                    f"{' nor '.join(places.pip_folders)}")
    return None


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
            # Directly in its folder, as pip and provision put wheels there: a put-back never passes
            # a folder below it, where a link could lead it out.
            source = unquote(urlsplit(dist.get("url") or "").path)
            if place_of(source, places.wheel_sources) != posixpath.dirname(source):
                yield (f"state/distributions/{key}/url",
                       f"{source or 'no file'} is not directly in {' nor '.join(places.wheel_sources)}")
        elif dist.get("kind") == "url" and not str(dist.get("url") or "").startswith(("https://", "http://")):
            yield f"state/distributions/{key}/url", "not an http(s) URL"
    for key, args in (raw.get("sources") or {}).items():
        if (why := _sources(list(args), places)) is not None:
            yield f"sources/{key}", why


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
