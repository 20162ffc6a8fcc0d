"""The stand-in ComfyUI's node registry (real captured /object_info) and its `/prompt` validation.

Validation follows ComfyUI 0.3.64's `execution.validate_prompt` for what the captures show: every
class must exist (`invalid_prompt`), there must be an output node (`prompt_no_outputs`), and the
nodes each output depends on are checked input by input (`prompt_outputs_failed_validation` with
per-node `node_errors`); nodes feeding no output are not validated, as in ComfyUI.
"""

from __future__ import annotations

import ast
import copy
import functools
import gzip
import json
from pathlib import Path
from typing import Any

DIT_LOADER = "NunchakuQwenImageDiTLoader"
# Loader inputs whose choices are the files of a models/ folder (ComfyUI's folder_paths names).
MODEL_INPUTS = {
    (DIT_LOADER, "model_name"): ("diffusion_models",),
    ("UNETLoader", "unet_name"): ("diffusion_models", "unet"),
    ("CLIPLoader", "clip_name"): ("text_encoders", "clip"),
    ("VAELoader", "vae_name"): ("vae",),
}
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


CAPTURES = Path(__file__).with_name("captures") / "comfyui-0.3.64"   # see captures/README.md


def load_capture(name: str) -> Any:
    """One captured JSON answer of real ComfyUI 0.3.64, by its file name under captures/comfyui-0.3.64/."""
    path = CAPTURES / name
    if name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            return json.load(fh)
    return json.loads(path.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def _core_nodes() -> dict[str, Any]:
    return load_capture("object_info.full.json.gz")     # 0.5 MB of JSON: parsed once per process


def dit_loader_entry(plugin_dir: str = "ComfyUI-nunchaku") -> dict[str, Any]:
    """NunchakuQwenImageDiTLoader as ComfyUI-nunchaku v1.1.0 declares it, in /object_info's shape."""
    return {
        "input": {
            "required": {
                "model_name": [[], {"tooltip": "The Nunchaku Qwen-Image model."}],
                "cpu_offload": [["auto", "enable", "disable"], {
                    "default": "auto",
                    "tooltip": "Whether to enable CPU offload for the transformer model. 'auto' will "
                               "enable it if the GPU memory is less than 15G."}],
            },
            "optional": {
                "num_blocks_on_gpu": ["INT", {
                    "default": 1, "min": 1, "max": 60,
                    "tooltip": "When CPU offload is enabled, this option determines how many "
                               "transformer blocks remain on GPU memory."}],
                "use_pin_memory": [["enable", "disable"], {
                    "default": "disable",
                    "tooltip": "Use pinned memory for the transformer blocks when CPU offload is "
                               "enabled."}],
            },
        },
        "input_order": {"required": ["model_name", "cpu_offload"],
                        "optional": ["num_blocks_on_gpu", "use_pin_memory"]},
        "output": ["MODEL"], "output_is_list": [False], "output_name": ["MODEL"],
        "name": DIT_LOADER, "display_name": "Nunchaku Qwen-Image DiT Loader",
        "description": "", "python_module": f"custom_nodes.{plugin_dir}", "category": "Nunchaku",
        "output_node": False,
    }


def base_registry(*, plugin: bool, backend: bool, plugin_dir: str = "ComfyUI-nunchaku") -> dict[str, Any]:
    """The 478 captured core nodes; with the plugin, its two backend-free nodes; with the backend,
    the DiT loader too (the plugin registers it only when `import nunchaku` works). A custom node's
    `python_module` is `custom_nodes.<its folder>`: ComfyUI-Manager installs this one as
    comfyui-nunchaku."""
    nodes = dict(_core_nodes())                 # shallow: entries are never changed in place
    if plugin:
        captured = load_capture("object_info.nunchaku-plugin-without-backend.json")
        nodes.update({k: {**v, "python_module": f"custom_nodes.{plugin_dir}"} for k, v in captured.items()})
    if plugin and backend:
        nodes[DIT_LOADER] = dit_loader_entry(plugin_dir)
    return nodes


def custom_node_packs(custom_nodes: Path, skip: str) -> dict[str, list[str]]:
    """The other node packs ComfyUI would import from custom_nodes/ (folders with an __init__.py,
    not ending in .disabled): each folder's classes, read from its NODE_CLASS_MAPPINGS literal."""
    packs: dict[str, list[str]] = {}
    if not custom_nodes.is_dir():
        return packs
    for folder in sorted(custom_nodes.iterdir()):
        init = folder / "__init__.py"
        if folder.name in (skip, "__pycache__") or folder.name.endswith(".disabled") or not init.is_file():
            continue
        names: list[str] = []
        try:
            tree = ast.parse(init.read_text(errors="replace"))
        except SyntaxError:
            continue                       # ComfyUI logs the import failure and goes on without it
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NODE_CLASS_MAPPINGS"
                                                    for t in node.targets) and isinstance(node.value, ast.Dict):
                names += [k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
        packs[folder.name] = names
    return packs


def pack_entry(name: str, folder: str) -> dict[str, Any]:
    """A node of another pack, in /object_info's shape: an IMAGE in, an IMAGE out."""
    return {"input": {"required": {"image": ["IMAGE", {}]}}, "input_order": {"required": ["image"]},
            "output": ["IMAGE"], "output_is_list": [False], "output_name": ["IMAGE"], "name": name,
            "display_name": name, "description": "", "python_module": f"custom_nodes.{folder}",
            "category": folder, "output_node": False}


def list_files(models_dir: Path | None, folders: tuple[str, ...]) -> list[str]:
    if models_dir is None:
        return []
    found = {p.relative_to(models_dir / f).as_posix() for f in folders if (models_dir / f).is_dir()
             for p in (models_dir / f).rglob("*") if p.is_file() and p.suffix in MODEL_EXTENSIONS}
    return sorted(found)


def registry(base: dict[str, Any], models_dir: Path | None, input_dir: Path) -> dict[str, Any]:
    """/object_info now: model and input-image choices listed from the folders, as ComfyUI does."""
    nodes = dict(base)
    for (cls, name), folders in MODEL_INPUTS.items():
        if cls in nodes and models_dir is not None:
            entry = nodes[cls] = copy.deepcopy(nodes[cls])
            extra = ["pixel_space"] if cls == "VAELoader" else []
            entry["input"]["required"][name][0] = list_files(models_dir, folders) + extra
    if "LoadImage" in nodes:
        entry = nodes["LoadImage"] = copy.deepcopy(nodes["LoadImage"])
        files = sorted(p.name for p in input_dir.iterdir() if p.is_file()) if input_dir.is_dir() else []
        entry["input"]["required"]["image"][0] = files
    return nodes


def error_entry(kind: str, message: str, details: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _literal(cls: str, name: str, value: Any, config: list[Any],
             models_listed: bool) -> list[dict[str, Any]]:
    """Errors for one literal input value against its declared config."""
    kind, opts = config[0], (config[1] if len(config) > 1 else {})
    config = [kind, opts]                      # ComfyUI reports the config with its options dict
    info = {"input_name": name, "input_config": config}
    choices = kind if isinstance(kind, list) else opts.get("options") if kind == "COMBO" else None
    if choices is not None:
        if (cls, name) in MODEL_INPUTS and not models_listed:
            return []                                    # no models folder given: any name goes
        if value not in choices:
            return [error_entry("value_not_in_list", "Value not in list",
                                f"{name}: '{value}' not in {choices}", **info, received_value=value)]
        return []
    if kind in ("INT", "FLOAT"):
        try:
            number = int(value) if kind == "INT" else float(value)
        except (TypeError, ValueError) as ex:
            return [error_entry("invalid_input_type",
                                f"Failed to convert an input value to a {kind} value",
                                f"{name}, {value}, {ex}", **info, received_value=value,
                                exception_message=str(ex))]
        if "min" in opts and number < opts["min"]:
            return [error_entry("value_smaller_than_min",
                                f"Value {number} smaller than min of {opts['min']}", name, **info,
                                received_value=number)]
        if "max" in opts and number > opts["max"]:
            return [error_entry("value_bigger_than_max",
                                f"Value {number} bigger than max of {opts['max']}", name, **info,
                                received_value=number)]
    return []


def _validate_node(graph: dict[str, Any], node_id: str, nodes: dict[str, Any], input_dir: Path,
                   models_listed: bool, seen: dict[str, tuple[bool, list]]) -> bool:
    if node_id in seen:
        return seen[node_id][0]
    seen[node_id] = (True, [])                          # a cycle ends here, as in ComfyUI
    node = graph[node_id]
    cls, inputs = node["class_type"], node.get("inputs") or {}
    declared = nodes[cls].get("input") or {}
    errors: list[dict[str, Any]] = []
    ok = True
    for part in ("required", "optional"):
        for name, config in (declared.get(part) or {}).items():
            if name not in inputs:
                if part == "required":
                    errors.append(error_entry("required_input_missing", "Required input is missing",
                                              name, input_name=name))
                continue
            value = inputs[name]
            if isinstance(value, list):
                if len(value) != 2 or not isinstance(value[0], str) or value[0] not in graph:
                    errors.append(error_entry("bad_linked_input", "Bad linked input, must be a "
                                              "length-2 list of [string, int]", f"{name}, {value}",
                                              input_name=name))
                elif not _validate_node(graph, value[0], nodes, input_dir, models_listed, seen):
                    ok = False
            elif cls == "LoadImage" and name == "image":   # LoadImage.VALIDATE_INPUTS
                if not (input_dir / str(value)).is_file():
                    errors.append(error_entry("custom_validation_failed",
                                              "Custom validation failed for node",
                                              f"image - Invalid image file: {value}", input_name=name))
            else:
                errors.extend(_literal(cls, name, value, config, models_listed))
    seen[node_id] = (ok and not errors, errors)
    return seen[node_id][0]


def validate(graph: Any, nodes: dict[str, Any], input_dir: Path, *, models_listed: bool
             ) -> tuple[dict[str, Any] | None, dict[str, Any], list[str]]:
    """(error or None, node_errors, output node ids), like ComfyUI's validate_prompt."""
    for node_id, node in graph.items():
        cls = node.get("class_type") if isinstance(node, dict) else None
        if cls is None:
            return error_entry("invalid_prompt", "Cannot execute because a node is missing the "
                               "class_type property.", f"Node ID '#{node_id}'"), {}, []
        if cls not in nodes:
            return error_entry("invalid_prompt", f"Cannot execute because node {cls} does not exist.",
                               f"Node ID '#{node_id}'"), {}, []
    outputs = [k for k, v in graph.items() if nodes[v["class_type"]].get("output_node")]
    if not outputs:
        return error_entry("prompt_no_outputs", "Prompt has no outputs", ""), {}, []
    node_errors: dict[str, Any] = {}
    good = []
    for out in outputs:
        seen: dict[str, tuple[bool, list]] = {}
        if _validate_node(graph, out, nodes, input_dir, models_listed, seen):
            good.append(out)
        for node_id, (_, errors) in seen.items():
            if errors:
                entry = node_errors.setdefault(node_id, {"errors": errors, "dependent_outputs": [],
                                                         "class_type": graph[node_id]["class_type"]})
                entry["dependent_outputs"].append(out)
    if not good:
        return error_entry("prompt_outputs_failed_validation", "Prompt outputs failed validation", ""), \
            node_errors, []
    return None, node_errors, good
