"""Everything a sandbox fleet needs beside its hosts, started together: the stand-ins for GitHub
releases, the Hugging Face Hub and the ComfyUI-nunchaku and ComfyUI git repositories, a pip
wheelhouse, a torch wheelhouse with a folder per CUDA build (PyTorch's indexes), and model files. Used by `make demo` and the end-to-end tests, so both exercise the same world.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from provisioner.catalog import models as catalog
from provisioner.sandbox.gitrepo import make_comfyui_repo, make_plugin_repo
from provisioner.sandbox.hf_server import HfServer, start_hf_server
from provisioner.sandbox.host import make_venv_template
from provisioner.sandbox.release_server import ReleaseServer, start_release_server
from provisioner.sandbox.wheels import (build_nunchaku_wheel_named, build_package_wheelhouse, build_torch_wheelhouse,
                                        current_python_tag)

BACKEND = ("nunchaku-tech", "nunchaku")
BACKEND_VERSION = "1.0.1"
RELEASE_ASSETS = Path(__file__).with_name("captures") / "nunchaku-releases" / "assets.json"


def release_assets() -> dict[str, list[str]]:
    """The real wheel names of each nunchaku release (captures/nunchaku-releases/README.md)."""
    return json.loads(RELEASE_ASSETS.read_text())["releases"]


def _release_wheels(out: Path) -> dict[tuple[str, str, str], list[Path]]:
    """Every real asset of every captured release, as a tiny real wheel. Upstream builds CPython
    3.10-3.13 only: on another interpreter the sandbox adds its tag to BACKEND_VERSION's release so
    the demo and the tests still run there (upstream would have no wheel for it)."""
    names = release_assets()
    tag = current_python_tag()
    if not any(f"-{tag}-" in n for n in names[BACKEND_VERSION]):
        names[BACKEND_VERSION] = [*names[BACKEND_VERSION],
                                  *(n.replace("-cp312-cp312-", f"-{tag}-{tag}-") for n in names[BACKEND_VERSION]
                                    if "-cp312-cp312-" in n)]
    return {(*BACKEND, f"v{version}"): [build_nunchaku_wheel_named(out / version, n) for n in listed]
            for version, listed in names.items()}


# Qwen-Image's transformer config as nunchaku's merge step stores it beside the weights (abridged).
_QWEN_CONFIG = {"_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
                "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24,
                "num_layers": 60, "out_channels": 16, "patch_size": 2}


def safetensors_standin(payload_bytes: int, label: str, *, precision: str | None = None,
                        rank: int | None = None) -> bytes:
    """A small but valid safetensors file (8-byte header length, JSON header, data). Given a
    precision and rank it is a nunchaku SVDQuant DiT: its `__metadata__` carries the keys upstream's
    merge step writes (config, comfy_config, model_class, quantization_config as JSON strings)."""
    count = max(1, payload_bytes // 4)
    metadata: dict[str, str] = {"format": "pt"}
    if precision is not None:
        metadata = {
            "config": json.dumps(_QWEN_CONFIG),
            "comfy_config": json.dumps({"model_class": "QwenImage", "sandbox_file": label}),
            "model_class": "NunchakuQwenImageTransformer2DModel",
            "quantization_config": json.dumps(catalog.quantization_config(precision, rank or catalog.DEFAULT_RANK)),
        }
    header = {"__metadata__": metadata,
              "weight": {"dtype": "F32", "shape": [count], "data_offsets": [0, 4 * count]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)            # the format pads the header to 8 bytes
    body = bytes((i * 37 + len(label)) % 251 for i in range(4 * count))
    return struct.pack("<Q", len(text)) + text + body


@dataclass
class World:
    root: Path
    release: ReleaseServer
    hub: HfServer
    plugin_repo: Path
    wheelhouse: Path
    venv_template: Path
    comfyui_repo: Path
    torch_wheelhouse: Path                     # cu124/, cu126/, ...: torch, torchvision, torchaudio
    files: Mapping[tuple[str, str], bytes] = field(default_factory=dict)

    @property
    def backend_repo_url(self) -> str:
        return self.release.repo_url(*BACKEND)

    def profile_overrides(self) -> dict[str, Any]:
        """Profile keys that point a profile at this world instead of GitHub and the Hub."""
        return {
            "plugin": {"repo": f"file://{self.plugin_repo}"},
            "backend": {"sources": [{"github": self.backend_repo_url}]},
            "pip": {"no_index": True, "find_links": [str(self.wheelhouse)]},
            "huggingface": {"endpoint": self.hub.url},
        }

    def core_overrides(self, version: str = "v0.3.64", torch: str = "2.6.0",
                       cuda: str = "12.4") -> dict[str, Any]:
        """`comfyui` keys of a ComfyUI provision makes: the stand-in ComfyUI repository at `version`,
        the venv's torch from the stand-in torch wheelhouse (`cuda` may be auto)."""
        return {"version": version, "repo": f"file://{self.comfyui_repo}",
                "torch": {"version": torch, "cuda": cuda, "index_url": None,
                          "find_links": [f"{self.torch_wheelhouse}/{{flavour}}"]}}

    def stop(self) -> None:
        self.release.stop()
        self.hub.stop()


def start_world(root: Path, *, family: str = "qwen-image-edit-2509",
                variants: Iterable[str] = ("lightning-4step-r128",), model_bytes: int = 2 << 20,
                torch: str = "2.6.0+cu124", hub_token: str | None = None,
                venv_template: bool = True) -> World:
    """Build the artefacts under `root` and start the servers (call `.stop()` when done).

    `hub_token`: every model repo is gated and needs this token, like a private or gated repo.
    `venv_template=False`: no sandbox venv is made (the caller brings real hosts, as the GPU run does).
    """
    root.mkdir(parents=True, exist_ok=True)
    release = start_release_server(_release_wheels(root / "release-assets"))
    files: dict[tuple[str, str], bytes] = {}
    for variant in variants:
        for precision in ("int4", "fp4"):
            f = catalog.dit_file(family, variant, precision)
            files[(f.repo, f.path_in_repo)] = safetensors_standin(model_bytes, f.filename, precision=precision,
                                                                  rank=catalog.rank_of(variant))
    for f in (catalog.TEXT_ENCODER, catalog.VAE):
        files[(f.repo, f.path_in_repo)] = safetensors_standin(model_bytes // 4, f.filename)
    gated = {repo for repo, _ in files} if hub_token else ()
    hub = start_hf_server(files, gated=gated, token=hub_token, commits=catalog.PINNED_REVISIONS)
    plugin_repo = root / "git" / "ComfyUI-nunchaku.git"
    if not plugin_repo.exists():
        make_plugin_repo(plugin_repo)
    comfyui_repo = root / "git" / "ComfyUI.git"
    if not comfyui_repo.exists():
        make_comfyui_repo(comfyui_repo)
    wheelhouse = build_package_wheelhouse(root / "wheelhouse")
    torch_wheelhouse = build_torch_wheelhouse(root / "torch")
    template = root / "venv-template"
    if venv_template and not (template / "bin" / "python").exists():
        make_venv_template(template, torch=torch)
    return World(root, release, hub, plugin_repo, wheelhouse, template, comfyui_repo, torch_wheelhouse, files)


def write_yaml(path: Path, data: Mapping[str, Any], comment: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    path.write_text(head + yaml.safe_dump(dict(data), sort_keys=False))
    return path
