"""Everything a sandbox fleet needs beside its hosts, started together: the stand-ins for GitHub
releases, the Hugging Face Hub and the ComfyUI-nunchaku git repository, a pip wheelhouse, and
model files. Used by `make demo` and the end-to-end tests, so both exercise the same world.
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
from provisioner.sandbox.gitrepo import make_plugin_repo
from provisioner.sandbox.hf_server import HfServer, start_hf_server
from provisioner.sandbox.host import make_venv_template
from provisioner.sandbox.release_server import ReleaseServer, start_release_server
from provisioner.sandbox.wheels import build_nunchaku_wheel, build_package_wheelhouse, current_python_tag

BACKEND = ("nunchaku-tech", "nunchaku")
BACKEND_VERSION = "1.0.1"
# The release's real matrix is wider; a few combinations are enough to make "no wheel for torch X"
# list real alternatives. The current interpreter's tag is always included so hosts can install.
TORCHES = ("2.5", "2.6", "2.7", "2.8")
PYTHON_TAGS = ("cp310", "cp311", "cp312")


def safetensors_standin(payload_bytes: int, label: str) -> bytes:
    """A small but valid safetensors file (8-byte header length, JSON header, data)."""
    count = max(1, payload_bytes // 4)
    header = {"__metadata__": {"format": "pt", "provision": f"sandbox stand-in for {label}"},
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

    def stop(self) -> None:
        self.release.stop()
        self.hub.stop()


def start_world(root: Path, *, family: str = "qwen-image-edit-2509",
                variants: Iterable[str] = ("lightning-4step-r128",), model_bytes: int = 2 << 20,
                torch: str = "2.6.0+cu124", hub_token: str | None = None,
                backend_version: str = BACKEND_VERSION, torches: Iterable[str] = TORCHES) -> World:
    """Build the artefacts under `root` and start the servers (call `.stop()` when done).

    `hub_token`: every model repo is gated and needs this token, like a private or gated repo.
    `backend_version`, `torches`: the backend release served and the torch builds it has wheels for
    (hosts with a real torch 2.9 need a release that has `+torch2.9` wheels, as 1.1.0 does).
    """
    root.mkdir(parents=True, exist_ok=True)
    wheels = root / "release-assets"
    tags = sorted({*PYTHON_TAGS, current_python_tag()})
    assets = [build_nunchaku_wheel(wheels, backend_version, t, py, "linux_x86_64")
              for t in torches for py in tags]
    release = start_release_server({(*BACKEND, f"v{backend_version}"): assets})
    files: dict[tuple[str, str], bytes] = {}
    for variant in variants:
        for precision in ("int4", "fp4"):
            f = catalog.dit_file(family, variant, precision)
            files[(f.repo, f.path_in_repo)] = safetensors_standin(model_bytes, f.filename)
    for f in (catalog.TEXT_ENCODER, catalog.VAE):
        files[(f.repo, f.path_in_repo)] = safetensors_standin(model_bytes // 4, f.filename)
    gated = {repo for repo, _ in files} if hub_token else ()
    hub = start_hf_server(files, gated=gated, token=hub_token)
    plugin_repo = root / "git" / "ComfyUI-nunchaku.git"
    if not plugin_repo.exists():
        make_plugin_repo(plugin_repo)
    wheelhouse = build_package_wheelhouse(root / "wheelhouse")
    template = root / "venv-template"
    if not (template / "bin" / "python").exists():
        make_venv_template(template, torch=torch)
    return World(root, release, hub, plugin_repo, wheelhouse, template, files)


def write_yaml(path: Path, data: Mapping[str, Any], comment: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    path.write_text(head + yaml.safe_dump(dict(data), sort_keys=False))
    return path
