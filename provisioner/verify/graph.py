"""Read and adjust an API-format ComfyUI graph for a verification run (prompt, seed, size)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

Graph = Mapping[str, Any]

# Every input of these names gets the run's seed, whatever its node's class (KSampler.seed,
# KSamplerAdvanced/SamplerCustom/RandomNoise.noise_seed, a custom node's): a seed left at the
# template's value would repeat the same generation, which ComfyUI answers from its cache.
SEED_NAMES = ("seed", "noise_seed")
TEXT_INPUTS = ("text", "prompt")   # CLIPTextEncode.text, TextEncodeQwenImageEdit(Plus).prompt
LATENT_DOWNSCALE = 8               # Qwen-Image / SD VAEs: one latent cell is 8x8 pixels


def _link(value: object) -> str | None:
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        return value[0]
    return None


def _text_node(graph: Graph, node_id: str | None, seen: frozenset[str] = frozenset()) -> str | None:
    """The node holding the prompt text upstream of a conditioning link (through guidance nodes)."""
    if node_id is None or node_id in seen or node_id not in graph:
        return None
    inputs = graph[node_id].get("inputs", {})
    if any(isinstance(inputs.get(k), str) for k in TEXT_INPUTS):
        return node_id
    for value in inputs.values():
        found = _text_node(graph, _link(value), seen | {node_id})
        if found:
            return found
    return None


def prepare(graph: Graph, *, prompt: str | None = None, seed: int | None = None,
            prefix: str | None = None, image: str | None = None) -> dict[str, Any]:
    """A copy with the positive prompt, sampler seed, SaveImage prefix and LoadImage file set
    where the graph has them (None: left as rendered)."""
    out: dict[str, Any] = copy.deepcopy(dict(graph))
    for node in out.values():
        kind, inputs = node.get("class_type"), node.setdefault("inputs", {})
        if image is not None and kind == "LoadImage":
            inputs["image"] = image
        if seed is not None:
            for key in SEED_NAMES:
                if key in inputs and _link(inputs[key]) is None:
                    inputs[key] = seed
        if prefix is not None and kind == "SaveImage":
            inputs["filename_prefix"] = prefix
        if prompt is not None and "positive" in inputs:
            target = _text_node(out, _link(inputs["positive"]))
            if target:
                t_inputs = out[target]["inputs"]
                key = next(k for k in TEXT_INPUTS if isinstance(t_inputs.get(k), str))
                t_inputs[key] = prompt
    return out


def computing_nodes(graph: Graph) -> frozenset[str]:
    """The nodes that compute, not the ones that save: a SaveImage's prefix changes with every run,
    so ComfyUI re-runs it even when it serves the rest from its cache."""
    return frozenset(n for n, node in graph.items() if node.get("class_type") not in ("SaveImage", "PreviewImage"))


def load_image_names(graph: Graph) -> tuple[str, ...]:
    """The input/ files the graph's LoadImage nodes read."""
    return tuple(dict.fromkeys(n["inputs"]["image"] for n in graph.values()
                               if n.get("class_type") == "LoadImage"
                               and isinstance(n.get("inputs", {}).get("image"), str)))


def _pixels(graph: Graph, node_id: str | None, input_size: tuple[int, int] | None) -> tuple[int, int] | None:
    """Pixel size of the IMAGE a node outputs, following ComfyUI's node semantics we know."""
    if node_id is None or node_id not in graph:
        return None
    node = graph[node_id]
    kind, inputs = node.get("class_type"), node.get("inputs", {})
    if kind == "LoadImage":
        return input_size
    if kind in ("EmptySD3LatentImage", "EmptyLatentImage", "EmptyImage", "ImageScale"):
        w, h = inputs.get("width"), inputs.get("height")
        return (w, h) if isinstance(w, int) and isinstance(h, int) else None
    if kind == "ImageScaleToTotalPixels":
        src = _pixels(graph, _link(inputs.get("image")), input_size)
        if src is None:
            return None
        scale = math.sqrt(float(inputs.get("megapixels", 1.0)) * 1024 * 1024 / (src[0] * src[1]))
        return round(src[0] * scale), round(src[1] * scale)
    if kind in ("VAEDecode", "VAEEncode"):
        key = "samples" if kind == "VAEDecode" else "pixels"
        src = _pixels(graph, _link(inputs.get(key)), input_size)
        return None if src is None else (src[0] // LATENT_DOWNSCALE * LATENT_DOWNSCALE,
                                         src[1] // LATENT_DOWNSCALE * LATENT_DOWNSCALE)
    if "latent_image" in inputs:          # a sampler of any kind: its latent's size
        return _pixels(graph, _link(inputs.get("latent_image")), input_size)
    return None


def expected_size(graph: Graph, input_size: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """(width, height) the first SaveImage will write, or None when the graph does not say."""
    for node in graph.values():
        if node.get("class_type") == "SaveImage":
            return _pixels(graph, _link(node.get("inputs", {}).get("images")), input_size)
    return None
