"""The real Nunchaku Qwen-Image model files: which file a family/variant/precision/GPU resolves to.

File names are the ones published in the Hugging Face repos `nunchaku-ai/nunchaku-qwen-image`,
`nunchaku-ai/nunchaku-qwen-image-edit` and `nunchaku-ai/nunchaku-qwen-image-edit-2509` (the org was
`nunchaku-tech` before; the Hub redirects the old name), and in `Comfy-Org/Qwen-Image_ComfyUI` for the
text encoder and VAE that every Qwen-Image workflow of ComfyUI-nunchaku v1.1.0 loads.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass

from provisioner.errors import PlanError
from provisioner.catalog.gpus import SUPPORTED, GpuInfo, capability_text, precision_for, refusal

PRECISIONS = ("auto", "int4", "fp4")
CHECKED = "2026-12-07"                # the day these facts were last checked against upstream
RECOMMENDED = "lightning-4step-r128"


@dataclass(frozen=True)
class ModelFile:
    """One file of a Hub repo and the ComfyUI `models/` subfolder it goes to."""

    repo: str
    path_in_repo: str
    filename: str                     # name under models/<folder>/ (what the workflow's loader names)
    folder: str                       # diffusion_models | text_encoders | vae
    revision: str | None = None       # a Hub commit; None: the repo's main, as first resolved (hub_cache.py)
    approx_bytes: int = 0             # as the Hub lists it; the exact size comes from hub.py at plan time

    def dest(self, models_dir: str) -> str:
        return posixpath.join(models_dir, self.folder, self.filename)


@dataclass(frozen=True)
class ModelSelection:
    family: str
    variant: str
    precision: str                    # "int4" | "fp4" (never "auto": resolved)
    steps: int
    rank: int
    cfg: float                        # the CFG upstream pairs with these steps (1.0 for Lightning)
    dit: ModelFile
    text_encoder: ModelFile
    vae: ModelFile
    vram_gb: float                    # estimated peak VRAM with cpu_offload disabled
    notes: tuple[str, ...] = ()       # why a precision was picked when it was not obvious

    @property
    def files(self) -> tuple[ModelFile, ModelFile, ModelFile]:
        return (self.dit, self.text_encoder, self.vae)

    @property
    def lightning(self) -> bool:
        return self.variant.startswith("lightning")


@dataclass(frozen=True)
class _Family:
    repo: str
    stem: str                         # the model part of `svdq-{precision}_r{rank}-{stem}...`
    lightning: dict[int, str]         # steps -> version tag in the file name
    standard_steps: int               # steps of upstream's example workflow for the standard model
    standard_cfg: float


_FAMILIES: dict[str, _Family] = {
    "qwen-image": _Family(
        "nunchaku-ai/nunchaku-qwen-image", "qwen-image",
        {4: "lightningv1.0-4steps", 8: "lightningv1.1-8steps"}, 20, 2.5),
    "qwen-image-edit": _Family(
        "nunchaku-ai/nunchaku-qwen-image-edit", "qwen-image-edit",
        {4: "lightningv1.0-4steps", 8: "lightningv1.0-8steps"}, 20, 2.5),
    "qwen-image-edit-2509": _Family(
        "nunchaku-ai/nunchaku-qwen-image-edit-2509", "qwen-image-edit-2509",
        {4: "lightningv2.0-4steps", 8: "lightningv2.0-8steps"}, 40, 4.0),
}

# variant -> (lightning steps or None for standard, rank). All three repos publish all six.
_VARIANTS: dict[str, tuple[int | None, int]] = {
    "lightning-4step-r128": (4, 128),
    "lightning-4step-r32": (4, 32),
    "lightning-8step-r128": (8, 128),
    "lightning-8step-r32": (8, 32),
    "standard-r128": (None, 128),
    "standard-r32": (None, 32),
}

# The second official Lightning set of the 2509 repository, in its folder `lightning-251115/` (listed
# in nunchaku-ai/nunchaku-qwen-image-edit-2509 on the Hub; upstream's own example workflow loads it
# since 2025-11-16; checked 2026-12-07): `svdq-{int4|fp4}_r{32|128}-qwen-image-edit-2509-lightning-
# {4|8}steps-251115.safetensors`. Under models/diffusion_models/ the file keeps its own name.
LIGHTNING_251115 = "lightning-251115"
_FAMILY_VARIANTS: dict[str, dict[str, tuple[int | None, int]]] = {
    "qwen-image-edit-2509": {f"{LIGHTNING_251115}-{steps}step-r{rank}": (steps, rank)
                             for steps in (4, 8) for rank in (128, 32)},
}

# Sizes as the Hub lists them (int4 r32 is an estimate between the listed r128 and fp4 r32 sizes).
_DIT_BYTES = {("int4", 128): 12_700_000_000, ("int4", 32): 11_500_000_000,
              ("fp4", 128): 13_100_000_000, ("fp4", 32): 11_900_000_000}
# Without offload the whole DiT sits in VRAM plus ~3 GiB of activations, latents and VAE work; this
# is what the plugin's own rule (offload below 15 GiB) is built around.
_ACTIVATIONS_GB = 3.0

_COMFY_REPO = "Comfy-Org/Qwen-Image_ComfyUI"
# A commit of that repo holding both files, pinned in several independent public download lists and
# Nix expressions (with the VAE's sha256 a70580f0...1d1f, 253806246 bytes). The nunchaku-ai repos
# have no commit established here: they follow their main, as first resolved (hub_cache.py), unless
# the profile pins model.revision.
_COMFY_COMMIT = "7beb7b647f04469fbe64ba8adc2bb0d7e5e9f73f"
TEXT_ENCODER = ModelFile(_COMFY_REPO, "split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
                         "qwen_2.5_vl_7b_fp8_scaled.safetensors", "text_encoders", _COMFY_COMMIT,
                         approx_bytes=9_384_670_680)
VAE = ModelFile(_COMFY_REPO, "split_files/vae/qwen_image_vae.safetensors",
                "qwen_image_vae.safetensors", "vae", _COMFY_COMMIT, approx_bytes=253_806_246)
PINNED_REVISIONS = {_COMFY_REPO: _COMFY_COMMIT}     # repo -> commit the catalog pins


# What a nunchaku SVDQuant file says of itself: its safetensors header's `__metadata__` holds
# `quantization_config`, a JSON string (nunchaku merge_safetensors.py, v1.2.1 L117-150, writes it;
# ComfyUI-nunchaku's Qwen-Image loader reads weight.dtype and rank, rank 32 when absent, and refuses a
# file whose dtype the GPU cannot run). fp4 files are NVFP4: e2m1 weights in groups of 16.
WEIGHT_DTYPES = {"int4": "int4", "fp4": "fp4_e2m1_all"}
DEFAULT_RANK = 32


def quantization_config(precision: str, rank: int) -> dict[str, object]:
    """The `quantization_config` upstream writes for an SVDQuant file of this precision and rank."""
    if precision == "fp4":
        weight = {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16}
        activation = {"dtype": "fp4_e2m1_all", "scale_dtype": "fp8_e4m3_nan", "group_size": 16}
    else:
        weight = {"dtype": "int4", "scale_dtype": None, "group_size": 64}
        activation = dict(weight)
    return {"method": "svdquant", "weight": weight, "activation": activation, "rank": rank}


def declared(metadata: Mapping[str, str]) -> tuple[str, int] | str:
    """(weight dtype, rank) a file's header declares, or why it declares none."""
    text = metadata.get("quantization_config")
    if text is None:
        return "its safetensors header has no quantization_config: not a nunchaku SVDQuant file"
    try:
        config = json.loads(text)
        dtype, rank = config["weight"]["dtype"], int(config.get("rank", DEFAULT_RANK))
    except (ValueError, TypeError, KeyError, AttributeError):
        return "its header's quantization_config cannot be read (no weight.dtype)"
    return str(dtype), rank


def header_mismatch(metadata: Mapping[str, str], precision: str, rank: int) -> str | None:
    """Why a DiT file is not the `precision`/`rank` file its name promises, or None."""
    found = declared(metadata)
    if isinstance(found, str):
        return found
    dtype, got_rank = found
    if (dtype, got_rank) == (WEIGHT_DTYPES[precision], rank):
        return None
    return (f"its header declares {dtype} rank {got_rank} weights (quantization_config), not "
            f"{WEIGHT_DTYPES[precision]} rank {rank}")


def official_repo(family: str) -> str:
    """The nunchaku-ai repository of a family's DiT files; another one is third-party weights."""
    return _family(family).repo


def families() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def _variants_of(family: str) -> dict[str, tuple[int | None, int]]:
    return {**_VARIANTS, **_FAMILY_VARIANTS.get(family, {})}


def variants(family: str) -> tuple[str, ...]:
    _family(family)
    return tuple(_variants_of(family))


def rank_of(variant: str) -> int:
    """The SVDQuant rank of a variant's files (`lightning-4step-r128` -> 128)."""
    known = {name: spec for table in (_VARIANTS, *_FAMILY_VARIANTS.values()) for name, spec in table.items()}
    if variant not in known:
        raise PlanError(f"unknown variant {variant!r} (model.variant)", tuple(known))
    return known[variant][1]


def _family(family: str) -> _Family:
    if family not in _FAMILIES:
        raise PlanError(f"unknown model family {family!r} (model.family)", tuple(_FAMILIES))
    return _FAMILIES[family]


def dit_file(family: str, variant: str, precision: str) -> ModelFile:
    """The DiT file of one family/variant at a concrete precision (`int4` or `fp4`)."""
    fam = _family(family)
    table = _variants_of(family)
    if variant not in table:
        raise PlanError(f"unknown variant {variant!r} of model family {family} (model.variant)", tuple(table))
    steps, rank = table[variant]
    if variant.startswith(LIGHTNING_251115):
        name = f"svdq-{precision}_r{rank}-{fam.stem}-lightning-{steps}steps-251115.safetensors"
        return ModelFile(fam.repo, f"{LIGHTNING_251115}/{name}", name, "diffusion_models",
                         approx_bytes=_DIT_BYTES[(precision, rank)])
    suffix = f"-{fam.lightning[steps]}" if steps else ""
    name = f"svdq-{precision}_r{rank}-{fam.stem}{suffix}.safetensors"
    return ModelFile(fam.repo, name, name, "diffusion_models", approx_bytes=_DIT_BYTES[(precision, rank)])


def candidate_files(family: str, variant: str, precision: str) -> tuple[ModelFile, ...]:
    """Every file a host could need before its GPU is known (both precisions under `auto`)."""
    precs = ("int4", "fp4") if precision == "auto" else (precision,)
    return tuple(dit_file(family, variant, p) for p in precs) + (TEXT_ENCODER, VAE)


def _precision(precision: str, gpu: GpuInfo | None, gpu_error: str | None,
               backend: str | None) -> tuple[str, tuple[str, ...]]:
    if precision not in PRECISIONS:
        raise PlanError(f"unknown precision {precision!r} (model.precision)", PRECISIONS)
    if gpu is None:
        why = gpu_error or "nvidia-smi listed no GPU"
        if precision == "auto":
            # Never guess: a driver update that broke nvidia-smi must not switch a host's files.
            raise PlanError(f"no GPU facts this time ({why}): model.precision auto cannot be decided; "
                            "repair the driver, or pin model.precision")
        return precision, (f"no GPU facts this time ({why}): the pinned {precision} files are "
                           "used unchecked",)
    reason = refusal(gpu, backend)
    if reason:
        raise PlanError(reason)
    runs = precision_for(gpu.compute_capability, backend)
    if precision in ("auto", runs):
        return str(runs), ()
    raise PlanError(f"{gpu.name} (compute capability {capability_text(gpu.compute_capability)}) runs "
                    f"nunchaku's {runs} models only ({SUPPORTED}); model.precision {precision} cannot "
                    f"load there: set it to {runs} or auto")


def resolve(family: str, variant: str, precision: str, gpu: GpuInfo | None, *,
            gpu_error: str | None = None, backend: str | None = None) -> ModelSelection:
    """Pick the exact files for this GPU (`gpu_error`: why none was seen; `backend`: the nunchaku
    version, whose GPU table differs in 1.0.1). Raises a one-line `PlanError` for a GPU nunchaku
    cannot run, a precision it cannot load, missing GPU facts under `auto`, or an unknown name
    (listing the valid choices)."""
    dit_file(family, variant, "int4")  # validates family and variant before precision
    concrete, notes = _precision(precision, gpu, gpu_error, backend)
    fam = _FAMILIES[family]
    steps, rank = _variants_of(family)[variant]
    dit = dit_file(family, variant, concrete)
    return ModelSelection(
        family=family, variant=variant, precision=concrete,
        steps=steps or fam.standard_steps, rank=rank, cfg=1.0 if steps else fam.standard_cfg,
        dit=dit, text_encoder=TEXT_ENCODER, vae=VAE,
        vram_gb=round(dit.approx_bytes / 2**30 + _ACTIVATIONS_GB, 1), notes=notes,
    )


@dataclass(frozen=True)
class NodeRequirement:
    """A node class a family's workflows need ComfyUI to register, and the inputs they set on it
    that the class must declare (an older plugin's loader lacks them and rejects the workflow)."""

    name: str
    inputs: tuple[str, ...] = ()
    plugin: bool = True               # registered by ComfyUI-nunchaku (only when its backend imports)


# ComfyUI-nunchaku v1.0+ (nodes/models/qwenimage.py): one DiT loader serves every Qwen-Image family;
# `cpu_offload` is the input the workflows set (optional num_blocks_on_gpu / use_pin_memory since v1.0).
_QWEN_DIT_LOADER = NodeRequirement("NunchakuQwenImageDiTLoader", ("model_name", "cpu_offload"))
_NODES: dict[str, tuple[NodeRequirement, ...]] = {family: (_QWEN_DIT_LOADER,) for family in _FAMILIES}


def required_nodes(family: str) -> tuple[NodeRequirement, ...]:
    """The plugin's node classes a workflow of this model family cannot run without."""
    _family(family)
    return _NODES[family]
