"""The stand-in ComfyUI's node registry (real captured /object_info) and its `/prompt` validation.

Validation behaves as ComfyUI 0.3.64's `execution.validate_prompt` does seen from outside, checked
against the real one (tests/real/test_real_standin.py): every class must exist (`invalid_prompt`),
there must be an output node (`prompt_no_outputs`), and the nodes each output depends on are
checked input by input (`prompt_outputs_failed_validation` with per-node `node_errors`), including
the exceptions ComfyUI's own code raises on a malformed graph; nodes feeding no output are not
validated, as in ComfyUI.
"""

from __future__ import annotations

import ast
import copy
import functools
import gzip
import json
import mimetypes
import traceback
from pathlib import Path
from typing import Any

DIT_LOADER = "NunchakuQwenImageDiTLoader"
# Loader inputs whose choices are the files of a model folder (ComfyUI's folder_paths names).
MODEL_INPUTS = {
    (DIT_LOADER, "model_name"): "diffusion_models",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
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
        if import_error(init):
            continue                       # ComfyUI logs the import failure and goes on without it
        tree = ast.parse(init.read_text(errors="replace"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NODE_CLASS_MAPPINGS"
                                                    for t in node.targets) and isinstance(node.value, ast.Dict):
                names += [k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
        packs[folder.name] = names
    return packs


def import_error(init: Path) -> str | None:
    """What importing a pack's __init__.py would raise, as far as the stand-in can tell (it never
    runs a pack's code): its SyntaxError, else None."""
    try:
        ast.parse(init.read_text(errors="replace"))
    except SyntaxError as err:
        return f"SyntaxError: {err.msg} ({init.name}, line {err.lineno})"
    return None


def broken_node_packs(custom_nodes: Path, skip: str) -> dict[str, str]:
    """The packs ComfyUI would try to import and fail to: each folder's error."""
    if not custom_nodes.is_dir():
        return {}
    return {folder.name: error for folder in sorted(custom_nodes.iterdir())
            if folder.name not in (skip, "__pycache__") and not folder.name.endswith(".disabled")
            and (folder / "__init__.py").is_file() and (error := import_error(folder / "__init__.py"))}


def pack_entry(name: str, folder: str) -> dict[str, Any]:
    """A node of another pack, in /object_info's shape: an IMAGE in, an IMAGE out."""
    return {"input": {"required": {"image": ["IMAGE", {}]}}, "input_order": {"required": ["image"]},
            "output": ["IMAGE"], "output_is_list": [False], "output_name": ["IMAGE"], "name": name,
            "display_name": name, "description": "", "python_module": f"custom_nodes.{folder}",
            "category": folder, "output_node": False}


def registry(base: dict[str, Any], models_dir: Path, input_dir: Path) -> dict[str, Any]:
    """/object_info now: model and input choices listed from the folders, as ComfyUI does (no
    models yet: empty lists, VAELoader only `pixel_space`; LoadImage lists image files of input/,
    LoadImageMask every file, the folder loaders its sub-folders)."""
    nodes = dict(base)
    paths = folder_paths(input_dir.parent, models_dir)
    for (cls, name), folder in MODEL_INPUTS.items():
        if cls in nodes:
            entry = nodes[cls] = copy.deepcopy(nodes[cls])
            extra = ["pixel_space"] if cls == "VAELoader" else []
            entry["input"]["required"][name][0] = list_in(paths[folder]) + extra
    entries = sorted(input_dir.iterdir()) if input_dir.is_dir() else []
    files = [p.name for p in entries if p.is_file()]
    listed = {
        ("LoadImage", "image"): [f for f in files if (mimetypes.guess_type(f, strict=False)[0] or "").startswith("image/")],
        ("LoadImageMask", "image"): files,
        ("LoadImageSetFromFolderNode", "folder"): [p.name for p in entries if p.is_dir()],
        ("LoadImageTextSetFromFolderNode", "folder"): [p.name for p in entries if p.is_dir()],
    }
    for (cls, name), choices in listed.items():
        if cls in nodes:
            entry = nodes[cls] = copy.deepcopy(nodes[cls])
            entry["input"]["required"][name][0] = choices
    return nodes


def error_entry(kind: str, message: str, details: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


class Rejected(Exception):
    """The prompt is refused before any node is validated: (error, node_errors) as ComfyUI answers."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error["message"])
        self.error = error


def type_name(kind: type) -> str:
    """An exception's type as ComfyUI names it: `KeyError`, `safetensors._safetensors_rust.SafetensorError`."""
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _accepts(received: Any, wanted: Any) -> bool:
    """A link's type against the input's: equal, `*` on either side, or overlapping `A,B` unions."""
    if received == wanted or "*" in (received, wanted):
        return True
    if not isinstance(received, str) or not isinstance(wanted, str):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in wanted.split(",")})


def annotated(name: Any) -> tuple[str, str | None]:
    """ComfyUI's annotated file name: `x.png [output]` is x.png of output/ (None: not said).
    A name that is not a string fails as it does in ComfyUI (AttributeError)."""
    for suffix, folder in ((" [output]", "output"), (" [input]", "input"), (" [temp]", "temp")):
        if name.endswith(suffix.strip()):
            return name[:-len(suffix)], folder
    return name, None


def file_exists(input_dir: Path, name: Any) -> bool:
    """LoadImage's check: the (annotated) name exists as a path, not resolved, as os.path.exists."""
    name, folder = annotated(name)
    return (input_dir.parent / folder / name if folder else input_dir / name).exists()


def folder_paths(root: Path, models_dir: Path) -> dict[str, list[Path]]:
    """ComfyUI's model folders and where it looks for each (captured; the capture's base moved to
    this root and its models/ to `models_dir`)."""
    base = "/srv/comfy-base"
    found = {}
    for name, paths in load_capture("extra/internal_folder_paths.json").items():
        found[name] = [models_dir / p[len(base + "/models/"):] if p.startswith(base + "/models/")
                       else root / p[len(base) + 1:] for p in paths]
    return found


def list_in(paths: list[Path]) -> list[str]:
    """The model files under these folders, relative, sorted (ComfyUI's get_filename_list)."""
    return sorted({p.relative_to(folder).as_posix() for folder in paths if folder.is_dir()
                   for p in folder.rglob("*") if p.is_file() and p.suffix in MODEL_EXTENSIONS})


class Validator:
    """ComfyUI 0.3.64's `validate_prompt` over a graph, as it behaves from outside: the same error
    entries, the same exceptions where ComfyUI's own code raises (a link to a node that is not
    there, a slot out of range, a node without `inputs`), caught where ComfyUI catches them and
    reported as `exception_during_validation` / `exception_during_inner_validation`; literal values
    converted in place (`"64"` becomes 64 in the queued graph). A malformed graph that makes
    ComfyUI's own checks raise raises here too: the handler answers 500, as aiohttp does.
    Outputs are taken in graph order (ComfyUI uses a set: its order varies between runs)."""

    def __init__(self, graph: Any, nodes: dict[str, Any], input_dir: Path) -> None:
        self.graph, self.nodes, self.input_dir = graph, nodes, input_dir
        self.validated: dict[Any, tuple[bool, list[dict[str, Any]]]] = {}
        self.active: set[Any] = set()

    def outputs(self, targets: Any = None) -> list[Any]:
        found = []
        for node_id in self.graph:
            node = self.graph[node_id]
            if "class_type" not in node:
                raise Rejected(error_entry("invalid_prompt", "Cannot execute because a node is missing the "
                                           "class_type property.", f"Node ID '#{node_id}'"))
            cls = node["class_type"]
            entry = self.nodes.get(cls)
            if entry is None:
                raise Rejected(error_entry("invalid_prompt", f"Cannot execute because node {cls} does not exist.",
                                           f"Node ID '#{node_id}'"))
            if entry.get("output_node") is True and (targets is None or node_id in targets):
                found.append(node_id)
        if not found:
            raise Rejected(error_entry("prompt_no_outputs", "Prompt has no outputs", ""))
        return found

    def node(self, node_id: Any) -> tuple[bool, list[dict[str, Any]]]:
        """(valid, this node's own errors); raises what ComfyUI's validate_inputs raises."""
        if node_id in self.validated:
            return self.validated[node_id]
        if node_id in self.active:          # a cycle: ComfyUI recurses until Python's limit and
            return False, []                # ends with every node of it invalid, none with an error
        self.active.add(node_id)
        try:
            result = self._check(node_id)
        finally:
            self.active.discard(node_id)
        self.validated[node_id] = result
        return result

    def _check(self, node_id: Any) -> tuple[bool, list[dict[str, Any]]]:
        inputs = self.graph[node_id]["inputs"]
        cls = self.graph[node_id]["class_type"]
        declared = self.nodes[cls].get("input") or {}
        custom = CUSTOM_VALIDATION.get(cls)
        errors: list[dict[str, Any]] = []
        valid = True
        for part in ("required", "optional"):
            for name, config in (declared.get(part) or {}).items():
                kind, opts = config[0], (config[1] if len(config) > 1 else {})
                info = [kind, opts]
                if name not in inputs:
                    if part == "required":
                        errors.append(error_entry("required_input_missing", "Required input is missing", name,
                                                  input_name=name))
                    continue
                value = inputs[name]
                if isinstance(value, list):
                    valid = self._link(name, value, kind, info, errors) and valid
                    continue
                if isinstance(value, dict) and "__value__" in value:
                    value = inputs[name] = value["__value__"]
                error = self._literal(inputs, name, value, kind, opts, info, custom is not None and name == custom[0])
                if error:
                    errors.append(error)
        if custom is not None:
            errors += self._custom(cls, inputs, *custom)
        return (valid and not errors), errors

    def _link(self, name: str, value: list[Any], kind: Any, info: list[Any], errors: list[dict[str, Any]]) -> bool:
        if len(value) != 2:
            errors.append(error_entry("bad_linked_input", "Bad linked input, must be a length-2 list of "
                                      "[node_id, slot_index]", name, input_name=name, input_config=info,
                                      received_value=value))
            return True
        source = value[0]
        returned = tuple(self.nodes[self.graph[source]["class_type"]]["output"])
        received = returned[value[1]]
        if not _accepts(received, kind):
            errors.append(error_entry("return_type_mismatch", "Return type mismatch between linked nodes",
                                      f"{name}, received_type({received}) mismatch input_type({kind})",
                                      input_name=name, input_config=info, received_type=received,
                                      linked_node=value))
            return True
        try:
            return self.node(source)[0]
        except Exception as ex:             # noqa: BLE001 - ComfyUI reports any exception here
            text = str(ex)
            self.validated[source] = (False, [error_entry(
                "exception_during_inner_validation", "Exception when validating inner node", text,
                input_name=name, input_config=info, exception_message=text,
                exception_type=type_name(type(ex)), traceback=traceback.format_tb(ex.__traceback__),
                linked_node=value)])
            return False

    @staticmethod
    def _literal(inputs: dict[str, Any], name: str, value: Any, kind: Any, opts: dict[str, Any],
                 info: list[Any], custom: bool) -> dict[str, Any] | None:
        """The error of one literal value, or None; INT, FLOAT, STRING and BOOLEAN values are
        converted in place, as ComfyUI stores them in the queued graph."""
        convert = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(kind) \
            if isinstance(kind, str) else None
        if convert is not None:
            try:
                value = inputs[name] = convert(value)
            except Exception as ex:             # noqa: BLE001 - whatever the conversion raises
                return error_entry("invalid_input_type", f"Failed to convert an input value to a {kind} value",
                                   f"{name}, {value}, {ex}", input_name=name, input_config=info,
                                   received_value=value, exception_message=str(ex))
        if custom:                              # the node's own validation owns this input
            return None
        if "min" in opts and value < opts["min"]:
            return error_entry("value_smaller_than_min", f"Value {value} smaller than min of {opts['min']}", name,
                               input_name=name, input_config=info, received_value=value)
        if "max" in opts and value > opts["max"]:
            return error_entry("value_bigger_than_max", f"Value {value} bigger than max of {opts['max']}", name,
                               input_name=name, input_config=info, received_value=value)
        # Only a plain list of choices is checked: 0.3.64 does not check a V3 node's COMBO.
        if isinstance(kind, list) and value not in kind:
            listed = f"(list of length {len(kind)})" if len(kind) > 20 else str(kind)
            return error_entry("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {listed}",
                               input_name=name, input_config=info if len(kind) <= 20 else None,
                               received_value=value)
        return None

    def _custom(self, cls: str, inputs: dict[str, Any], name: str, what: str) -> list[dict[str, Any]]:
        """The node's own VALIDATE_INPUTS(name): called with its literal value (a link gives it None);
        without the input at all ComfyUI calls it with no argument, which raises."""
        if name not in inputs:
            raise TypeError(f"{cls}.VALIDATE_INPUTS() missing 1 required positional argument: '{name}'")
        value = None if isinstance(inputs[name], list) else inputs[name]
        if file_exists(self.input_dir, value):
            return []
        return [error_entry("custom_validation_failed", "Custom validation failed for node",
                            f"{name} - Invalid {what} file: {value}", input_name=name)]


# Nodes with a VALIDATE_INPUTS of their own: the input it checks, and what its message calls it.
CUSTOM_VALIDATION = {"LoadImage": ("image", "image"), "LoadImageMask": ("image", "image"),
                     "LoadLatent": ("latent", "latent")}


def validate(graph: Any, nodes: dict[str, Any], input_dir: Path, targets: Any = None
             ) -> tuple[dict[str, Any] | None, dict[str, Any], list[Any]]:
    """(error or None, node_errors, the outputs to run), like ComfyUI's validate_prompt. Raises
    what ComfyUI raises on a graph it cannot even walk (the caller answers 500)."""
    check = Validator(graph, nodes, input_dir)
    try:
        outputs = check.outputs(targets)
    except Rejected as rejected:
        return rejected.error, {}, []
    good: list[Any] = []
    failed: list[str] = []
    node_errors: dict[str, Any] = {}
    for out in outputs:
        try:
            valid, reasons = check.node(out)
        except Exception as ex:             # noqa: BLE001 - ComfyUI reports any exception here
            reasons = [error_entry("exception_during_validation", "Exception when validating node", str(ex),
                                   exception_type=type_name(type(ex)),
                                   traceback=traceback.format_tb(ex.__traceback__))]
            valid, check.validated[out] = False, (False, reasons)
        if valid:
            good.append(out)
            continue
        failed += [f"{r['message']}: {r['details']}" for r in reasons]
        # As ComfyUI: every node found wrong so far is listed as this output's cause too.
        for node_id, (ok, errors) in check.validated.items():
            if not ok and errors:
                entry = node_errors.setdefault(node_id, {"errors": errors, "dependent_outputs": [],
                                                         "class_type": graph[node_id]["class_type"]})
                entry["dependent_outputs"].append(out)
    if not good:
        return error_entry("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                           "\n".join(failed)), node_errors, []
    return None, node_errors, good
