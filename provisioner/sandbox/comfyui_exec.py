"""The stand-in ComfyUI's executor: runs a validated graph node by node like ComfyUI, minus the maths.

Sizes flow through the graph as ComfyUI's tensors would (latents are 1/8 of the pixels), samplers
sleep (cold model load, then per-step progress), SaveImage writes a real PNG (stdlib only). Node
outputs are cached by input signature, so an identical prompt comes back at once from cache, as in ComfyUI.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.sandbox import comfyui_png as png

Send = Callable[[str, dict[str, Any]], None]
SAMPLERS = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed", "SamplerCustom": "noise_seed"}
LOADERS = {"NunchakuQwenImageDiTLoader": "model_name", "UNETLoader": "unet_name",
           "CLIPLoader": "clip_name", "VAELoader": "vae_name"}
SAFETENSORS_HEADER_MAX = 100 * 2**20        # the safetensors crate's own limit on the JSON header
# What torch raises once a kernel wrote out of bounds; the CUDA context is then unusable, so every
# later CUDA call of the process fails the same way until it restarts.
# What image nodes cost here, per megapixel of their picture: ComfyUI on this CPU took 1.6 s to make
# an EmptyImage of 2 x 4096 x 4096 and 0.2 to 0.6 s to invert it (SaveImage's cost is our own PNG
# encoding's). So a big model-free graph runs long enough to be queued behind, or interrupted.
IMAGE_S_PER_MP = {"EmptyImage": 0.04, "ImageInvert": 0.01}
ILLEGAL_ACCESS = ("CUDA error: an illegal memory access was encountered\n"
                  "CUDA kernel errors might be asynchronously reported at some other API call, so the "
                  "stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
                  "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")


class NodeFailed(Exception):
    """A node raised while executing: becomes `execution_error`, as in ComfyUI. The message is the
    exception's own text (ComfyUI appends a line of tips, empty but for out-of-memory errors)."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type
        self.node_id, self.node_type = "", ""                      # set by Executor.run
        self.executed: list[str] = []
        self.inputs: dict[str, list[Any]] = {}


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
    # The executor and /free both set it: one at a time, so the file ends with the last value set.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def set(self, mib: int) -> None:
        with self._lock:
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
                         f"Error while deserializing header: {why}")


def _megapixels(image: Any) -> float:
    """The pixels of an image value (`("image", w, h, seed, batch)`), in millions."""
    if not isinstance(image, tuple) or len(image) < 3 or image[0] != "image":
        return 0.0
    return image[1] * image[2] * (image[4] if len(image) > 4 else 1) / 1e6


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


class Progress:
    """ComfyUI's progress registry for one prompt: every node it started, in order, as it sends
    them in each `progress_state` message; a sampler's steps also as `progress`."""

    def __init__(self, prompt_id: str, send: Send) -> None:
        self.prompt_id, self.send = prompt_id, send
        self.nodes: dict[str, dict[str, Any]] = {}

    def _state(self, node_id: str, value: float, most: float, state: str) -> None:
        self.nodes[node_id] = {"value": value, "max": most, "state": state, "node_id": node_id,
                               "prompt_id": self.prompt_id, "display_node_id": node_id,
                               "parent_node_id": None, "real_node_id": node_id}
        self.send("progress_state", {"prompt_id": self.prompt_id, "nodes": copy.deepcopy(self.nodes)})

    def start(self, node_id: str) -> None:
        self._state(node_id, 0.0, 1.0, "running")

    def step(self, node_id: str, value: int, most: int) -> None:
        self._state(node_id, value, most, "running")
        self.send("progress", {"value": value, "max": most, "prompt_id": self.prompt_id, "node": node_id})

    def finish(self, node_id: str) -> None:
        most = self.nodes[node_id]["max"] if node_id in self.nodes else 1
        self._state(node_id, most, most, "finished")


@dataclass
class Executor:
    root: Path                      # holds input/ and output/
    gpu: Gpu
    image_mode: str
    cold_s: float
    warm_s: float
    models_dir: Path = Path("models")
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
        """What ComfyUI's classic cache keys a node's output by: its class, its literal inputs, its
        inputs' own signatures, and for LoadImage the file's bytes (its IS_CHANGED). A link to a
        node that is not there never matches (ComfyUI puts NaN there)."""
        if node_id not in memo:
            if node_id not in graph:
                return uuid.uuid4().hex
            memo[node_id] = "cycle"
            node = graph[node_id]
            inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
            parts = {k: [self.signature(graph, v[0], memo), v[1]] if _is_link(v) else v for k, v in inputs.items()}
            if node.get("class_type") == "LoadImage" and isinstance(inputs.get("image"), str):
                parts["image"] = [inputs["image"], self._file_hash(inputs["image"])]
            raw = json.dumps([node.get("class_type"), parts], sort_keys=True, default=str)
            memo[node_id] = hashlib.sha256(raw.encode()).hexdigest()
        return memo[node_id]

    def _file_hash(self, name: str) -> str:
        try:
            return hashlib.sha256((self.root / "input" / name).read_bytes()).hexdigest()
        except OSError:
            return "missing"

    def staged(self, graph: dict[str, Any], outputs: list[str], cached: set[str]) -> list[str]:
        """The nodes that run, in order: the outputs and what they read, depth first, stopping at
        cached nodes (an output is always staged, even cached: ComfyUI then sends its cached ui)."""
        seen: set[str] = set()
        done: list[str] = []

        def visit(node_id: str) -> None:
            if node_id in seen:
                return
            seen.add(node_id)
            for value in graph[node_id].get("inputs", {}).values():
                if _is_link(value) and value[0] in graph and value[0] not in cached:
                    visit(value[0])
            done.append(node_id)

        for out in outputs:
            visit(out)
        return done

    def run(self, prompt_id: str, graph: dict[str, Any], outputs: list[str], send: Send) -> None:
        """Execute as ComfyUI's classic cache does: only the last prompt's outputs are kept, so a
        node is cached when this prompt has one of the same signature. `send(event, data)` gets
        every message; the caller decides who hears it. Raises NodeFailed / Interrupted."""
        memo: dict[str, str] = {}
        sigs = {node_id: self.signature(graph, node_id, memo) for node_id in graph}
        self.cache = {sig: self.cache[sig] for sig in sigs.values() if sig in self.cache}
        cached = {node_id for node_id, sig in sigs.items() if sig in self.cache}
        send("execution_cached", {"nodes": [n for n in graph if n in cached], "prompt_id": prompt_id})
        progress = Progress(prompt_id, send)
        executed: list[str] = []
        for node_id in self.staged(graph, outputs, cached):
            sig = sigs[node_id]
            if sig in self.cache:
                send("executed", {"node": node_id, "display_node": node_id, "output": self.cache[sig][1],
                                  "prompt_id": prompt_id})
                progress.finish(node_id)
                continue
            progress.start(node_id)
            send("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})
            try:
                if self.interrupt.is_set():           # checked as each node begins
                    raise Interrupted()
                value, out = self.node(prompt_id, graph, node_id, lambda n: self.cache[sigs[n]][0], progress)
            except NodeFailed as err:
                err.node_id, err.node_type, err.executed = node_id, graph[node_id]["class_type"], list(executed)
                err.inputs = {k: [str(self.cache[sigs[v[0]]][0]) if _is_link(v) and sigs.get(v[0]) in self.cache
                                  else v] for k, v in graph[node_id].get("inputs", {}).items()}
                raise
            self.cache[sig] = (value, out)
            if out is not None:
                send("executed", {"node": node_id, "display_node": node_id, "output": out, "prompt_id": prompt_id})
            progress.finish(node_id)
            executed.append(node_id)

    def outputs_of(self, graph: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The ui outputs this prompt's nodes have in the cache now: what /history lists, also
        after a failure (the nodes that ran before it, and the cached ones)."""
        memo: dict[str, str] = {}
        found = {}
        for node_id in graph:
            hit = self.cache.get(self.signature(graph, node_id, memo))
            if hit is not None and hit[1] is not None:
                found[node_id] = hit[1]
        return found

    def node(self, prompt_id: str, graph: dict[str, Any], node_id: str, value_of: Callable[[str], Any],
             progress: Progress) -> tuple[Any, dict[str, Any] | None]:
        cls, inputs = graph[node_id]["class_type"], graph[node_id].get("inputs", {})
        arg = {k: value_of(v[0]) if _is_link(v) else v for k, v in inputs.items()}
        if cls == "NunchakuQwenImageDiTLoader" and self.loader_error:
            raise NodeFailed(*self.loader_error)   # the plugin builds the core's classes only when it runs
        if cls in LOADERS:
            name = str(arg[LOADERS[cls]])
            if self.check_models:
                hits = [p for p in self.models_dir.rglob(name) if p.is_file()]
                if hits:
                    check_safetensors(hits[0])
            return ("model", name), None
        if cls == "LoadImage":
            path = self.root / "input" / str(arg["image"])
            found = png.size(path.read_bytes())
            if found is None:                 # the stand-in reads PNG only; ComfyUI's PIL says this
                raise NodeFailed("PIL.UnidentifiedImageError", f"cannot identify image file {str(path)!r}")
            return ("image", *found), None
        if cls in ("EmptySD3LatentImage", "EmptyLatentImage"):
            return ("latent", int(arg["width"]) // 8, int(arg["height"]) // 8), None
        if cls == "EmptyImage":
            image = ("image", int(arg["width"]), int(arg["height"]), 0, int(arg.get("batch_size", 1)))
            time.sleep(IMAGE_S_PER_MP[cls] * _megapixels(image))
            return image, None
        if cls == "ImageScale":
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
        if cls.startswith("Primitive"):         # PrimitiveInt, PrimitiveFloat, ...: their value
            return arg.get("value"), None
        if cls == "BasicScheduler":          # SamplerCustom's sigmas: one per step
            return ("sigmas", int(arg["steps"])), None
        if cls in SAMPLERS:
            sigmas = arg.get("sigmas")
            steps = sigmas[1] if isinstance(sigmas, tuple) else int(arg.get("steps", 4))
            self.sample(node_id, str(arg["model"][1]), steps, progress)
            _, w, h = arg["latent_image"]
            return ("latent", w, h, int(arg[SAMPLERS[cls]])), None
        if cls in ("SaveImage", "PreviewImage"):
            return None, {"images": self.save(graph, arg, cls)}
        linked = [value_of(v[0]) for v in inputs.values() if _is_link(v)]
        if cls in IMAGE_S_PER_MP and linked:
            time.sleep(IMAGE_S_PER_MP[cls] * _megapixels(linked[0]))
        return (linked[0] if linked else None), None

    def _pause(self, seconds: float) -> None:
        """Time passing on the GPU; an interrupt lands at the next check, as in ComfyUI."""
        if self.interrupt.wait(seconds):
            raise Interrupted()

    def sample(self, node_id: str, model: str, steps: int, progress: Progress) -> None:
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
            progress.step(node_id, step, steps)
        self.gpu.set(self.gpu.resident_mib)

    def save(self, graph: dict[str, Any], arg: dict[str, Any], cls: str) -> list[dict[str, str]]:
        """Write the PNGs as SaveImage does, one per image of the batch: the prefix may hold a
        subfolder, the counter goes on from the highest file there (00001 upward)."""
        kind = "output" if cls == "SaveImage" else "temp"
        prefix = str(arg.get("filename_prefix", "ComfyUI" if kind == "output" else "ComfyUI_temp"))
        sub, _, base = prefix.rpartition("/")
        folder = self.root / kind / sub
        folder.mkdir(parents=True, exist_ok=True)
        taken = [int(p.name[len(base) + 1:len(base) + 6]) for p in folder.glob(f"{base}_?????_.png")
                 if p.name[len(base) + 1:len(base) + 6].isdigit()]
        first = max(taken, default=0) + 1
        image = arg["images"]
        w, h = (image[1], image[2]) if isinstance(image, tuple) else (64, 64)
        seed = image[3] if isinstance(image, tuple) and len(image) > 3 else 0
        saved = []
        for i in range(image[4] if isinstance(image, tuple) and len(image) > 4 else 1):
            name = f"{base}_{first + i:05d}_.png"
            (folder / name).write_bytes(png.picture(w, h, seed + i, self.image_mode,
                                                    {"prompt": json.dumps(graph)}, self.device))
            saved.append({"filename": name, "subfolder": sub, "type": kind})
        return saved
