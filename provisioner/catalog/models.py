"""The real Nunchaku Qwen-Image model files: which file a family/variant/precision/GPU resolves to.

File names are the ones published in the Hugging Face repos `nunchaku-ai/nunchaku-qwen-image`,
`nunchaku-ai/nunchaku-qwen-image-edit` and `nunchaku-ai/nunchaku-qwen-image-edit-2509` (the org was
`nunchaku-tech` before; the Hub redirects the old name), and in `Comfy-Org/Qwen-Image_ComfyUI` for the
text encoder and VAE that every Qwen-Image workflow of ComfyUI-nunchaku v1.1.0 loads.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from provisioner.errors import PlanError
from provisioner.catalog.gpus import GpuInfo, auto_precision, is_blackwell

PRECISIONS = ("auto", "int4", "fp4")
RECOMMENDED = "lightning-4step-r128"


@dataclass(frozen=True)
class ModelFile:
    """One file of a Hub repo and the ComfyUI `models/` subfolder it goes to."""

    repo: str
    path_in_repo: str
    filename: str                     # name under models/<folder>/ (what the workflow's loader names)
    folder: str                       # diffusion_models | text_encoders | vae
    revision: str = "main"
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

# Sizes as the Hub lists them (int4 r32 is an estimate between the listed r128 and fp4 r32 sizes).
_DIT_BYTES = {("int4", 128): 12_700_000_000, ("int4", 32): 11_500_000_000,
              ("fp4", 128): 13_100_000_000, ("fp4", 32): 11_900_000_000}
# Without offload the whole DiT sits in VRAM plus ~3 GiB of activations, latents and VAE work; this
# is what the plugin's own rule (offload below 15 GiB) is built around.
_ACTIVATIONS_GB = 3.0

_COMFY_REPO = "Comfy-Org/Qwen-Image_ComfyUI"
TEXT_ENCODER = ModelFile(_COMFY_REPO, "split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
                         "qwen_2.5_vl_7b_fp8_scaled.safetensors", "text_encoders", approx_bytes=9_380_000_000)
VAE = ModelFile(_COMFY_REPO, "split_files/vae/qwen_image_vae.safetensors",
                "qwen_image_vae.safetensors", "vae", approx_bytes=254_000_000)


def families() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def variants(family: str) -> tuple[str, ...]:
    _family(family)
    return tuple(_VARIANTS)


def _family(family: str) -> _Family:
    if family not in _FAMILIES:
        raise PlanError(f"unknown model family {family!r} (model.family)", tuple(_FAMILIES))
    return _FAMILIES[family]


def dit_file(family: str, variant: str, precision: str) -> ModelFile:
    """The DiT file of one family/variant at a concrete precision (`int4` or `fp4`)."""
    fam = _family(family)
    if variant not in _VARIANTS:
        raise PlanError(f"unknown variant {variant!r} of model family {family} (model.variant)",
                        tuple(_VARIANTS))
    steps, rank = _VARIANTS[variant]
    suffix = f"-{fam.lightning[steps]}" if steps else ""
    name = f"svdq-{precision}_r{rank}-{fam.stem}{suffix}.safetensors"
    return ModelFile(fam.repo, name, name, "diffusion_models", approx_bytes=_DIT_BYTES[(precision, rank)])


def candidate_files(family: str, variant: str, precision: str) -> tuple[ModelFile, ...]:
    """Every file a host could need before its GPU is known (both precisions under `auto`)."""
    precs = ("int4", "fp4") if precision == "auto" else (precision,)
    return tuple(dit_file(family, variant, p) for p in precs) + (TEXT_ENCODER, VAE)


def _precision(precision: str, gpu: GpuInfo | None) -> tuple[str, tuple[str, ...]]:
    if precision not in PRECISIONS:
        raise PlanError(f"unknown precision {precision!r} (model.precision)", PRECISIONS)
    if gpu is None:
        if precision == "auto":
            return "int4", ("no GPU seen on the host: chose the int4 files (set model.precision to pin it)",)
        return precision, ()
    cc = f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}"
    if precision == "auto":
        return auto_precision(gpu.compute_capability), ()
    if precision == "int4" and is_blackwell(gpu.compute_capability):
        raise PlanError(f"{gpu.name} (compute capability {cc}) is Blackwell: Nunchaku's INT4 kernels do not "
                        "run there; set model.precision to fp4 or auto")
    if precision == "fp4" and not is_blackwell(gpu.compute_capability):
        raise PlanError(f"{gpu.name} (compute capability {cc}) cannot run Nunchaku's FP4 kernels (Blackwell "
                        "only); set model.precision to int4 or auto")
    return precision, ()


def resolve(family: str, variant: str, precision: str, gpu: GpuInfo | None) -> ModelSelection:
    """Pick the exact files. Raises `PlanError` listing the valid choices for any unknown name."""
    dit_file(family, variant, "int4")  # validates family and variant before precision
    concrete, notes = _precision(precision, gpu)
    fam = _FAMILIES[family]
    steps, rank = _VARIANTS[variant]
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
