"""The stand-in ComfyUI's executor: runs a validated graph node by node like ComfyUI, minus the maths.

Sizes flow through the graph as ComfyUI's tensors would (latents are 1/8 of the pixels), samplers
sleep (cold model load, then per-step progress), SaveImage writes a real PNG (stdlib only). Node
outputs are cached by input signature, so an identical prompt comes back at once from cache, as in ComfyUI.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.sandbox import comfyui_png as png

Send = Callable[[str, dict[str, Any]], None]
SAMPLERS = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed"}
LOADERS = {"NunchakuQwenImageDiTLoader": "model_name", "UNETLoader": "unet_name",
           "CLIPLoader": "clip_name", "VAELoader": "vae_name"}
SAFETENSORS_HEADER_MAX = 100 * 2**20        # the safetensors crate's own limit on the JSON header
# What torch raises once a kernel wrote out of bounds; the CUDA context is then unusable, so every
# later CUDA call of the process fails the same way until it restarts.
ILLEGAL_ACCESS = ("CUDA error: an illegal memory access was encountered\n"
                  "CUDA kernel errors might be asynchronously reported at some other API call, so the "
                  "stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
                  "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")


class NodeFailed(Exception):
    """A node raised while executing: becomes `execution_error`, as in ComfyUI."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type
        self.node_id, self.node_type = "", ""                      # set by Executor.run
        self.executed: list[str] = []


class Interrupted(NodeFailed):
    """POST /interrupt reached the running prompt: becomes `execution_interrupted`."""

    def __init__(self) -> None:
        super().__init__("comfy.model_management.InterruptProcessingException", "")


@dataclass
class Gpu:
    """What the stand-in pretends the GPU holds; `on_change(mib)` mirrors it (the nvidia-smi shim file)."""

    total_mib: int
    idle_mib: int
    peak_mib: int
    on_change: Callable[[int], None]
    used_mib: int = 0
    loaded: set[str] = field(default_factory=set)

    def set(self, mib: int) -> None:
        self.used_mib = mib
        self.on_change(mib)

    @property
    def resident_mib(self) -> int:
        """Weights stay after a run; activations (an eighth, at most 1 GiB) are freed."""
        return self.peak_mib - min(1024, self.peak_mib // 8)


def check_safetensors(path: Path) -> None:
    """Open the file's header the way safetensors does; a placeholder or truncated file fails."""
    with path.open("rb") as fh:
        head = fh.read(8)
    size = path.stat().st_size
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    why = ("header too small" if n < 0 else "header too large" if n > SAFETENSORS_HEADER_MAX
           else "invalid header length" if n + 8 > size else None)
    if why:
        raise NodeFailed("safetensors._safetensors_rust.SafetensorError",
                         f"Error while deserializing header: {why}\n")


@dataclass
class Executor:
    root: Path                      # holds input/ and output/
    gpu: Gpu
    image_mode: str
    cold_s: float
    warm_s: float
    models_dir: Path | None = None
    check_models: bool = False
    log: Callable[[str], None] = print
    device: str = ""                    # this GPU: its pictures differ from another's by rounding
    cache: dict[str, tuple[Any, dict[str, Any] | None]] = field(default_factory=dict)
    poison_after: int | None = None     # samplings that work before an illegal memory access
    loader_error: tuple[str, str] | None = None   # (type, message) the Nunchaku DiT loader raises when run
    interrupt: threading.Event = field(default_factory=threading.Event)
    samplings: int = 0
    poisoned: bool = False

    def signature(self, graph: dict[str, Any], node_id: str, memo: dict[str, str]) -> str:
        if node_id not in memo:
            node = graph[node_id]
            parts = {k: (self.signature(graph, v[0], memo), v[1]) if isinstance(v, list) else v
                     for k, v in node.get("inputs", {}).items()}
            raw = json.dumps([node["class_type"], parts], sort_keys=True, default=str)
            memo[node_id] = hashlib.sha256(raw.encode()).hexdigest()
        return memo[node_id]

    def order(self, graph: dict[str, Any], outputs: list[str]) -> list[str]:
        """Depth-first: every node after the nodes it reads, only those the outputs need."""
        done: list[str] = []

        def visit(node_id: str) -> None:
            if node_id in done:
                return
            for value in graph[node_id].get("inputs", {}).values():
                if isinstance(value, list) and len(value) == 2 and value[0] in graph:
                    visit(value[0])
            done.append(node_id)

        for out in outputs:
            visit(out)
        return done

    def run(self, prompt_id: str, graph: dict[str, Any], outputs: list[str], send: Send
            ) -> dict[str, dict[str, Any]]:
        """Execute; returns ui outputs by node id. `send(event, data)` reaches the client."""
        memo: dict[str, str] = {}
        order = self.order(graph, outputs)
        cached = [n for n in order if self.signature(graph, n, memo) in self.cache]
        send("execution_cached", {"nodes": cached, "prompt_id": prompt_id,
                                  "timestamp": int(time.time() * 1000)})
        values: dict[str, Any] = {}
        ui: dict[str, dict[str, Any]] = {}
        for node_id in order:
            sig = memo[node_id]
            if sig in self.cache:
                values[node_id], out = self.cache[sig]
            else:
                send("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})
                try:
                    values[node_id], out = self.node(prompt_id, graph, node_id, values, send)
                except NodeFailed as err:
                    err.node_id, err.node_type = node_id, graph[node_id]["class_type"]
                    err.executed = [n for n in order[:order.index(node_id)] if n not in cached]
                    raise
                self.cache[sig] = (values[node_id], out)
                if out is not None:
                    send("executed", {"node": node_id, "display_node": node_id, "output": out,
                                      "prompt_id": prompt_id})
            if out is not None:
                ui[node_id] = out
        return ui

    def node(self, prompt_id: str, graph: dict[str, Any], node_id: str, values: dict[str, Any],
             send: Send) -> tuple[Any, dict[str, Any] | None]:
        cls, inputs = graph[node_id]["class_type"], graph[node_id].get("inputs", {})
        arg = {k: values[v[0]] if isinstance(v, list) else v for k, v in inputs.items()}
        if cls == "NunchakuQwenImageDiTLoader" and self.loader_error:
            raise NodeFailed(*self.loader_error)   # the plugin builds the core's classes only when it runs
        if cls in LOADERS:
            name = str(arg[LOADERS[cls]])
            if self.check_models and self.models_dir is not None:
                hits = [p for p in self.models_dir.rglob(name) if p.is_file()]
                if hits:
                    check_safetensors(hits[0])
            return ("model", name), None
        if cls == "LoadImage":
            found = png.size((self.root / "input" / str(arg["image"])).read_bytes())
            if found is None:                 # the stand-in reads PNG only; ComfyUI's PIL says this
                raise NodeFailed("PIL.UnidentifiedImageError",
                                 f"cannot identify image file '{arg['image']}'")
            return ("image", *found), None
        if cls in ("EmptySD3LatentImage", "EmptyLatentImage"):
            return ("latent", int(arg["width"]) // 8, int(arg["height"]) // 8), None
        if cls in ("EmptyImage", "ImageScale"):
            return ("image", int(arg["width"]), int(arg["height"])), None
        if cls == "ImageScaleToTotalPixels":
            _, w, h = arg["image"]
            scale = math.sqrt(float(arg["megapixels"]) * 1024 * 1024 / (w * h))
            return ("image", round(w * scale), round(h * scale)), None
        if cls == "VAEEncode":
            return ("latent", arg["pixels"][1] // 8, arg["pixels"][2] // 8), None
        if cls == "VAEDecode":
            latent = arg["samples"]
            return ("image", latent[1] * 8, latent[2] * 8, *latent[3:]), None   # keeps the seed
        if cls in SAMPLERS:
            self.sample(prompt_id, node_id, str(arg["model"][1]), int(arg.get("steps", 4)), send)
            _, w, h = arg["latent_image"]
            return ("latent", w, h, int(arg[SAMPLERS[cls]])), None
        if cls in ("SaveImage", "PreviewImage"):
            return None, {"images": [self.save(graph, arg, cls)]}
        linked = [values[v[0]] for v in inputs.values() if isinstance(v, list)]
        return (linked[0] if linked else None), None

    def _pause(self, seconds: float) -> None:
        """Time passing on the GPU; an interrupt lands at the next check, as in ComfyUI."""
        if self.interrupt.wait(seconds):
            raise Interrupted()

    def sample(self, prompt_id: str, node_id: str, model: str, steps: int, send: Send) -> None:
        self.samplings += 1
        if self.poisoned or (self.poison_after is not None and self.samplings > self.poison_after):
            self.poisoned = True
            raise NodeFailed("RuntimeError", ILLEGAL_ACCESS)
        if model not in self.gpu.loaded:                  # the first run pays the model load
            self.gpu.set(self.gpu.peak_mib)               # weights stream in while it loads
            self._pause(self.cold_s)
            self.gpu.loaded.add(model)
            self.log(f"loaded completely; {self.gpu.total_mib - self.gpu.idle_mib:.2f} MB usable, "
                     f"{self.gpu.resident_mib:.2f} MB loaded, full load: True")
        self.gpu.set(self.gpu.peak_mib)
        for step in range(1, steps + 1):
            self._pause(self.warm_s / steps)
            progress = {"value": step, "max": steps, "prompt_id": prompt_id, "node": node_id}
            send("progress", progress)
            send("progress_state", {"prompt_id": prompt_id, "nodes": {node_id: {
                **progress, "state": "running" if step < steps else "finished", "node_id": node_id,
                "display_node_id": node_id, "parent_node_id": None, "real_node_id": node_id}}})
        self.gpu.set(self.gpu.resident_mib)

    def save(self, graph: dict[str, Any], arg: dict[str, Any], cls: str) -> dict[str, str]:
        """Write the PNG as SaveImage does: prefix may hold a subfolder, counter 00001 upward."""
        kind = "output" if cls == "SaveImage" else "temp"
        prefix = str(arg.get("filename_prefix", "ComfyUI" if kind == "output" else "ComfyUI_temp"))
        sub, _, base = prefix.rpartition("/")
        folder = self.root / kind / sub
        folder.mkdir(parents=True, exist_ok=True)
        taken = [int(p.name[len(base) + 1:len(base) + 6]) for p in folder.glob(f"{base}_?????_.png")
                 if p.name[len(base) + 1:len(base) + 6].isdigit()]
        name = f"{base}_{max(taken, default=0) + 1:05d}_.png"
        image = arg["images"]
        w, h = (image[1], image[2]) if isinstance(image, tuple) else (64, 64)
        seed = image[3] if isinstance(image, tuple) and len(image) > 3 else 0
        (folder / name).write_bytes(png.picture(w, h, seed, self.image_mode, {"prompt": json.dumps(graph)},
                                                     self.device))
        return {"filename": name, "subfolder": sub, "type": kind}
