"""What the profile's lock (config/lock.py) pins for one host: the one place resources read it.

Every lookup answers None when the profile has no lock (the resource resolves upstream's names as
before) and the pin when it has one. A lock that lacks what this host needs (the profile moved a tag
after locking through a host overlay, a host of an environment class the lock never saw) is a
PlanError that says to run `provision lock`: under a lock nothing is resolved behind its back.
"""

from __future__ import annotations

from provisioner.catalog import torch as torches
from provisioner.config.lock import Environment, GitPin, ModelPin, environment_key
from provisioner.config.model import Profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts


def stale(profile: Profile, what: str, key: str) -> PlanError:
    assert profile.lock is not None
    return PlanError(f"{what} is not in the lock {profile.lock.file}: run `provision lock --update {key} "
                     f"{profile.file}` to resolve it")


def git(profile: Profile, key: str, repo: str, ref: str) -> GitPin | None:
    """The commit the lock pins `ref` of `repo` to (`key`: core or plugin). Both were written from
    the same profile text, so they are compared as written."""
    if profile.lock is None:
        return None
    pin = getattr(profile.lock, key)
    if pin is None or pin.ref != ref or pin.repo != repo:
        raise stale(profile, f"{key} {repo} {ref}", key)
    return pin


def model(profile: Profile, repo: str, path: str, revision: str) -> ModelPin | None:
    if profile.lock is None:
        return None
    pin = profile.lock.model(repo, path, revision)
    if pin is None:
        raise stale(profile, f"model file {repo}/{path} at {revision}", "models")
    return pin


def gpu_class(facts: Facts) -> str:
    gpu = facts.gpu
    return f"sm_{gpu.compute_capability[0]}{gpu.compute_capability[1]}" if gpu else "none"


def key_of(facts: Facts) -> str | None:
    """The environment class of a host, from the facts as the plan leads to them (venv.planned):
    its GPU architecture, torch release and CUDA build, CPython tag and platform. None when the
    venv cannot say (no torch, no pip)."""
    env = facts.env
    if not (env.torch and env.tag and env.platform):
        return None
    return environment_key(gpu_class(facts), torch_build(facts), env.tag, env.platform)


def torch_build(facts: Facts) -> str:
    """The venv's torch with its build label (`2.8.0+cu128`), as the facts give it."""
    env = facts.env
    torch = env.torch or ""
    return torch if "+" in torch or not env.torch_cuda else f"{torch}+{torches.flavour(env.torch_cuda)}"


def environment(profile: Profile, facts: Facts) -> Environment | None:
    """The lock's entry for this host's environment class (`facts` as venv.planned gives them)."""
    return environment_at(profile, key_of(facts))


def environment_at(profile: Profile, key: str | None) -> Environment | None:
    if profile.lock is None:
        return None
    found = profile.lock.environment(key) if key else None
    if found is None:
        raise stale(profile, f"environment {key or '(a venv without torch)'}", "backend")
    return found
