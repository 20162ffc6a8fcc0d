"""The model catalog: real upstream file names, variants, precision by GPU, errors listing choices."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from provisioner.errors import PlanError
from provisioner.facts.model import Gpu
from provisioner.catalog import models as catalog

AMPERE = Gpu(0, "NVIDIA GeForce RTX 3090", 24576, 24000, 576, (8, 6), "550.54")
BLACKWELL = Gpu(0, "NVIDIA GeForce RTX 5090", 32607, 32000, 607, (12, 0), "575.51")
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NAME = re.compile(r"^svdq-(int4|fp4)_r(32|128)-(qwen-image(?:-edit(?:-2509)?)?)"
                  r"(?:-lightning(?:v\d\.\d)?-(4|8)steps(?:-251115)?)?\.safetensors$")


def test_families_and_variants() -> None:
    assert catalog.families() == ("qwen-image", "qwen-image-edit", "qwen-image-edit-2509")
    for family in catalog.families():
        assert catalog.variants(family)[0] == catalog.RECOMMENDED == "lightning-4step-r128"
        assert {"lightning-4step-r128", "lightning-4step-r32", "lightning-8step-r128", "standard-r128",
                "standard-r32"} <= set(catalog.variants(family))


@pytest.mark.parametrize("family", catalog.families())
@pytest.mark.parametrize("gpu", [AMPERE, BLACKWELL, None], ids=["ampere", "blackwell", "no-gpu"])
def test_every_variant_resolves_to_a_consistent_file(family: str, gpu: Gpu | None) -> None:
    for variant in catalog.variants(family):
        # Without GPU facts only a pinned precision resolves (the pinned int4 here).
        sel = catalog.resolve(family, variant, "auto" if gpu else "int4", gpu)
        precision, rank, stem, steps = NAME.match(sel.dit.filename).groups()  # type: ignore[union-attr]
        assert precision == sel.precision == ("fp4" if gpu is BLACKWELL else "int4")
        assert (int(rank), stem) == (sel.rank, family)
        folder = "lightning-251115/" if variant.startswith("lightning-251115-") else ""
        assert sel.dit.repo == f"nunchaku-ai/nunchaku-{family}" and sel.dit.path_in_repo == folder + sel.dit.filename
        assert sel.dit.folder == "diffusion_models" and sel.dit.approx_bytes > 11e9
        if variant.startswith("lightning"):
            assert int(steps) == sel.steps == int(variant.split("-")[-2][0]) and sel.cfg == 1.0
        else:
            assert steps is None and sel.steps >= 20 and sel.cfg > 1.0
        assert sel.text_encoder.folder == "text_encoders" and sel.vae.folder == "vae"
        assert sel.files == (sel.dit, sel.text_encoder, sel.vae)
        assert 13 < sel.vram_gb < 16 and bool(sel.notes) == (gpu is None)


def test_the_lightning_251115_set() -> None:
    """The 2509 repository's `lightning-251115/` folder (upstream's example workflow since 2025-11-16;
    checked 2026-12-07): int4/fp4 x r32/r128 x 4/8 steps, only in that family."""
    found = {v: (catalog.dit_file("qwen-image-edit-2509", v, p).path_in_repo) for v in
             catalog.variants("qwen-image-edit-2509") if v.startswith("lightning-251115") for p in ("int4",)}
    assert found == {f"lightning-251115-{s}step-r{r}": f"lightning-251115/svdq-int4_r{r}-qwen-image-edit-2509-"
                     f"lightning-{s}steps-251115.safetensors" for s in (4, 8) for r in (128, 32)}
    assert catalog.dit_file("qwen-image-edit-2509", "lightning-251115-8step-r32", "fp4").filename == \
        "svdq-fp4_r32-qwen-image-edit-2509-lightning-8steps-251115.safetensors"
    assert not any(v.startswith("lightning-251115") for v in catalog.variants("qwen-image"))
    with pytest.raises(PlanError, match="unknown variant 'lightning-251115-4step-r128' of model family qwen-image"):
        catalog.dit_file("qwen-image", "lightning-251115-4step-r128", "int4")


def test_exact_upstream_names() -> None:
    def name(family: str, variant: str, gpu: Gpu | None = AMPERE) -> str:
        return catalog.resolve(family, variant, "auto", gpu).dit.filename

    assert name("qwen-image-edit-2509", "lightning-4step-r128") == \
        "svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-4steps.safetensors"
    assert name("qwen-image-edit-2509", "lightning-8step-r128", BLACKWELL) == \
        "svdq-fp4_r128-qwen-image-edit-2509-lightningv2.0-8steps.safetensors"
    assert name("qwen-image-edit", "lightning-4step-r32") == "svdq-int4_r32-qwen-image-edit-lightningv1.0-4steps.safetensors"
    assert name("qwen-image", "lightning-8step-r128") == "svdq-int4_r128-qwen-image-lightningv1.1-8steps.safetensors"
    assert name("qwen-image", "standard-r32") == "svdq-int4_r32-qwen-image.safetensors"
    te = catalog.resolve("qwen-image", "standard-r32", "int4", None).text_encoder
    assert (te.repo, te.path_in_repo, te.filename) == (
        "Comfy-Org/Qwen-Image_ComfyUI", "split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
        "qwen_2.5_vl_7b_fp8_scaled.safetensors")
    assert te.dest("/srv/ComfyUI/models") == "/srv/ComfyUI/models/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"


def test_upstream_example_workflows_name_catalog_files() -> None:
    folder = FIXTURES / "comfyui-nunchaku-v1.1.0" / "example_workflows"
    known = {catalog.resolve(fam, var, p, gpu).dit.filename
             for fam in catalog.families() for var in catalog.variants(fam)
             for p, gpu in (("int4", AMPERE), ("fp4", BLACKWELL))}
    known |= {catalog.TEXT_ENCODER.filename, catalog.VAE.filename}
    seen = set()
    for path in folder.glob("nunchaku-qwen-image*.json"):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] in ("NunchakuQwenImageDiTLoader", "CLIPLoader", "VAELoader"):
                seen.add(node["widgets_values"][0])
    assert "svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-4steps.safetensors" in seen
    assert seen <= known, seen - known


def test_blackwell_refuses_int4_and_older_gpus_refuse_fp4() -> None:
    with pytest.raises(PlanError, match=r"RTX 5090 \(compute capability 12\.0\) runs nunchaku's fp4 models "
                                        r"only.*set it to fp4 or auto"):
        catalog.resolve("qwen-image-edit-2509", "lightning-4step-r128", "int4", BLACKWELL)
    with pytest.raises(PlanError, match=r"RTX 3090.*runs nunchaku's int4 models only.*set it to int4 or auto"):
        catalog.resolve("qwen-image-edit-2509", "lightning-4step-r128", "fp4", AMPERE)
    sel = catalog.resolve("qwen-image", "standard-r128", "fp4", None, gpu_error="nvidia-smi not found")
    assert sel.precision == "fp4" and "pinned fp4 files are used unchecked" in sel.notes[0]


def test_missing_gpu_facts_never_pick_a_precision() -> None:
    """Before: `auto` with no GPU silently meant int4, so a Blackwell host whose nvidia-smi broke
    after a driver update was planned onto other files and another workflow. Now: a plan error."""
    failed = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    with pytest.raises(PlanError) as err:
        catalog.resolve("qwen-image-edit-2509", "lightning-4step-r128", "auto", None, gpu_error=failed)
    assert str(err.value) == (f"no GPU facts this time ({failed}): model.precision auto cannot be decided; "
                              "repair the driver, or pin model.precision")


# nunchaku's check_hardware_compatibility, row by row; every other capability is refused.
ARCH_ROWS = [
    ((7, 5), "NVIDIA GeForce RTX 2080 Ti", "int4"), ((8, 0), "NVIDIA A100-SXM4-80GB", "int4"),
    ((8, 6), "NVIDIA GeForce RTX 3090", "int4"), ((8, 9), "NVIDIA GeForce RTX 4090", "int4"),
    ((12, 0), "NVIDIA GeForce RTX 5090", "fp4"), ((12, 1), "NVIDIA GB10", "fp4"),
    ((7, 0), "Tesla V100-SXM2-32GB", None), ((8, 7), "Orin", None), ((9, 0), "NVIDIA H100 80GB HBM3", None),
    ((9, 0), "NVIDIA H200", None), ((10, 0), "NVIDIA B200", None), ((10, 3), "NVIDIA B300", None),
    ((11, 0), "NVIDIA Thor", None), ((6, 1), "NVIDIA GeForce GTX 1080", None),
]


@pytest.mark.parametrize(("cc", "name", "runs"), ARCH_ROWS, ids=[f"sm{a}{b}" for (a, b), _, _ in ARCH_ROWS])
def test_architecture_table(cc: tuple[int, int], name: str, runs: str | None) -> None:
    gpu = Gpu(0, name, 81920, 80000, 1920, cc, "580.65")
    assert gpu.precision == runs
    if runs:
        assert catalog.resolve("qwen-image", "standard-r128", "auto", gpu, backend="1.2.1").precision == runs
        return
    for precision in ("auto", "int4", "fp4"):
        with pytest.raises(PlanError) as err:
            catalog.resolve("qwen-image", "standard-r128", precision, gpu, backend="1.2.1")
        # From Turing on, ComfyUI's own int8 convrot models (core v0.27.0, 2026-06-30) are the path offered.
        convrot = ("; ComfyUI's own int8 convrot models (core >= v0.27.0) run on it: a different stack, not a "
                   "nunchaku variant") if cc >= (7, 5) else ""
        assert str(err.value) == (f"{name} (compute capability {cc[0]}.{cc[1]}) has no 4-bit tensor cores "
                                  "nunchaku supports (int4 on 7.5, 8.0, 8.6, 8.9; fp4 on 12.0, 12.1): it "
                                  f"cannot run SVDQuant models on this GPU{convrot}")


def test_sm121_needs_backend_1_1() -> None:
    spark = Gpu(0, "NVIDIA GB10", 122000, 120000, 2000, (12, 1), "580.95")
    assert catalog.resolve("qwen-image", "standard-r128", "auto", spark, backend="1.1.0").precision == "fp4"
    with pytest.raises(PlanError, match=r"GB10 \(compute capability 12\.1\) needs nunchaku >= 1\.1\.0; "
                                        r"backend 1\.0\.1 takes fp4 on 12\.0 only"):
        catalog.resolve("qwen-image", "standard-r128", "auto", spark, backend="1.0.1")


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(PlanError) as err:
        catalog.resolve("qwen-image-edit-2509", "lightning-2step", "auto", AMPERE)
    assert "lightning-2step" in str(err.value) and "lightning-4step-r128, lightning-4step-r32" in str(err.value)
    assert "standard-r32" in err.value.alternatives and "\n" not in str(err.value)
    with pytest.raises(PlanError, match="unknown model family 'flux'.*qwen-image-edit-2509"):
        catalog.variants("flux")
    with pytest.raises(PlanError, match="unknown precision 'fp8'.*auto, int4, fp4"):
        catalog.resolve("qwen-image", "standard-r32", "fp8", AMPERE)


def test_candidate_files_cover_both_precisions_under_auto() -> None:
    auto = catalog.candidate_files("qwen-image-edit", "lightning-8step-r32", "auto")
    assert [f.filename for f in auto[:2]] == ["svdq-int4_r32-qwen-image-edit-lightningv1.0-8steps.safetensors",
                                              "svdq-fp4_r32-qwen-image-edit-lightningv1.0-8steps.safetensors"]
    assert auto[2:] == (catalog.TEXT_ENCODER, catalog.VAE)
    assert len(catalog.candidate_files("qwen-image-edit", "lightning-8step-r32", "int4")) == 3
