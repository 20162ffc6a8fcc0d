"""Profile rules a JSON Schema cannot say: versions, requirements, catalog, compatibility, paths."""

from __future__ import annotations

import math
import os
import posixpath
import re
import string
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from provisioner.catalog import compat
from provisioner.catalog import models as catalog
from provisioner.config.marks import KeyPath, Mark, problem, walk
from provisioner.config.model import OLD_NAMES
from provisioner.errors import Problem

Found = tuple[KeyPath, str, str]  # (where, message, hint)
MIRROR_FIELDS = {"version", "tag", "filename"}


def _get(data: Any, path: KeyPath, kind: type | tuple[type, ...]) -> Any:
    """The value at `path` if it has type `kind`, else None (the schema reports wrong types)."""
    for part in path:
        if isinstance(part, str) and isinstance(data, Mapping):
            data = data.get(part)
        elif isinstance(part, int) and isinstance(data, list) and part < len(data):
            data = data[part]
        else:
            return None
    return data if isinstance(data, kind) and not isinstance(data, bool) else None


def _numbers(data: Any) -> Iterator[Found]:
    """YAML's .nan and .inf slip through every numeric bound of a schema."""
    for path in walk(data):
        value = _get(data, path, float)
        if value is not None and not math.isfinite(value):
            yield path, f"{value} is not a finite number", ""


def _paths(data: Any) -> Iterator[Found]:
    root = _get(data, ("comfyui", "root"), str)
    if root is not None and root.startswith("/"):
        if ".." in root.split("/"):
            yield ("comfyui", "root"), "must not contain '..'", "write the real absolute path"
        elif posixpath.normpath(root) == "/":
            yield ("comfyui", "root"), "cannot be /", "point it at the ComfyUI checkout"
    dest = _get(data, ("workflow", "dest"), str)
    if dest is not None:
        if dest.startswith("/") or posixpath.normpath(dest).split("/")[0] == "..":
            yield ("workflow", "dest"), f"{dest!r} escapes the ComfyUI root", \
                "use a folder relative to comfyui.root, like workflows"
    restart = _get(data, ("comfyui", "restart"), Mapping)
    if restart is not None:
        modes = [k for k in ("systemd", "docker", "command") if k in restart]
        if len(modes) != 1:
            what = "sets " + " and ".join(modes) if modes else "is empty"
            yield ("comfyui", "restart"), f"{what}", "give exactly one of systemd, docker, command"


def _versions(data: Any) -> Iterator[Found]:
    version = _get(data, ("backend", "version"), str)
    if version is not None:
        try:
            Version(version)
        except InvalidVersion:
            yield ("backend", "version"), f"{version!r} is not a valid version", "a PEP 440 version like 1.0.1"
    seen: dict[str, int] = {}
    for i, spec in enumerate(_get(data, ("packages",), list) or []):
        if not isinstance(spec, str):
            continue
        try:
            req = Requirement(spec)
        except InvalidRequirement:
            yield ("packages", i), f"{spec!r} is not a valid requirement", \
                "NAME then a specifier like >=, ==, ~= or <, e.g. diffusers>=0.35"
            continue
        name = canonicalize_name(req.name)
        if name == "nunchaku":
            yield ("packages", i), "PyPI's `nunchaku` is an unrelated package", \
                "the backend comes from backend.sources; remove it here"
        elif name in seen:
            yield ("packages", i), f"{req.name} is listed twice", f"merge it with packages[{seen[name]}]"
        seen.setdefault(name, i)
    for i, source in enumerate(_get(data, ("backend", "sources"), list) or []):
        mirror = _get(source, ("mirror",), str)
        if mirror is not None:
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(mirror) if f is not None}
            except ValueError as err:
                yield ("backend", "sources", i, "mirror"), f"bad URL template: {err}", ""
                continue
            if fields - MIRROR_FIELDS:
                yield ("backend", "sources", i, "mirror"), \
                    f"unknown placeholder {{{sorted(fields - MIRROR_FIELDS)[0]}}}", \
                    "use {version}, {tag} or {filename}"


def _catalog(data: Any) -> Iterator[Found]:
    """The model family and variant exist, and the plugin tag runs with the backend version."""
    family = _get(data, ("model", "family"), str) or "qwen-image-edit-2509"
    variant = _get(data, ("model", "variant"), str) or "lightning-4step-r128"
    families = tuple(catalog.families())
    if family not in families:
        yield ("model", "family"), f"unknown model family {family!r}", f"known: {', '.join(families)}"
    elif variant not in (variants := tuple(catalog.variants(family))):
        yield ("model", "variant"), f"unknown variant {variant!r} of {family}", \
            f"known: {', '.join(variants)}"
    tag = _get(data, ("plugin", "tag"), str) or "v1.1.0"
    version = _get(data, ("backend", "version"), str) or "1.0.1"
    if re.fullmatch(r"v\d+\.\d+\.\d+", tag):
        try:
            Version(version)
        except InvalidVersion:
            return  # already reported by _versions
        reason = compat.incompatibility(tag, version)
        if reason:
            where = ("plugin", "tag") if _get(data, ("plugin", "tag"), str) else ("backend", "version")
            yield where, reason, "change plugin.tag or backend.version"


def _local_files(data: Any) -> Iterator[Found]:
    """Control-machine paths (already absolute: the loader resolved them) must exist."""
    template_dir = _get(data, ("workflow", "template_dir"), str)
    templates = _get(data, ("workflow", "templates"), list)
    if template_dir is not None and templates is None:
        templates = ["qwen-image-edit-lightning.json.j2"]
    for i, name in enumerate(templates or []):
        if isinstance(name, str) and template_dir and not os.path.isfile(os.path.join(template_dir, name)):
            where = ("workflow", "templates", i) if _get(data, ("workflow", "templates"), list) \
                else ("workflow", "template_dir")
            yield where, f"template {name!r} not found in {template_dir}", \
                "fix workflow.templates or workflow.template_dir"
    for i, source in enumerate(_get(data, ("backend", "sources"), list) or []):
        house = _get(source, ("wheelhouse",), str)
        if house is not None and not os.path.isdir(house):
            yield ("backend", "sources", i, "wheelhouse"), f"directory {house} not found", \
                "create it, or fix the path: it is relative to the profile file"
    inventory = _get(data, ("inventory",), str)
    if inventory is not None and not os.path.isfile(inventory):
        yield ("inventory",), f"file {inventory} not found", "the path is relative to the profile file"


def _old_names(data: Any) -> Iterator[Found]:
    """A renamed key is still read, but not beside its new name: which one would count?"""
    for old, new in OLD_NAMES.items():
        parent = _get(data, old[:-1], Mapping)
        if parent is not None and old[-1] in parent and new in parent:
            yield old, f"is the old name of {new}, which is also given", f"keep only {new}"


CHECKS: tuple[Callable[[Any], Iterator[Found]], ...] = (_numbers, _paths, _versions, _catalog, _local_files,
                                                        _old_names)


def semantic_problems(data: Any, marks: Mapping[KeyPath, Mark], file: str) -> list[Problem]:
    """Every rule violation of a merged, path-resolved profile mapping, located by `marks`."""
    return [problem(marks, file, where, message, hint)
            for check in CHECKS for where, message, hint in check(data)]
