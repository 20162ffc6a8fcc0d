"""The lock file: the exact state a profile resolves to, shared by every control machine.

A profile names things upstream can move: a ComfyUI tag, a plugin tag, a model repo's `main`, a
torch release (`2.8`, the newest 2.8.x), package floors (`diffusers>=0.35`). `provision lock
PROFILE` resolves each once and writes what it found beside the profile (`rtx3090.yaml` ->
`rtx3090.lock.yaml`, meant to be committed); `plan` and `apply` then converge to the lock, not to
what upstream says today, so two control machines with empty caches plan the same bytes and an
upstream re-upload changes nothing until someone runs `provision lock --update`.

What is locked (every entry also says what the profile asked, so a pin applies only to that ask):

- `core`, `plugin`: repository, tag -> commit.
- `models`: each model file (repo, path, the revision asked: `main` or a commit) -> Hub commit,
  size, sha256.
- `environments`: one per environment class of the fleet (GPU architecture, torch build, CPython
  tag, platform: `environment_key`), each with
  - `torch`: the torch family's exact versions and the index they come from,
  - `backend`: the nunchaku wheel for that class -> file name, URL, size, sha256,
  - `packages`: every distribution of the venv beside the torch family, at the exact version pip
    itself resolved on a host of that class (`pip install --dry-run --report`).
- `digest`: of the profile as written (its `extends` chain, parsed): a profile edited after it was
  locked is a plan error that says to run `provision lock`.

This module is data only (dataclasses, load with located errors, dump, the digest); the resolving
is `plan/lock.py`'s, the use of each pin the resources'. A snapshot (resources/snapshot.py) is an
exact desired state of the same shape. Changes to this module are additive: new optional fields,
never a renamed or reinterpreted one (`FORMAT` says which shape a file has).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from provisioner.config.marks import read_yaml
from provisioner.config.schema import schema_problems
from provisioner.errors import ConfigError, Problem

FORMAT = 1
SUFFIX = ".lock.yaml"
HEADER = ("# Written by `provision lock`: the exact state this profile resolves to. Commit it beside the\n"
          "# profile; `provision plan`/`apply` converge to it. Move it with `provision lock --update [KEY...]`.\n")
KEYS = ("core", "plugin", "models", "torch", "backend", "packages")   # what `--update KEY` may name


@dataclass(frozen=True)
class GitPin:
    """A git ref the profile names (`comfyui.version`, `plugin.tag`) and the commit it was."""

    repo: str
    ref: str
    commit: str


@dataclass(frozen=True)
class ModelPin:
    """One model file: the revision the profile (or catalog) asked for, and what the Hub served."""

    repo: str
    path: str
    revision: str                     # as asked: "main", or a commit
    commit: str
    size: int
    sha256: str | None                # None: a small non-LFS file

    @property
    def key(self) -> tuple[str, str, str]:
        return self.repo, self.path, self.revision


@dataclass(frozen=True)
class WheelPin:
    """The backend wheel of an environment class."""

    name: str
    url: str                          # a URL, or a wheelhouse path on the control machine
    size: int | None
    sha256: str | None               # None: the source publishes none (a mirror answering HEAD)


@dataclass(frozen=True)
class TorchPin:
    """The torch family's exact versions (torch, torchvision, torchaudio, triton, nvidia-*) and
    where they come from (the pip source arguments, e.g. `--index-url https://…/whl/cu128`)."""

    index: str
    versions: Mapping[str, str]


@dataclass(frozen=True)
class Environment:
    """What one environment class of the fleet runs."""

    gpu: str                          # "sm_86" (compute capability), or "none"
    torch: str                        # "2.8.0+cu128"
    python: str                       # "cp312"
    platform: str                     # "linux_x86_64"
    torch_family: TorchPin | None = None
    backend: WheelPin | None = None
    packages: Mapping[str, str] = field(default_factory=dict)   # canonical name -> exact version

    @property
    def key(self) -> str:
        return environment_key(self.gpu, self.torch, self.python, self.platform)


@dataclass(frozen=True)
class Lock:
    file: str                         # where it was read from or will be written
    profile: str                      # the profile's file name, relative to the lock
    digest: str                       # profile_digest() when it was locked
    core: GitPin | None = None
    plugin: GitPin | None = None
    models: tuple[ModelPin, ...] = ()
    environments: Mapping[str, Environment] = field(default_factory=dict)   # by environment_key

    def model(self, repo: str, path: str, revision: str) -> ModelPin | None:
        return next((m for m in self.models if m.key == (repo, path, revision)), None)

    def environment(self, key: str) -> Environment | None:
        return self.environments.get(key)


def environment_key(gpu: str, torch: str, python: str, platform: str) -> str:
    """`sm_86 torch 2.8+cu128 cp312 linux_x86_64`: the class hosts share a wheel and a resolution in.
    torch counts by release and build (`2.8.0+cu128` -> `2.8+cu128`): the lock decides the patch."""
    release, _, build = torch.partition("+")
    minor = ".".join(release.split(".")[:2])
    return f"{gpu} torch {minor}{'+' + build if build else ''} {python} {platform}"


def path_for(profile_file: str | os.PathLike[str]) -> Path:
    """The lock beside a profile: `profiles/rtx3090.yaml` -> `profiles/rtx3090.lock.yaml`."""
    p = Path(profile_file)
    stem = p.name[:-len(p.suffix)] if p.suffix in (".yaml", ".yml") else p.name
    return p.with_name(stem + SUFFIX)


def profile_digest(chain: tuple[str, ...]) -> str:
    """sha256 of the profile as written: each file of its `extends` chain (the profile first),
    parsed, with its name relative to the profile's folder. Comments and formatting do not count;
    where the repository is checked out does not either, so every control machine agrees."""
    base = os.path.dirname(os.path.abspath(chain[0])) if chain else "."
    docs = [[os.path.relpath(os.path.abspath(f), base), read_yaml(f).data] for f in chain]
    text = json.dumps(docs, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# --- reading --------------------------------------------------------------------------------

def load(file: str | os.PathLike[str]) -> Lock:
    """Read and validate a lock file; ConfigError (exit 3) naming the file, line and key otherwise."""
    name = str(file)
    doc = read_yaml(name)
    if doc.data is None:
        raise ConfigError([Problem(name, 1, 1, "", "empty lock file", "run `provision lock PROFILE` to write it")])
    problems = schema_problems(doc.data, doc.marks, name, "lock")
    if problems:
        raise ConfigError(problems)
    return from_data(doc.data, name)


def from_data(data: Mapping[str, Any], file: str) -> Lock:
    """A Lock from a mapping the lock schema accepted."""
    def git(entry: Mapping[str, Any] | None) -> GitPin | None:
        return GitPin(entry["repo"], entry["ref"], entry["commit"]) if entry else None

    envs = {}
    for key, env in (data.get("environments") or {}).items():
        family, wheel = env.get("torch_family"), env.get("backend")
        envs[key] = Environment(
            env["gpu"], env["torch"], env["python"], env["platform"],
            TorchPin(family["index"], dict(family["versions"])) if family else None,
            WheelPin(wheel["name"], wheel["url"], wheel.get("size"), wheel["sha256"]) if wheel else None,
            dict(env.get("packages") or {}))
    return Lock(file, data["profile"], data["digest"], git(data.get("core")), git(data.get("plugin")),
                tuple(ModelPin(m["repo"], m["path"], m["revision"], m["commit"], m["size"], m.get("sha256"))
                      for m in data.get("models") or ()), envs)


def read_beside(profile_file: str, explicit: str | None = None) -> Lock | None:
    """`--lock FILE` (which must exist), else the lock beside the profile if there is one."""
    if explicit is not None:
        if not Path(explicit).is_file():
            raise ConfigError([Problem(explicit, 0, 0, "", "no such lock file",
                                       "give a file written by `provision lock`, or drop --lock")])
        return load(explicit)
    found = path_for(profile_file)
    return load(found) if found.is_file() else None


# --- writing --------------------------------------------------------------------------------

def to_data(lock: Lock) -> dict[str, Any]:
    """The lock as the mapping its file holds (keys in a fixed order, so a re-lock diffs cleanly)."""
    def git(pin: GitPin | None) -> dict[str, str] | None:
        return {"repo": pin.repo, "ref": pin.ref, "commit": pin.commit} if pin else None

    out: dict[str, Any] = {"format": FORMAT, "profile": lock.profile, "digest": lock.digest}
    if lock.core:
        out["core"] = git(lock.core)
    if lock.plugin:
        out["plugin"] = git(lock.plugin)
    out["models"] = [{"repo": m.repo, "path": m.path, "revision": m.revision, "commit": m.commit,
                      "size": m.size, "sha256": m.sha256} for m in sorted(lock.models, key=lambda m: m.key)]
    envs: dict[str, Any] = {}
    for key in sorted(lock.environments):
        env = lock.environments[key]
        entry: dict[str, Any] = {"gpu": env.gpu, "torch": env.torch, "python": env.python, "platform": env.platform}
        if env.torch_family:
            entry["torch_family"] = {"index": env.torch_family.index,
                                     "versions": dict(sorted(env.torch_family.versions.items()))}
        if env.backend:
            entry["backend"] = {"name": env.backend.name, "url": env.backend.url, "size": env.backend.size,
                                "sha256": env.backend.sha256}
        entry["packages"] = dict(sorted(env.packages.items()))
        envs[key] = entry
    out["environments"] = envs
    return out


def dumps(lock: Lock) -> str:
    return HEADER + yaml.safe_dump(to_data(lock), sort_keys=False, default_flow_style=False, width=200)


def write(lock: Lock) -> None:
    """Atomically: a temporary sibling, then rename (a killed `provision lock` leaves the old lock)."""
    target = Path(lock.file)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(dumps(lock), encoding="utf-8")
    os.replace(tmp, target)


# --- comparing ------------------------------------------------------------------------------

def differences(old: Lock | None, new: Lock) -> list[str]:
    """What moved, one line each (`model …: commit 1a2b3c4d5e6f -> 9f8e7d6c5b4a, sha256 … -> …`)."""
    def flat(lock: Lock | None) -> dict[str, dict[str, Any]]:
        if lock is None:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for what, pin in (("core", lock.core), ("plugin", lock.plugin)):
            if pin:
                out[f"{what} {pin.repo} {pin.ref}"] = {"commit": pin.commit}
        for m in lock.models:
            out[f"model {m.repo}/{m.path}@{m.revision}"] = {"commit": m.commit, "size": m.size, "sha256": m.sha256}
        for key, env in lock.environments.items():
            if env.torch_family:
                for dist, version in env.torch_family.versions.items():
                    out[f"torch [{key}] {dist}"] = {"version": version, "index": env.torch_family.index}
            if env.backend:
                out[f"backend [{key}]"] = {"wheel": env.backend.name, "sha256": env.backend.sha256}
            for dist, version in env.packages.items():
                out[f"packages [{key}] {dist}"] = {"version": version}
        return out

    before, after = flat(old), flat(new)
    lines = []
    for name in sorted(before.keys() | after.keys()):
        was, now = before.get(name), after.get(name)
        if was == now:
            continue
        if was is None:
            lines.append(f"+ {name}: " + ", ".join(f"{k} {_short(v)}" for k, v in now.items()))  # type: ignore[union-attr]
        elif now is None:
            lines.append(f"- {name}")
        else:
            lines.append(f"~ {name}: " + ", ".join(f"{k} {_short(was.get(k))} -> {_short(now.get(k))}"
                                                    for k in now if was.get(k) != now.get(k)))
    return lines


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text) else text
