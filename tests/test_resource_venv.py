"""venv resource: ComfyUI's venv and its torch (pure: facts in, change out), and the planned facts the
backend and packages resources plan against."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from provisioner.config.model import Profile, build_profile
from provisioner.errors import PlanError
from provisioner.facts.model import Distribution, Facts, GitCheckout, Gpu, Probe, PythonEnv
from provisioner.resources import backend, packages, snapshot, venv
from provisioner.resources.base import Run
from provisioner.resources.releases import Asset, Listing

ROOT = "/opt/ComfyUI"
PY = f"{ROOT}/venv/bin/python"
TAGS = ("cp311-cp311-manylinux_2_36_x86_64", "cp311-cp311-linux_x86_64", "py3-none-any")
BASE = PythonEnv("/usr/bin/python3", True, "3.11.2", "cp311", "linux_x86_64", tags=TAGS, ensurepip=True,
                 distributions={"requests": Distribution("requests", "2.28.1")})


def profile(torch: dict[str, Any] | None = None, **comfyui: Any) -> Profile:
    spec = {"version": "2.6.0", "cuda": "auto", **(torch or {})}
    return build_profile({"comfyui": {"root": ROOT, "torch": spec, **comfyui}}, name="t", file="/p/t.yaml")


def gpu(driver: str = "550.120") -> Gpu:
    return Gpu(0, "NVIDIA GeForce RTX 3090", 24576, 24000, 576, (8, 6), driver, "GPU-1")


def facts(env: PythonEnv | None = None, *, gpus: tuple[Gpu, ...] = (gpu(),), base: PythonEnv | None = BASE,
          requirements: str | None = "torch\ntorchvision\nsafetensors\n") -> Facts:
    return Facts(host="h", os="Debian 12", arch="x86_64", kernel="6.1", system_python="3.11.2 /usr/bin/python3",
                 env=env or PythonEnv(PY, False), gpus=gpus, gpu_error=None if gpus else "nvidia-smi not found",
                 nvcc=None, disk_path="/opt", disk_free=10**12, comfyui_version="0.3.64",
                 git={ROOT: GitCheckout(ROOT, True, True, "a" * 40, ("v0.3.64",))},
                 interpreters={"python3": base} if base else {},
                 contents={f"{ROOT}/requirements.txt": requirements})


def installed(torch: str, cuda: str, **more: str) -> PythonEnv:
    dists = {"torch": torch, "torchvision": "0.21.0+cu124", "torchaudio": "2.6.0+cu124", "diffusers": "0.35.2", **more}
    return PythonEnv(PY, True, "3.11.2", "cp311", "linux_x86_64", torch, cuda, TAGS,
                     distributions={k: Distribution(k, v) for k, v in dists.items()})


def test_torch_unset_leaves_the_venv_alone() -> None:
    p = build_profile({"comfyui": {"root": ROOT}}, name="t", file="/p/t.yaml")
    assert venv.probe(p) == Probe() and venv.plan(p, facts()).changes == ()
    assert venv.planned(p, facts()) == facts()
    assert venv.probe(profile()) == Probe(interpreters=("python3",), read=(f"{ROOT}/requirements.txt",))


@pytest.mark.parametrize(("driver", "torch", "cuda", "why"), [
    ("550.120", "2.6.0", "12.4", "auto: the newest torch 2.6 build driver 550.120 runs (12.6 needs >= 560.28.03)"),
    ("580.95.05", "2.9", "13.0", "auto: the newest torch 2.9 build driver 580.95.05 runs"),
])
def test_auto_reads_the_driver(driver: str, torch: str, cuda: str, why: str) -> None:
    goal = venv.target_torch(profile({"version": torch}), facts(gpus=(gpu(driver),)))
    assert goal is not None and (goal.cuda, goal.why) == (cuda, why)


def test_auto_without_gpu_facts_an_old_driver_and_a_pinned_build_too_new_are_plan_errors() -> None:
    with pytest.raises(PlanError, match=r"picks the CUDA build from the NVIDIA driver, but this host's GPUs could not "
                                        r"be read \(nvidia-smi not found\)"):
        venv.target_torch(profile(), facts(gpus=()))
    with pytest.raises(PlanError, match=r"the NVIDIA driver 535.183.01 runs no CUDA build of torch 2.9 \(12.6, 12.8, "
                                        r"13.0; 12.6 needs >= 560.28.03\)"):
        venv.target_torch(profile({"version": "2.9"}), facts(gpus=(gpu("535.183.01"),)))
    with pytest.raises(PlanError, match="comfyui.torch.cuda 12.8 needs an NVIDIA driver >= 570.26; this host has 550.120"):
        venv.target_torch(profile({"version": "2.9", "cuda": "12.8"}), facts())
    pinned = venv.target_torch(profile({"version": "2.9", "cuda": "12.8"}), facts(gpus=()))   # no GPU read: unchecked
    assert pinned is not None and (pinned.cuda, pinned.why) == ("12.8", "pinned")


def test_a_missing_venv_is_created_with_python3_torch_and_the_requirements() -> None:
    p = profile({"index_url": "https://mirror.example.internal/torch/{flavour}",
                 "find_links": ["/srv/torch/{flavour}"]})
    result = venv.plan(p, facts())
    (change,) = result.changes
    assert change.action == "create" and change.before is None
    runs = [s.argv for s in change.steps if isinstance(s, Run)]
    assert runs[0] == ("/usr/bin/python3", "-m", "venv", f"{ROOT}/venv")
    assert runs[1] == (PY, "-m", "pip", "install", "--disable-pip-version-check", "--no-warn-conflicts", "--index-url",
                       "https://mirror.example.internal/torch/cu124", "--find-links", "/srv/torch/cu124",
                       "torch==2.6.0", "torchvision==0.21.0", "torchaudio==2.6.0")
    # The hold program holds the new torch, then installs what the venv lacks of the rest, in one step.
    assert runs[2][0] == PY and runs[2][1] == "-c" and len(runs) == 3
    assert runs[2][-1] == "safetensors" and "torch" not in " ".join(runs[2][3:])
    assert change.summary == ("create /opt/ComfyUI/venv with python3 3.11.2, torch 2.6.0+cu124; pip install "
                              "safetensors (missing)")
    assert [n.message for n in result.notes] == [
        "comfyui.torch.cuda auto: the newest torch 2.6 build driver 550.120 runs (12.6 needs >= 560.28.03): CUDA 12.4 "
        "(cu124)"]


def test_the_host_python_must_make_venvs() -> None:
    with pytest.raises(PlanError, match="no python3 on the host's PATH"):
        venv.plan(profile(), facts(base=None))
    with pytest.raises(PlanError, match=r"cannot create venvs \(no venv/ensurepip module\): install python3.11-venv"):
        venv.plan(profile(), facts(base=replace(BASE, ensurepip=False)))


def test_the_right_torch_is_converged_another_is_moved_and_a_missing_torchaudio_added() -> None:
    assert venv.plan(profile(), facts(installed("2.6.0+cu124", "12.4"))).changes == ()
    (moved,) = venv.plan(profile({"version": "2.8.0", "cuda": "12.6"}),
                         facts(installed("2.6.0+cu124", "12.4"), gpus=(gpu("570.133.07"),))).changes
    assert moved.summary == "torch 2.6.0+cu124 -> 2.8.0+cu126 (the backend wheel is chosen for it)"
    uninstall, install = (s.argv for s in moved.steps if isinstance(s, Run))
    assert uninstall[3:] == ("uninstall", "--yes", "--disable-pip-version-check", "torch", "torchvision", "torchaudio")
    assert install[-3:] == ("torch==2.8.0", "torchvision==0.23.0", "torchaudio==2.8.0")
    same_release_other_build = facts(installed("2.6.0+cu126", "12.6"))
    assert venv.plan(profile({"cuda": "12.4"}), same_release_other_build).changes[0].summary.startswith(
        "torch 2.6.0+cu126 -> 2.6.0+cu124")
    no_audio = installed("2.6.0+cu124", "12.4")
    no_audio = replace(no_audio, distributions={k: d for k, d in no_audio.distributions.items() if k != "torchaudio"})
    (added,) = venv.plan(profile(), facts(no_audio)).changes
    assert added.summary == "pip install torchaudio for torch 2.6.0+cu124"
    assert not any("uninstall" in s.argv for s in added.steps if isinstance(s, Run))


def test_planned_facts_are_the_venv_as_it_will_be() -> None:
    fresh = venv.planned(profile({"version": "2.9"}), facts(gpus=(gpu("570.133.07"),)))
    env = fresh.env
    assert (env.python, env.exists, env.torch, env.torch_cuda, env.tag, env.tags) == (
        PY, True, "2.9+cu128", "12.8", "cp311", TAGS)
    assert {k: d.version for k, d in env.distributions.items()} == {"torch": "2.9", "torchvision": "0.24",
                                                                    "torchaudio": "2.9"}    # not python3's requests
    moved = venv.planned(profile({"version": "2.8.0", "cuda": "12.6"}),
                         facts(installed("2.6.0+cu124", "12.4", nunchaku="1.0.1+torch2.6"), gpus=(gpu("570.133.07"),)))
    assert {k: d.version for k, d in moved.env.distributions.items()} == {
        "diffusers": "0.35.2", "nunchaku": "1.0.1+torch2.6", "torch": "2.8.0", "torchaudio": "2.8.0",
        "torchvision": "0.23.0"}


def test_backend_and_packages_plan_for_the_torch_the_venv_will_have() -> None:
    def lister(source: Any, version: str, filename: str, **_: Any) -> Listing:
        return Listing(source, "stand-in", (Asset(filename, f"https://wheels.invalid/{filename}", None, 1000),))

    p = profile({"version": "2.8.0", "cuda": "12.6"}, **{})
    f = facts(installed("2.6.0+cu124", "12.4", nunchaku="1.0.1+torch2.6"), gpus=(gpu("570.133.07"),))
    (change,) = backend.plan(p, f, lister=lister).changes
    assert change.summary == "nunchaku 1.0.1+torch2.6 -> 1.0.1+torch2.8"
    bare = facts(gpus=(gpu("570.133.07"),))
    (wheel,) = backend.plan(p, bare, lister=lister).changes      # a venv that does not exist yet
    assert wheel.after["wheel"] == "nunchaku-1.0.1+torch2.8-cp311-cp311-linux_x86_64.whl"
    (pip,) = packages.plan(p, bare).changes
    assert "diffusers>=0.35.1" in pip.summary and "torchvision" not in pip.summary   # held, planned with torch


def test_a_torch_move_has_the_snapshot_before_it_keep_the_old_torch_family_s_wheels() -> None:
    """The snapshot before a torch move keeps the wheels of the torch family it replaces, fetched
    from its torch index (the source template it records, `{flavour}` filled in on the host)."""
    p = profile({"version": "2.8.0", "cuda": "12.6", "index_url": "https://torch-mirror.example/whl/{flavour}"})
    now = facts(installed("2.6.0+cu124", "12.4"), gpus=(gpu("570.133.07"),))
    (moved,) = venv.plan(p, now).changes
    assert moved.replaces == {"torch", "torchvision", "torchaudio"} and moved.warnings == ()
    request = json.loads(snapshot.before_apply(p, now, [moved]).prelude[0].stdin)
    assert request["replaced"] == ["torch", "torchaudio", "torchvision"] and request["undo_required"] is False
    assert request["sources"]["torch"] == ["--index-url", "https://torch-mirror.example/whl/{flavour}"]
    no_audio = installed("2.6.0+cu124", "12.4")
    no_audio = replace(no_audio, distributions={k: d for k, d in no_audio.distributions.items() if k != "torchaudio"})
    assert venv.plan(profile(), facts(no_audio)).changes[0].replaces == frozenset()   # adding replaces nothing
