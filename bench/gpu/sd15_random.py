"""A random-weight checkpoint shaped like Stable Diffusion 1.5, built from ComfyUI's own classes.

No model weights reach the GPU machine, so the SamplerCustom workflow of bench/gpu/run.py samples
this instead: ComfyUI's SD15 UNet (its model detection's own SD15 config), its CLIP-L text model
(comfy/sd1_clip.py) and its AutoencoderKL (comfy/ldm/models/autoencoder.py, the SD1 VAE's
config), with every weight drawn from a normal distribution (std --std, biases 0, the norms' scales
1), in fp16, saved as ComfyUI's CheckpointSave would save it: `model.diffusion_model.`,
`cond_stage_model.transformer.text_model.` and `first_stage_model.` keys. The images it makes are
noise by design, but they come from a full SD1.5-sized sampling pass, and a different seed gives a
different image. Then ComfyUI's own loader reads the file back: it must detect SD15 and report no
missing key.

Run with ComfyUI's Python:

    python bench/gpu/sd15_random.py --comfyui ROOT --out ROOT/models/checkpoints/NAME.safetensors
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

# The UNet config ComfyUI's model detection gives a real SD1.5 checkpoint (the SD15 entry of
# comfy/model_detection.py's table of known UNets, v0.3.64), `dtype` set at build time.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# The SD1/SD2 VAE's config (comfy/sd.py, VAE's default branch).
SD1_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
           "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
UNET_PREFIX = "model.diffusion_model."


def randomize(module, std: float, generator) -> int:
    """Every parameter drawn afresh: norms' scales 1 and shifts 0, biases 0, the rest N(0, std)."""
    import torch

    count = 0
    with torch.no_grad():
        for sub in module.modules():
            norm = isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for name, param in sub.named_parameters(recurse=False):
                if norm:
                    param.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    param.zero_()
                else:
                    noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)
                    param.copy_(noise * std)
                count += param.numel()
    return count


def build(device: str, std: float, seed: int) -> tuple[dict, dict]:
    import torch

    import comfy.ldm.models.autoencoder
    import comfy.model_detection
    import comfy.sd1_clip

    dtype = torch.float16
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        model_config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET))
        if type(model_config).__name__ != "SD15":
            raise SystemExit(f"ComfyUI took the SD15 UNet config for {type(model_config).__name__}")
        model_config.set_inference_dtype(dtype, None)
        model = model_config.get_model({}, UNET_PREFIX, device=device)         # model_base.BaseModel
        clip = comfy.sd1_clip.SD1ClipModel(device=device, dtype=dtype)          # .clip_l.transformer: CLIP-L
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD1_VAE), embed_dim=4).to(device, dtype)
    counts = {"unet": randomize(model.diffusion_model, std, generator),
              "clip": randomize(clip, std, generator), "vae": randomize(vae, std, generator)}
    # As CheckpointSave writes a checkpoint: the model config's own renaming of each part.
    sd = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    sd = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous() for k, v in sd.items()}
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f"non-finite tensors: {bad[:5]}")
    return {k: v.cpu() for k, v in sd.items()}, counts


def check(path: Path) -> list[str]:
    """ComfyUI's own loader on the file: what it detected and what it said was missing or left over."""
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path))
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if any(w in text.lower() for w in ("missing", "unexpected", "left over", "leftover")):
                said.append(f"{record.levelname}: {text[:300]}")

    keep = Keep(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(keep)
    root.setLevel(logging.DEBUG)
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    finally:
        root.removeHandler(keep)
        root.setLevel(logging.INFO)
    lines = [f"ComfyUI's detection: unet prefix {prefix!r}, model config {type(config).__name__}",
             f"ComfyUI's loader: model {type(model.model).__name__} ({model.model.model_type.name}), "
             f"clip {type(clip.cond_stage_model).__name__}, vae {type(vae.first_stage_model).__name__}"]
    lines += said or ["ComfyUI's loader reported no missing, unexpected or left-over key"]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", type=Path, required=True, help="ComfyUI's root (its comfy package is used)")
    ap.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-check", action="store_true", help="skip reading it back with ComfyUI's loader")
    args = ap.parse_args()
    sys.path.insert(0, str(args.comfyui.resolve()))

    import comfy.sd  # noqa: F401  (first, as ComfyUI's nodes.py imports it: the rest in its order)
    import comfy.utils

    started = time.monotonic()
    sd, counts = build(args.device, args.std, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file(sd, str(args.out), metadata={"provision": "random weights, SD1.5-shaped"})
    size = args.out.stat().st_size
    parts = {p: sum(1 for k in sd if k.startswith(p)) for p in
             (UNET_PREFIX, "cond_stage_model.transformer.text_model.", "first_stage_model.")}
    print(f"{args.out.name}: {len(sd)} tensors ({', '.join(f'{n} {p}*' for p, n in parts.items())}), "
          f"{sum(counts.values()) / 1e6:.0f} M parameters (UNet {counts['unet'] / 1e6:.0f} M, CLIP-L "
          f"{counts['clip'] / 1e6:.0f} M, VAE {counts['vae'] / 1e6:.0f} M), fp16, {size / 2**30:.2f} GiB, "
          f"std {args.std:g}, built and saved in {time.monotonic() - started:.1f} s", flush=True)
    del sd
    if not args.no_check:
        started = time.monotonic()
        for line in check(args.out):
            print(line, flush=True)
        print(f"read back in {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
