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
from packaging.version import Version

from provisioner.catalog import compat
from provisioner.catalog import models as catalog
from provisioner.catalog import torch as torches
from provisioner.config.marks import KeyPath, Mark, clip, key_text, problem, shown, walk
from provisioner.config.model import OLD_NAMES, HubSpec
from provisioner.errors import Problem

Found = tuple[KeyPath, str, str]  # (where, message, hint)
# Two keys that conflict: where the problem is placed when the first came from a parent profile
# (`extends`) and the second was written in the profile itself, which is the one to change.
CONFLICTS: dict[KeyPath, KeyPath] = {("comfyui", "restart"): ("comfyui", "service")}
MIRROR_FIELDS = {"version", "tag", "filename"}
TORCH_FIELDS = {"flavour"}
CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
PROMPT_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # a prompt may run over lines, and tab
PROMPTS = (("workflow", "prompt"), ("verify", "prompts"))
GIT_HELPER = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")  # git's <transport>::<address> (ext::, fd::, …)


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


def _text(data: Any) -> Iterator[Found]:
    """No control characters in any string but a prompt: a value every schema pattern would pass
    (`backend.version: "1.0.1\\n"` reads as 1.0.1 to packaging) must not reach a host as two lines."""
    for path in walk(data):
        value = _get(data, path, str)
        if value is None:
            continue
        prompt = path[:2] in PROMPTS
        found = (PROMPT_CONTROL if prompt else CONTROL).search(value)
        if found:
            yield path, f"contains the control character {found.group()!r}", \
                "prompts may span lines; nothing else may" if prompt else "write it on one line, without escapes"


def _paths(data: Any) -> Iterator[Found]:
    root = _get(data, ("comfyui", "root"), str)
    if root is not None and root.startswith("/"):
        if ".." in root.split("/"):
            yield ("comfyui", "root"), "must not contain '..'", "write the real absolute path"
        elif not posixpath.normpath(root).strip("/"):  # normpath keeps a leading `//`
            yield ("comfyui", "root"), "cannot be /", "point it at the ComfyUI checkout"
        elif ";" in root:
            yield ("comfyui", "root"), "contains ';', which pip reads as the start of an environment " \
                "marker: the backend wheel kept under it could never be installed", "choose a path without ';'"
    dest = _get(data, ("workflow", "dest"), str)
    if dest is not None:
        if dest.startswith("/") or posixpath.normpath(dest).split("/")[0] == "..":
            yield ("workflow", "dest"), f"{shown(dest)} escapes the ComfyUI root", \
                "use a folder relative to comfyui.root, like workflows"
    restart = _get(data, ("comfyui", "restart"), Mapping)
    if restart is not None:
        modes = [k for k in ("systemd", "docker", "command") if k in restart]
        if len(modes) != 1:
            what = "sets " + " and ".join(modes) if modes else "is empty"
            yield ("comfyui", "restart"), f"{what}", "give exactly one of systemd, docker, command"


# What a systemd unit cannot carry, whatever the quoting: systemd refuses an executable whose name
# holds a quote, a backslash or a control character ("Executable name contains special characters"), and reads
# WorkingDirectory= unquoted, so a trailing backslash joins the next line and trailing blanks are cut.
UNIT_EXECUTABLE = re.compile(r"[\\\"'\x00-\x1f\x7f]")


def unit_path_problems(root: str, venv: str) -> Iterator[Found]:
    """(key, message, hint) for each path a systemd unit of this ComfyUI could not hold as written
    (`venv` absolute, or relative to `root`)."""
    python = posixpath.join(root, venv, "bin", "python")
    found = UNIT_EXECUTABLE.search(python)
    if found:
        under_root = not venv.startswith("/") or venv.startswith(root.rstrip("/") + "/")
        key = "root" if UNIT_EXECUTABLE.search(root) and under_root else "venv"
        yield ("comfyui", key), f"holds {found.group()!r}: systemd refuses to run {shown(python)} from a unit", \
            "choose a path without quotes or backslashes, or run ComfyUI without service: systemd"
    if root.endswith("\\") or root != root.rstrip():
        yield ("comfyui", "root"), "ends in a backslash or a blank, which a unit's WorkingDirectory= cannot hold", \
            "remove it"


def _service(data: Any) -> Iterator[Found]:
    """How ComfyUI runs and how it is restarted must say one thing."""
    service = _get(data, ("comfyui", "service"), str)
    restart = _get(data, ("comfyui", "restart"), Mapping)
    root = _get(data, ("comfyui", "root"), str)
    if service == "systemd" and root is not None:
        yield from unit_path_problems(root, _get(data, ("comfyui", "venv"), str) or "venv")
    if service == "systemd" and restart:
        yield ("comfyui", "restart"), "is set beside service: systemd, whose unit provision writes and restarts", \
            "remove comfyui.restart"
    if service == "docker" and not (restart and "docker" in restart):
        yield ("comfyui", "service"), "docker needs the container's name", "set comfyui.restart.docker"
    if _get(data, ("comfyui", "instances"), str) == "per-gpu":
        if service != "systemd":
            yield ("comfyui", "instances"), "per-gpu runs one unit per GPU, which provision writes", \
                "set comfyui.service: systemd"
        if _get(data, ("comfyui", "gpu"), (str, int)) is not None:
            yield ("comfyui", "gpu"), "is set beside instances: per-gpu, which runs one ComfyUI on every GPU", \
                "remove comfyui.gpu, or use instances: single"


def _hub(data: Any) -> Iterator[Found]:
    """The Hub token goes only where it belongs: over https (or to loopback), from a variable that
    says it is a token."""
    hub = HubSpec(**{k: v for k, v in (_get(data, ("huggingface",), Mapping) or {}).items()
                     if k in ("endpoint", "allow_insecure")})
    endpoint = _get(data, ("huggingface", "endpoint"), str)
    if endpoint and not hub.sends_token_to(endpoint):
        yield ("huggingface", "endpoint"), f"{endpoint} is plain http to another machine: the Hub token would " \
            "cross the network in clear text", "use https://, or set huggingface.allow_insecure: true " \
            "for a mirror on a network you trust"
    name = _get(data, ("huggingface", "token_env"), str)
    allowed = _get(data, ("huggingface", "token_env_allowlist"), list) or []
    if name and "TOKEN" not in name.upper() and name not in allowed:
        yield ("huggingface", "token_env"), f"{name} does not name a token: its value would be sent to the Hub " \
            "as a Bearer header", f"name a variable holding the Hub token (HF_TOKEN), or list {name} in " \
            "huggingface.token_env_allowlist"


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except ValueError:  # InvalidVersion, or a number past Python's 4300-digit limit
        return None


def _versions(data: Any) -> Iterator[Found]:
    version = _get(data, ("backend", "version"), str)
    if version is not None and _version(version) is None:
        yield ("backend", "version"), f"{shown(version)} is not a valid version", "a PEP 440 version like 1.0.1"
    seen: dict[str, int] = {}
    for i, spec in enumerate(_get(data, ("packages",), list) or []):
        if not isinstance(spec, str):
            continue
        try:
            req = Requirement(spec)
            unreadable = [s.version for s in req.specifier
                          if s.operator != "===" and _version(s.version.removesuffix(".*")) is None]
            if unreadable:  # packaging parses these only when comparing, which planning does
                raise ValueError(unreadable[0])
        except (InvalidRequirement, ValueError):
            yield ("packages", i), f"{shown(spec)} is not a valid requirement", \
                "NAME then a specifier like >=, ==, ~= or <, e.g. diffusers>=0.35"
            continue
        name = canonicalize_name(req.name)
        if name == "nunchaku":
            yield ("packages", i), "PyPI's `nunchaku` is an unrelated package", \
                "the backend comes from backend.sources; remove it here"
        elif name in seen:
            yield ("packages", i), f"{req.name} is listed twice", f"merge it with packages[{seen[name]}]"
        seen.setdefault(name, i)
    torch: KeyPath = ("comfyui", "torch")
    templates: list[tuple[KeyPath, str | None]] = [(torch + ("index_url",), _get(data, torch + ("index_url",), str))]
    templates += [(torch + ("find_links", i), _get(data, torch + ("find_links", i), str))
                  for i in range(len(_get(data, torch + ("find_links",), list) or []))]
    for where, text in templates:
        if text is None:
            continue
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
        except ValueError as err:
            yield where, f"bad URL template: {err}", "write {flavour} for the CUDA build, e.g. cu128"
            continue
        if fields - TORCH_FIELDS:
            yield where, f"unknown placeholder {{{sorted(fields - TORCH_FIELDS)[0]}}}", "use {flavour}"
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


def _repo(data: Any) -> Iterator[Found]:
    for where in (("plugin", "repo"), ("comfyui", "repo")):
        repo = _get(data, where, str)
        if repo is not None and GIT_HELPER.match(repo):
            helper = repo.split("::", 1)[0]
            yield where, f"{shown(repo)} asks git for its `{helper}::` remote helper, not a " \
                "repository (ext:: runs a command, fd:: reads a file descriptor and blocks)", \
                "use an https://, ssh:// or file:// URL, user@host:path, or a path on the host"


def _catalog(data: Any) -> Iterator[Found]:
    """The model family and variant exist, and the plugin tag runs with the backend version."""
    family = _get(data, ("model", "family"), str) or "qwen-image-edit-2509"
    variant = _get(data, ("model", "variant"), str) or "lightning-4step-r128"
    families = tuple(catalog.families())
    model = data.get("model") if isinstance(data, Mapping) else None
    if isinstance(model, Mapping) and "family" in model and model["family"] is None:
        pass                                   # no Nunchaku model on these hosts: nothing to look up
    elif family not in families:
        yield ("model", "family"), f"unknown model family {shown(family)}", f"known: {', '.join(families)}"
    elif variant not in (variants := tuple(catalog.variants(family))):
        yield ("model", "variant"), f"unknown variant {shown(variant)} of {family}", \
            f"known: {', '.join(variants)}"
    elif (repo := _get(data, ("model", "repo"), str)) and repo != catalog.official_repo(family):
        # Third-party weights: only on purpose, and only an upload that cannot change under the fleet.
        if not (isinstance(model, Mapping) and model.get("third_party") is True):
            yield ("model", "repo"), f"{shown(repo)} is not the official repository of {family} " \
                f"({catalog.official_repo(family)})", "set model.third_party: true to take third-party weights"
        if not re.fullmatch(r"[0-9a-f]{40}", _get(data, ("model", "revision"), str) or ""):
            yield ("model", "revision"), f"third-party repository {shown(repo)} without a pinned commit", \
                "pin model.revision to a commit (40 hex digits) of that repository"
    tag = _get(data, ("plugin", "tag"), str) or "v1.1.0"
    version = _get(data, ("backend", "version"), str) or "1.0.1"
    if re.fullmatch(r"v\d{1,9}\.\d{1,9}\.\d{1,9}", tag) and _version(version) is not None:
        reason = compat.incompatibility(tag, version)  # (a bad version was reported by _versions)
        if reason:
            where = ("plugin", "tag") if _get(data, ("plugin", "tag"), str) else ("backend", "version")
            yield where, reason, "change plugin.tag or backend.version"


def _torch(data: Any) -> Iterator[Found]:
    """The torch and CUDA build asked for are ones PyTorch publishes (when the catalog knows that torch)."""
    version = _get(data, ("comfyui", "torch", "version"), str)
    minor = torches.minor_of(version) if version else None
    if minor is None:
        return
    cuda = _get(data, ("comfyui", "torch", "cuda"), str) or "auto"
    published = torches.FLAVOURS.get(minor)
    if published is None:
        if cuda == "auto":
            known = ", ".join(torches.FLAVOURS)
            yield ("comfyui", "torch", "version"), f"torch {minor} is not in the catalog, so cuda: auto cannot " \
                f"choose its build (known: {known})", "pin comfyui.torch.cuda"
    elif cuda != "auto" and cuda not in published:
        yield ("comfyui", "torch", "cuda"), f"PyTorch publishes torch {minor} for CUDA {', '.join(published)}, " \
            f"not {cuda}", "choose one of those, or auto"


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
            yield where, f"template {shown(name)} not found in {clip(template_dir)}", \
                "fix workflow.templates or workflow.template_dir"
    for i, source in enumerate(_get(data, ("backend", "sources"), list) or []):
        house = _get(source, ("wheelhouse",), str)
        if house is not None and not os.path.isdir(house):
            yield ("backend", "sources", i, "wheelhouse"), f"directory {clip(house)} not found", \
                "create it, or fix the path: it is relative to the profile file"
    inventory = _get(data, ("inventory",), str)
    if inventory is not None and not os.path.isfile(inventory):
        yield ("inventory",), f"file {clip(inventory)} not found", "the path is relative to the profile file"


def _old_names(data: Any) -> Iterator[Found]:
    """A renamed key is still read, but not beside its new name: which one would count?"""
    for old, new in OLD_NAMES.items():
        parent = _get(data, old[:-1], Mapping)
        if parent is not None and old[-1] in parent and new in parent:
            yield old, f"is the old name of {new}, which is also given", f"keep only {new}"


CHECKS: tuple[Callable[[Any], Iterator[Found]], ...] = (_numbers, _text, _paths, _service, _repo, _versions,
                                                        _catalog, _torch, _local_files, _old_names, _hub)


def semantic_problems(data: Any, marks: Mapping[KeyPath, Mark], file: str) -> list[Problem]:
    """Every rule violation of a merged, path-resolved profile mapping, located by `marks`."""
    return [_placed(marks, file, where, message, hint) for check in CHECKS for where, message, hint in check(data)]


def _placed(marks: Mapping[KeyPath, Mark], file: str, where: KeyPath, message: str, hint: str) -> Problem:
    """The problem at `where`; at the key that conflicts with it when only that one was written in
    `file` (the user's profile), naming the parent's line: the user edits their file, not the shipped base."""
    here, other = marks.get(where), CONFLICTS.get(where)
    mine = marks.get(other) if other else None
    if here is not None and mine is not None and here.file != file and mine.file == file:
        inherited = f"{key_text(where)} (set in {here.file}:{here.line})"
        return problem(marks, file, other, f"conflicts with {inherited}: {key_text(where)} {message}",
                       f"set {key_text(where)}: null in {file}")
    return problem(marks, file, where, message, hint)
