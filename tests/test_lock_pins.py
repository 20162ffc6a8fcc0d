"""Resources under a lock (resources/pins.py): each converges to the pin, not to upstream's name, and
a lock that lacks what a host needs is a plan error naming the lock and the `--update` to run."""

from __future__ import annotations

from dataclasses import replace

import pytest

from provisioner.config import lock as lockfile
from provisioner.config.model import build_profile
from provisioner.errors import PlanError
from provisioner.facts.model import Distribution, Facts, GitCheckout, Gpu, PythonEnv
from provisioner.resources import core, dryrun, packages, plugin, venv

ROOT = "/srv/ComfyUI"
DEST = f"{ROOT}/custom_nodes/ComfyUI-nunchaku"
REPO = "https://github.com/nunchaku-ai/ComfyUI-nunchaku.git"
OLD, NEW = "1" * 40, "2" * 40
KEY = "sm_86 torch 2.8+cu128 cp312 linux_x86_64"


def env_of(**versions: str) -> PythonEnv:
    return PythonEnv(f"{ROOT}/venv/bin/python", True, "3.12.3", "cp312", "linux_x86_64", "2.8.0+cu128", "12.8",
                     distributions={k: Distribution(k, v) for k, v in
                                    {"torch": "2.8.0+cu128", "torchvision": "0.23.0+cu128", **versions}.items()})


def facts_for(env: PythonEnv, head: str = OLD) -> Facts:
    gpu = Gpu(0, "NVIDIA GeForce RTX 3090", 24576, 24000, 576, (8, 6), "570.133.07", uuid="GPU-1")
    co = GitCheckout(DEST, True, True, head, ("v1.1.0",), None, (), REPO)
    return Facts(host="h", os="Ubuntu 24.04", arch="x86_64", kernel="6.8", system_python="3.12", env=env,
                 gpus=(gpu,), gpu_error=None, nvcc=None, disk_path="/srv", disk_free=10**12,
                 comfyui_version="0.3.64", git={DEST: co, ROOT: GitCheckout(ROOT, True, True, "3" * 40)})


def locked(packages_pinned: dict[str, str], torch: str = "2.8.0+cu128") -> lockfile.Lock:
    env = lockfile.Environment("sm_86", torch, "cp312", "linux_x86_64",
                               lockfile.TorchPin("--index-url x", {"torch": torch}), None, packages_pinned)
    return lockfile.Lock("/p/t.lock.yaml", "t.yaml", "sha256:" + "0" * 64, None,
                         lockfile.GitPin(REPO, "v1.1.0", NEW), (), {env.key: env})


def profile_with(lock: lockfile.Lock | None, **more: object):
    data = {"comfyui": {"root": ROOT}, "packages": ["diffusers>=0.35"], **more}
    return replace(build_profile(data, name="t", file="/p/t.yaml"), lock=lock)


def test_the_class_key_counts_torch_by_release_and_build() -> None:
    assert lockfile.environment_key("sm_86", "2.8.0+cu128", "cp312", "linux_x86_64") == KEY
    assert next(iter(locked({}).environments)) == KEY


def test_plugin_under_a_lock_moves_to_the_locked_commit_though_the_tag_is_there() -> None:
    facts = facts_for(env_of())
    assert plugin.plan(profile_with(None), facts).changes == ()          # the tag is checked out
    (change,) = plugin.plan(profile_with(locked({})), facts).changes    # but the lock has another commit
    assert change.after["commit"] == NEW
    assert any(step.argv[-1] == NEW for step in change.steps)
    assert plugin.plan(profile_with(locked({})), facts_for(env_of(), head=NEW)).changes == ()


def test_a_tag_the_lock_does_not_have_is_a_plan_error_naming_it() -> None:
    with pytest.raises(PlanError) as err:
        plugin.plan(profile_with(locked({}), plugin={"tag": "v1.2.0"}), facts_for(env_of()))
    assert "/p/t.lock.yaml" in str(err.value) and "provision lock --update plugin /p/t.yaml" in str(err.value)


def test_packages_under_a_lock_install_every_pin_the_venv_differs_from() -> None:
    env = env_of(diffusers="0.36.0", **{"huggingface-hub": "0.35.3"})
    lock = locked({"diffusers": "0.36.0", "huggingface-hub": "0.34.4", "tokenizers": "0.22.2"})
    (change,) = packages.plan(profile_with(lock), facts_for(env)).changes
    assert change.before == {"huggingface-hub": "0.35.3", "tokenizers": None}
    assert change.after == {"huggingface-hub": "==0.34.4", "tokenizers": "==0.22.2"}
    install = change.steps[-1].argv
    assert install[-2:] == ("huggingface-hub==0.34.4", "tokenizers==0.22.2")
    assert change.preview is not None and "--dry-run" in change.preview.argv
    # The dry run holds the torch family as the constraints file would, without the file.
    assert "-c" not in change.preview.argv and "torch==2.8.0+cu128" in change.preview.argv


def test_an_environment_class_the_lock_lacks_is_a_plan_error() -> None:
    other = replace(env_of(diffusers="0.36.0"), tag="cp311")
    with pytest.raises(PlanError, match="environment sm_86 torch 2.8\\+cu128 cp311 linux_x86_64 is not in the lock"):
        packages.plan(profile_with(locked({"diffusers": "0.36.0"})), facts_for(other))


def test_venv_installs_the_locked_torch_release_not_the_newest() -> None:
    env = replace(env_of(torch="2.7.1+cu128"), torch="2.7.1+cu128")
    profile = profile_with(locked({}, torch="2.8.0+cu128"), comfyui={"root": ROOT, "torch": {"version": "2.8", "cuda": "12.8"}})
    (change,) = venv.plan(profile, facts_for(env)).changes
    assert "torch==2.8.0" in change.steps[-1].argv
    unlocked = profile_with(None, comfyui={"root": ROOT, "torch": {"version": "2.8", "cuda": "12.8"}})
    (change,) = venv.plan(unlocked, facts_for(env)).changes
    assert "torch==2.8.*" in change.steps[-1].argv


def test_pip_report_moves_name_every_distribution_that_changes() -> None:
    env = env_of(**{"huggingface-hub": "0.35.3", "diffusers": "0.36.0"})
    report = ('{"version": "1", "install": [{"metadata": {"name": "tokenizers", "version": "0.22.2"}},'
              ' {"metadata": {"name": "huggingface_hub", "version": "0.34.4"}},'
              ' {"metadata": {"name": "diffusers", "version": "0.36.0"}}]}')
    assert dryrun.moves(report, env) == {"huggingface-hub": ("0.35.3", "0.34.4"), "tokenizers": (None, "0.22.2")}
    with pytest.raises(PlanError, match="pip >= 22.2"):
        dryrun.moves("not json", env)


def test_core_under_a_lock_is_at_its_version_only_at_the_locked_commit() -> None:
    repo = "https://github.com/Comfy-Org/ComfyUI.git"
    co = GitCheckout(ROOT, True, True, OLD, ("v0.3.64",), None, (), repo)
    lock = replace(locked({}), core=lockfile.GitPin(repo, "v0.3.64", NEW))
    at = {"root": ROOT, "version": "v0.3.64"}
    assert core.at_version(profile_with(None, comfyui=at), co)
    assert not core.at_version(profile_with(lock, comfyui=at), co)          # the tag moved since the lock
    assert core.at_version(profile_with(lock, comfyui=at), replace(co, head=NEW))
    commit = {"root": ROOT, "version": OLD}                                 # a commit needs no pin
    assert core.at_version(profile_with(lock, comfyui=commit), co)


def test_what_a_relock_keeps() -> None:
    from provisioner.plan import resolve

    old = locked({"diffusers": "0.35.2"})
    everything = frozenset(lockfile.KEYS)
    assert resolve.kept(None, None, True) == frozenset()
    assert resolve.kept(old, None, True) == everything                    # nothing asked: nothing moves
    assert resolve.kept(old, None, False) == {"core", "plugin", "models"}  # the profile's floors may have moved
    assert resolve.kept(old, [], True) == frozenset()                      # --update: all of it
    assert resolve.kept(old, ["models", "packages"], True) == everything - {"models", "packages"}
    (env,) = old.environments.values()
    now = resolve.HostFindings(replace(env, packages={"diffusers": "0.36.0"}),
                               {"plugin": lockfile.GitPin(REPO, "v1.1.0", OLD)})
    kept = resolve.combine("/p/t.lock.yaml", "t.yaml", old.digest, [now], (), old, everything - {"packages"})
    assert kept.environments[env.key].packages == {"diffusers": "0.36.0"}  # moved
    assert kept.plugin == old.plugin                                       # kept: NEW, not OLD
    moved = resolve.combine("/p/t.lock.yaml", "t.yaml", old.digest, [now], (), old, frozenset())
    assert moved.plugin is not None and moved.plugin.commit == OLD
