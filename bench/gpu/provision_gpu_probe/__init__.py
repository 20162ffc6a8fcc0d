"""A ComfyUI node pack for provision's run on a real GPU: nodes whose figures are known in advance,
so verification's timings and VRAM peak can be held against what they did.

ProvisionGpuProbe holds `gib` GiB of VRAM, keeps the GPU busy with bf16 matrix products for
`seconds`, then returns a picture drawn from `seed` (noise over a ramp: neither black nor flat). It
is never cached (IS_CHANGED), so every verification run does the work.

ProvisionGpuSampler does the same work but takes its seed as SamplerCustom does, in an input named
`noise_seed`, and is cached by ComfyUI like any sampler: the same inputs again are answered from
ComfyUI's cache without running it. So it shows whether verification really gives every warm run
its own seed, whatever the sampler's class, and whether it notices a run served from the cache.
Written for this project; not upstream code.
"""

import time

import torch

SIDE = 8192                       # one bf16 product: 2 * 8192^3 flops, ~1.4 ms on an H200


def _inputs(seed_name):
    return {"required": {
        seed_name: ("INT", {"default": 0, "min": 0, "max": 2**63 - 1}),
        "gib": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 128.0, "step": 0.5}),
        "seconds": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 600.0, "step": 0.1}),
        "width": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8}),
        "height": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8}),
    }}


def _work(name, seed, gib, seconds, width, height):
    # The GPU run is on CUDA; the CPU is only for a dry run of the script on a machine without one.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    held = torch.ones(int(gib * 2**30), dtype=torch.uint8, device=device)
    a = torch.randn(SIDE, SIDE, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started, products = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        c = a @ b
        products += 1
        if products % 16 == 0:
            sync()
    sync()
    busy = time.perf_counter() - started
    noise = torch.rand((1, height, width, 3), generator=torch.Generator(device).manual_seed(seed),
                       device=device)
    ramp = torch.linspace(0, 1, width, device=device).view(1, 1, width, 1)
    image = (0.5 * noise + 0.5 * ramp).clamp(0, 1).cpu()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    del held, a, b
    if products:
        del c
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"{name}: seed {seed}, held {gib:g} GiB, {products} bf16 {SIDE}^3 products in {busy:.3f} s "
          f"({2 * SIDE**3 * products / busy / 1e12:.0f} TFLOP/s), torch peak {peak:.2f} GiB", flush=True)
    return (image,)


class ProvisionGpuProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return _inputs("seed")

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "provision"

    @classmethod
    def IS_CHANGED(cls, **inputs):
        return float("nan")       # never equal to itself: ComfyUI never serves this node from cache

    def run(self, seed, gib, seconds, width, height):
        return _work("ProvisionGpuProbe", seed, gib, seconds, width, height)


class ProvisionGpuSampler:
    """Cached by ComfyUI as any node is (no IS_CHANGED): by its inputs."""

    @classmethod
    def INPUT_TYPES(cls):
        return _inputs("noise_seed")

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "provision"

    def run(self, noise_seed, gib, seconds, width, height):
        return _work("ProvisionGpuSampler", noise_seed, gib, seconds, width, height)


NODE_CLASS_MAPPINGS = {"ProvisionGpuProbe": ProvisionGpuProbe, "ProvisionGpuSampler": ProvisionGpuSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"ProvisionGpuProbe": "provision GPU probe",
                              "ProvisionGpuSampler": "provision GPU sampler (noise_seed, cached)"}
