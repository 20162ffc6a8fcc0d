"""`comfyui.gpu`: on a host with several GPUs, the one ComfyUI uses is one place (Facts.gpu), which
precision, CPU offload, the device check, VRAM sampling and the report all read. nvidia-smi numbers
GPUs in PCI bus order and CUDA fastest first, so the sure way to name one is its UUID."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from provisioner.config.model import build_profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Gpu, PythonEnv, select_gpu
from provisioner.facts.parse import facts_to_json
from provisioner.facts.render import render_facts
from provisioner.report import build_report, from_verification
from provisioner.resources import service, workflow

REPO = Path(__file__).resolve().parents[1]
RTX5090 = Gpu(0, "NVIDIA GeForce RTX 5090", 32607, 32000, 607, (12, 0), "570.133.07",
              "GPU-a1b2c3d4-0000-4000-8000-000000005090", "00000000:01:00.0")
RTX4070 = Gpu(1, "NVIDIA GeForce RTX 4070", 12282, 12000, 282, (8, 9), "570.133.07",
              "GPU-a1b2c3d4-0000-4000-8000-000000004070", "00000000:41:00.0")


def facts(selector: int | str | None) -> Facts:
    return Facts("h", "Ubuntu 24.04", "x86_64", "6.8", "3.12", PythonEnv("/srv/ComfyUI/venv/bin/python", True),
                 (RTX5090, RTX4070), None, None, "/srv", 10**12, "0.3.64", comfyui_gpu=selector)


def profile(gpu: int | str | None):
    return build_profile({"comfyui": {"root": "/srv/ComfyUI", **({"gpu": gpu} if gpu is not None else {})}},
                         name="p", file=str(REPO / "profiles" / "p.yaml"))


def test_select_by_uuid_or_nvidia_smi_index_else_the_first() -> None:
    gpus = (RTX5090, RTX4070)
    assert select_gpu(gpus, None) is RTX5090
    assert select_gpu(gpus, RTX4070.uuid.upper()) is RTX4070                 # nvidia-smi prints lower case
    assert select_gpu(gpus, RTX4070.uuid.lower()) is RTX4070
    assert select_gpu(gpus, 1) is RTX4070
    assert select_gpu(gpus, 2) is None and select_gpu(gpus, "GPU-00000000") is None
    assert select_gpu((), None) is None


@pytest.mark.parametrize("selector", [RTX4070.uuid, 1])
def test_precision_and_offload_follow_comfyuis_gpu(selector: int | str) -> None:
    chosen, first = facts(selector), facts(None)
    values = workflow.variables(profile(selector), chosen)
    assert values["precision"] == "int4" and values["model_name"].startswith("svdq-int4_r128")
    assert values["cpu_offload"] == "enable"                         # 12 GiB < 15 GiB
    assert "RTX 4070 has 12.0 GiB" in workflow.resolve_offload(profile(selector), chosen)[1]
    on_first = workflow.variables(profile(None), first)              # the RTX 5090 would be chosen
    assert (on_first["precision"], on_first["cpu_offload"]) == ("fp4", "disable")


def test_a_gpu_the_host_does_not_have_is_a_plan_error_listing_those_it_has() -> None:
    with pytest.raises(PlanError) as err:
        service.plan(profile("GPU-00000000-dead"), facts("GPU-00000000-dead"))
    assert str(err.value) == (
        f"comfyui.gpu 'GPU-00000000-dead' is not a GPU of this host (nvidia-smi lists 0: NVIDIA GeForce RTX "
        f"5090 {RTX5090.uuid}; 1: NVIDIA GeForce RTX 4070 {RTX4070.uuid}); give one of those UUIDs")
    assert service.plan(profile(1), facts(1)).handlers                 # present: fine


def test_facts_json_and_the_report_name_comfyuis_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    doc = facts_to_json(facts(RTX4070.uuid))
    assert doc["comfyui_gpu"] == RTX4070.uuid and doc["gpu"]["name"] == "NVIDIA GeForce RTX 4070"
    entry = from_verification("h", facts(RTX4070.uuid), None, profile=profile(RTX4070.uuid))
    (host,) = build_report([entry]).hosts
    assert (host.facts.gpu, host.facts.gpu_uuid, host.facts.vram_total_mib) == (
        "NVIDIA GeForce RTX 4070", RTX4070.uuid, 12282)
    assert host.versions["precision"] == "int4 (auto)"
    from rich.console import Console

    console = Console(record=True, width=200)
    render_facts({"h": facts(1)}, console)
    text = console.export_text()
    assert "1: NVIDIA GeForce RTX 4070, 12.0 GiB total, 11.7 GiB free, compute 8.9 (ComfyUI's)" in text
    assert "RTX 5090, 31.8 GiB total, 31.2 GiB free, compute 12.0 " in text     # not marked
    assert dataclasses.replace(facts(None), gpus=()).gpu is None
