"""A host's fingerprint: everything that should be the same on hosts of one profile and GPU class
(the GPU, driver, CUDA, torch, Python, nunchaku, plugin, ComfyUI and how it was started, the model
files, the node set ComfyUI registered, the workflow as sent). The report groups hosts by
(profile, GPU class) and flags the fields in which a host differs from its group.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from provisioner.config.model import Profile
from provisioner.facts.model import Facts, Gpu
from provisioner.facts.parse import describe_nunchaku
from provisioner.resources import models, plugin

# In report order; every value is a string or None (unknown: never flagged).
FIELDS = ("gpu", "compute_capability", "vram", "ram", "driver", "cuda", "torch", "python", "nunchaku",
          "plugin_tag", "plugin_commit", "comfyui_version", "comfyui_commit", "launch_args", "object_info",
          "workflow")
MODEL_PREFIX = "model "          # a model file's field: "model models/diffusion_models/….safetensors"
NO_GPU_CLASS = "cpu"
_INTERFACE_DROP = ("options", "default", "tooltip")   # of a COMBO input: its choices come and go with files


def gpu_class(gpu: Gpu | None) -> str:
    """Hosts of one class should run alike: the GPU's name and its VRAM to the GiB
    ("NVIDIA A100-SXM4-80GB 80 GiB"); "cpu" without a GPU."""
    if gpu is None:
        return NO_GPU_CLASS
    return f"{gpu.name} {round(gpu.vram_total_mib / 1024)} GiB"


def class_slug(name: str) -> str:
    """A folder name for a GPU class: "nvidia-a100-sxm4-80gb-80-gib"."""
    return "-".join(re.findall(r"[a-z0-9]+", name.lower())) or NO_GPU_CLASS


def _interface(entry: Mapping[str, Any]) -> dict[str, Any]:
    """What a node class offers a workflow: its inputs (a COMBO's choices left out: they list the
    files of input/ and models/, which come and go), outputs and module."""
    inputs: dict[str, Any] = {}
    for part, specs in (entry.get("input") or {}).items():
        for name, spec in (specs.items() if isinstance(specs, Mapping) else ()):
            kind = spec[0] if isinstance(spec, list) and spec else spec
            config = spec[1] if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], Mapping) else {}
            if isinstance(kind, list) or kind == "COMBO":
                kind, config = "COMBO", {k: v for k, v in config.items() if k not in _INTERFACE_DROP}
            inputs[f"{part}.{name}"] = [kind, config]
    return {"input": inputs, "output": entry.get("output"), "output_is_list": entry.get("output_is_list"),
            "output_name": entry.get("output_name"), "output_node": entry.get("output_node"),
            "python_module": entry.get("python_module")}


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def node_classes(object_info: Mapping[str, Any]) -> dict[str, str]:
    """Each registered class with a short hash of its interface, sorted by name."""
    return {name: _sha256(_interface(entry))[:12] for name, entry in sorted(object_info.items())
            if isinstance(entry, Mapping)}


def node_set_hash(classes: Mapping[str, str]) -> str:
    return _sha256(dict(sorted(classes.items())))


def launch_args(argv: Sequence[str], port: int) -> str:
    """ComfyUI's command line as /system_stats gives it, with the port the profile gives this host
    written as `<comfyui.port>`: each host's own choice, and verification reached it there."""
    out = [str(a) for a in argv]
    for i, arg in enumerate(out[:-1]):
        if arg == "--port" and out[i + 1] == str(port):
            out[i + 1] = "<comfyui.port>"
    return " ".join(out)


@dataclass(frozen=True)
class Fingerprint:
    gpu_class: str
    fields: Mapping[str, str | None]                      # FIELDS
    models: Mapping[str, str | None] = field(default_factory=dict)   # path under the root -> sha256
    node_classes: Mapping[str, str] = field(default_factory=dict)    # class -> interface hash

    def flat(self) -> dict[str, str | None]:
        """Every compared field: FIELDS, then one per model file."""
        return {**{k: self.fields.get(k) for k in FIELDS},
                **{MODEL_PREFIX + path: sha for path, sha in sorted(self.models.items())}}

    def to_json(self, *, classes: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"gpu_class": self.gpu_class, **{k: self.fields.get(k) for k in FIELDS},
                               "models": dict(sorted(self.models.items()))}
        if classes:
            out["node_classes"] = dict(self.node_classes)
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], node_classes: Mapping[str, str] | None = None) -> Fingerprint:
        def text(value: Any) -> str | None:
            return None if value is None else str(value)

        return cls(str(raw.get("gpu_class") or NO_GPU_CLASS), {k: text(raw.get(k)) for k in FIELDS},
                   {str(k): text(v) for k, v in (raw.get("models") or {}).items()},
                   dict(node_classes if node_classes is not None else raw.get("node_classes") or {}))


def fingerprint(facts: Facts, profile: Profile, stats: Mapping[str, Any] | None,
                object_info: Mapping[str, Any] | None, graph: Mapping[str, Any] | None) -> Fingerprint:
    """The fingerprint from the host's facts and what ComfyUI said (None: it did not answer)."""
    gpu, env = facts.gpu, facts.env
    system = (stats or {}).get("system") or {}
    plug = facts.git.get(plugin.path(profile))
    core = facts.git.get(profile.comfyui.root)
    argv = system.get("argv")
    classes = node_classes(object_info) if object_info else {}
    cap = gpu.compute_capability if gpu else None
    commit = None
    if plug is not None and plug.head:
        commit = plug.head + (f" (modified: {len(plug.dirty)} files)" if plug.dirty else "")
    values: dict[str, str | None] = {
        "gpu": gpu.name if gpu else None,
        "compute_capability": f"{cap[0]}.{cap[1]}" if cap else None,
        "vram": f"{gpu.vram_total_mib / 1024:.2f} GiB" if gpu else None,
        "ram": f"{round(facts.ram_total_mib / 1024)} GiB" if facts.ram_total_mib else None,
        "driver": gpu.driver if gpu else None,
        "cuda": env.torch_cuda, "torch": env.torch, "python": env.version,
        "nunchaku": describe_nunchaku(env) if env.exists and env.version else None,
        "plugin_tag": (", ".join(plug.tags) or "no tag at HEAD") if plug is not None and plug.head else None,
        "plugin_commit": commit,
        "comfyui_version": system.get("comfyui_version") or facts.comfyui_version,
        "comfyui_commit": core.head if core is not None else None,
        "launch_args": launch_args(argv, profile.comfyui.port) if isinstance(argv, list) else None,
        "object_info": node_set_hash(classes) if classes else None,
        "workflow": _sha256(graph) if graph else None,
    }
    root = profile.comfyui.root.rstrip("/") + "/"
    files = {posixpath.relpath(p, root) if p.startswith(root) else p: facts.files[p].sha256
             for p in models.paths(profile, facts) if p in facts.files and facts.files[p].exists}
    return Fingerprint(gpu_class(gpu), values, files, classes)
