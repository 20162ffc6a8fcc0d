"""The one desired state all three tools express, and the change the "plan after a change" case makes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from bench.hosts import REPO
from provisioner.catalog import models as catalog
from provisioner.sandbox.world import BACKEND_VERSION, World

FAMILY, VARIANT = "qwen-image-edit-2509", "lightning-4step-r128"
TEMPLATE_DIR = REPO / "templates"
TEMPLATE = "qwen-image-edit-lightning.json.j2"
WORKFLOW_JSON = "workflows/qwen-image-edit-lightning.json"   # relative to the ComfyUI root
PLUGIN_DIR = "custom_nodes/ComfyUI-nunchaku"
# Pinned, all present in the sandbox wheelhouse (provision's base profile asks for floors): what
# ComfyUI-nunchaku and nunchaku 1.0.1's Requires-Dist need beside torch and torchvision.
PACKAGES = ("diffusers==0.35.2", "peft==0.17.1", "transformers==4.57.1", "accelerate==1.11.0", "einops==0.8.1",
            "huggingface-hub==0.35.3", "protobuf==6.32.1", "sentencepiece==0.2.1")
BACKEND_PIN = f"nunchaku=={BACKEND_VERSION}+torch2.6"   # the sandbox hosts carry torch 2.6.0+cu124


@dataclass(frozen=True)
class ModelDownload:
    url: str          # the Hub stand-in's resolve URL (302 to its CDN, as on the real Hub)
    dest: str         # relative to the ComfyUI root
    sha256: str
    size: int


@dataclass(frozen=True)
class DesiredState:
    plugin_repo: Path
    plugin_tag: str
    seed: int                         # the template value the change case edits
    wheelhouse: Path
    backend_dir: Path                 # the release's wheel files, for the peers' pinned backend
    hub_endpoint: str
    models: tuple[ModelDownload, ...]

    def template_vars(self) -> dict[str, object]:
        """What the workflow template gets; provision computes the same values from its facts."""
        sel = catalog.resolve(FAMILY, VARIANT, "int4", None)
        return {
            "model_name": sel.dit.filename, "text_encoder": sel.text_encoder.filename,
            "vae": sel.vae.filename, "precision": "int4", "cpu_offload": "disable",
            "num_blocks_on_gpu": 1, "use_pin_memory": "disable", "steps": sel.steps, "shift": 1.0,
            "cfg": 1.0, "sampler": "euler", "scheduler": "beta", "width": 1024, "height": 1024,
            "seed": self.seed, "prompt": "a red fox in the snow, photograph", "image": "example.png",
        }

    def changed(self) -> DesiredState:
        """A new template value and another plugin tag: what `plan` must then report per host."""
        return replace(self, plugin_tag="v1.0.2", seed=self.seed + 1)

    def tag_moved(self) -> DesiredState:
        """One change: the plugin at another tag (what an upgrade wave moves)."""
        return replace(self, plugin_tag="v1.0.2")


def desired_state(world: World) -> DesiredState:
    """The state of the RTX 3090 sandbox host: int4 DiT, text encoder and VAE from the Hub stand-in."""
    sel = catalog.resolve(FAMILY, VARIANT, "int4", None)
    models = []
    for f in sel.files:
        data = world.files[(f.repo, f.path_in_repo)]
        models.append(ModelDownload(
            url=f"{world.hub.url}/{f.repo}/resolve/{f.revision or 'main'}/{f.path_in_repo}",
            dest=f"models/{f.folder}/{f.filename}", sha256=hashlib.sha256(data).hexdigest(),
            size=len(data)))
    return DesiredState(plugin_repo=world.plugin_repo, plugin_tag="v1.1.0", seed=42,
                        wheelhouse=world.wheelhouse, backend_dir=world.root / "release-assets" / BACKEND_VERSION,
                        hub_endpoint=world.hub.url, models=tuple(models))
