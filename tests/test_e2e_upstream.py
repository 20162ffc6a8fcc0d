"""Upstream truth end to end, over real sshd hosts: the torch family held through a packages change
that would have moved it, and a converged host planned with the Hub down."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
from lab import Lab, LabHost, open_lab

from provisioner.catalog import models as catalog
from provisioner.resources import hub, hub_cache
from provisioner.sandbox.host import installed_torch
from provisioner.sandbox.wheels import build_torch_wheel, build_wheel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-upstream")) as lab:
        yield lab


@pytest.fixture(scope="module")
def converged(lab: Lab) -> LabHost:
    (host,) = lab.add(1)
    code, out = lab.run("apply", "--no-verify")
    assert code == 2, out
    return host


def installed(host: LabHost) -> dict[str, str]:
    code = ("import json, importlib.metadata as m; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    return json.loads(subprocess.run([str(host.sandbox.python), "-c", code], capture_output=True, text=True,
                                     check=True).stdout)


def test_packages_change_keeps_torch(lab: Lab, converged: LabHost) -> None:
    """The classic breakage: a custom node's requirement (timm, in ComfyUI-nunchaku's list) whose
    newest release wants a newer torch. pip alone upgrades torch under the nunchaku wheel; the
    plan's constraints file holds it, and pip takes the timm that fits."""
    house = lab.world.wheelhouse
    # As on the real package index: its torch is the default build, never a `+cu128` (those live
    # on the torch index only).
    build_torch_wheel(house, "2.8.0", "12.8")
    build_wheel(house, "timm", "1.0.19", {"timm/__init__.py": ""}, requires=["torch"])
    build_wheel(house, "timm", "1.0.20", {"timm/__init__.py": ""}, requires=["torch>=2.8"])
    assert installed_torch(converged.sandbox.venv) == "2.6.0+cu124"
    python = str(converged.sandbox.python)
    # Without the hold, this very requirement moves torch (pip's own dry run says so).
    report = subprocess.run([python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "--no-index",
                             "--find-links", str(house), "timm>=1.0"], capture_output=True, text=True, check=True)
    would = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.stdout)["install"]}
    assert would == {"timm": "1.0.20", "torch": "2.8.0"}

    lab.profile_extra["packages"] = ["diffusers>=0.35", "peft>=0.17", "transformers>=4.54",
                                     "accelerate>=1.10", "timm>=1.0"]
    lab.write()
    try:
        code, out = lab.run("plan")
        assert code == 2 and "pip install timm>=1.0 (missing)" in out, out
        code, out = lab.run("apply", "--no-verify")
        assert code == 2 and "1 changed" in out, out
        have = installed(converged)
        assert (have["torch"], have["torchvision"], have["timm"]) == ("2.6.0+cu124", "0.21.0+cu124", "1.0.19")
        held = (converged.comfy / ".provision" / "constraints.txt").read_text().splitlines()
        assert "torch==2.6.0+cu124" in held and "torchvision==0.21.0+cu124" in held
        assert lab.run("plan")[0] == 0
    finally:
        del lab.profile_extra["packages"]
        lab.write()


def test_fp4_file_on_an_ada_host_fails_the_plan_naming_it(lab: Lab) -> None:
    """The host's own facts program reads the header (no hashing): an RTX 4090 whose int4 file is
    really the fp4 one (renamed by hand) is refused, and the file is left alone."""
    (ada,) = lab.add(1, gpu="rtx4090")
    fp4 = catalog.dit_file("qwen-image-edit-2509", "lightning-4step-r128", "fp4")
    int4 = catalog.dit_file("qwen-image-edit-2509", "lightning-4step-r128", "int4")
    dest = ada.comfy / "models" / int4.folder / int4.filename
    dest.write_bytes(lab.world.files[(fp4.repo, fp4.path_in_repo)])
    code, out = lab.run("plan", "--limit", ada.name)
    assert code == 1, out
    assert f"model: {dest}: its header declares fp4_e2m1_all rank 128 weights (quantization_config), not int4 " \
           "rank 128; NVIDIA GeForce RTX 4090 runs int4 rank 128" in " ".join(out.split())
    code, out = lab.run("apply", "--limit", ada.name, "--no-verify")
    assert code == 1 and dest.read_bytes() == lab.world.files[(fp4.repo, fp4.path_in_repo)]


def test_backend_121_names_the_cuda_of_the_hosts_torch(lab: Lab) -> None:
    """nunchaku 1.2.1 on a torch 2.9.1+cu128 host: the +cu12.8torch2.9 wheel of the real asset list,
    chosen with the tags the host's own pip accepts, and diffusers raised to 1.2.1's floor."""
    (host,) = lab.add(1, torch="2.9.1+cu128")
    lab.overlays[host.name] = {"backend": {"version": "1.2.1"}}
    lab.write()
    code, out = lab.run("plan", "--limit", host.name)
    text = " ".join(out.split())
    assert code == 2 and "nunchaku-1.2.1+cu12.8torch2.9-cp3" in text, out
    # pip's dry run names the version it chooses; why the floor is what it is stays beside it
    assert "diffusers: (none) -> 0.36.0, for >=0.36 (nunchaku 1.2.1 Requires-Dist; profile said >=0.35;" in text, out
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    have = installed(host)
    assert (have["nunchaku"], have["diffusers"], have["torch"]) == ("1.2.1+cu12.8torch2.9", "0.36.0", "2.9.1+cu128")
    assert lab.run("plan", "--limit", host.name)[0] == 0


def test_hub_down_still_plans_a_converged_host_up_to_date(lab: Lab, converged: LabHost) -> None:
    """Last in this module: it stops the Hub stand-in. A converged fleet must not depend on the
    Hub: its answers are recorded on the control machine, and a pinned or recorded revision's
    files never change."""
    hub.clear_cache()                                    # this test's own record (earlier runs are memoised)
    code, out = lab.run("apply", "--limit", converged.name, "--no-verify")     # asks the Hub, records
    assert code == 0, out
    lab.world.hub.stop()
    hub.clear_cache()                                    # a new run: only the record on disk remains
    code, out = lab.run("plan", "--limit", converged.name)
    assert code == 0 and "up to date" in out, out
    code, out = lab.run("apply", "--limit", converged.name, "--no-verify")
    assert code == 0 and "0 changed, 1 unchanged, 0 failed" in out, out
    hub_cache.forget_refs()                               # what --refresh-hub does: now the Hub is needed
    hub.clear_cache()
    code, out = lab.run("plan", "--limit", converged.name)
    assert code == 1 and "Hub unreachable" in out, out
