"""Local bare git repos standing in for nunchaku-ai/ComfyUI-nunchaku and Comfy-Org/ComfyUI, with stable
SHAs and upstream's tags (lightweight, on main)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

from packaging.version import Version

from provisioner.catalog.requirements import PLUGIN_REQUIREMENTS
from provisioner.errors import ProvisionError

# Upstream tag dates (git for-each-ref of the real repo); upstream tags are lightweight release tags.
RELEASES: tuple[tuple[str, str], ...] = (
    ("v1.0.0", "2025-09-05T00:27:23-04:00"),
    ("v1.0.2", "2025-11-02T00:53:26-04:00"),
    ("v1.1.0", "2025-12-26T22:46:08-08:00"),
    ("v1.2.0", "2026-01-12T00:59:05-08:00"),
)
T_COND_SINCE = Version("1.2.0")  # first plugin release passing use_additional_t_cond to the core
# requirements.txt of a tag the catalog does not know (a release made with add_plugin_tag)
REQUIREMENTS = ("diffusers>=0.35", "transformers>=4.54", "huggingface_hub>=0.34", "peft>=0.17", "accelerate>=1.10")
IDENTITY = {"name": "Sandbox Maintainer", "email": "sandbox@example.invalid"}


def _init_py(version: str) -> str:
    return f'''"""Sandbox stand-in for ComfyUI-nunchaku {version}: the start-up banner and backend check."""
import logging
from importlib.metadata import PackageNotFoundError, version

logger = logging.getLogger("ComfyUI-nunchaku")
min_nunchaku_version = "1.0.0"
__version__ = "{version}"

logger.info("=" * 40 + " ComfyUI-nunchaku Initialization " + "=" * 40)
try:
    nunchaku_version = version("nunchaku")
except PackageNotFoundError:
    nunchaku_version = None
    logger.info("Nunchaku version: Package 'nunchaku' not found.")
else:
    logger.info(f"Nunchaku version: {{nunchaku_version}}")
logger.info(f"ComfyUI-nunchaku version: {{__version__}}")


def _release(text):
    return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())


if nunchaku_version is None:
    logger.warning(f"Could not parse nunchaku version: Package 'nunchaku' not found.. "
                   f"Please ensure you have at least v{{min_nunchaku_version}}.")
elif _release(nunchaku_version) < _release(min_nunchaku_version):
    logger.warning(f"ComfyUI-nunchaku {{__version__}} requires nunchaku >= v{{min_nunchaku_version}}, "
                   f"but found nunchaku {{nunchaku_version}}. Please update nunchaku.")

NODE_CLASS_MAPPINGS = {{}}
try:
    from .nodes.models.qwenimage import NunchakuQwenImageDiTLoader

    NODE_CLASS_MAPPINGS["NunchakuQwenImageDiTLoader"] = NunchakuQwenImageDiTLoader
except ImportError:
    logger.exception("Node `NunchakuQwenImageDiTLoader` import failed:")
NODE_DISPLAY_NAME_MAPPINGS = {{k: k for k in NODE_CLASS_MAPPINGS}}
'''


def _qwenimage_py(version: str) -> str:
    t_cond = Version(version) >= T_COND_SINCE
    param = " use_additional_t_cond=False," if t_cond else ""
    kwarg = "\n            use_additional_t_cond=use_additional_t_cond," if t_cond else ""
    return f'''"""Sandbox stand-in for ComfyUI-nunchaku {version}'s Qwen-Image DiT loader."""
import nunchaku  # noqa: F401  (the real module imports nunchaku.utils here)
# As the real models/qwenimage.py (v1.0.0-v1.2.1): a core without apply_rotary_emb here (0.23) fails
# this import, and the loader is not registered.
from comfy.ldm.qwen_image.model import QwenTimestepProjEmbeddings, apply_rotary_emb  # noqa: F401


class NunchakuQwenImageDiTLoader:
    CATEGORY = "Nunchaku"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_model"

    def load_model(self, model_name, cpu_offload="auto", num_blocks_on_gpu=1,{param} **kwargs):
        # Built when the node runs: an older ComfyUI core fails here, not at import.
        time_text_embed = QwenTimestepProjEmbeddings(
            embedding_dim=3072,
            pooled_projection_dim=768,{kwarg}
        )
        return ((model_name, cpu_offload, time_text_embed),)
'''


def plugin_tree(version: str) -> dict[str, str]:
    """The files of one plugin release (version without the `v`)."""
    return {
        "__init__.py": _init_py(version),
        "pyproject.toml": (
            f'[project]\nname = "comfyui-nunchaku"\nversion = "{version}"\n'
            'description = "Nunchaku ComfyUI Node. Nunchaku is the inference that supports SVDQuant."\n'
        ),
        "requirements.txt": "\n".join(PLUGIN_REQUIREMENTS.get(f"v{version}", REQUIREMENTS)) + "\n",
        "nodes/__init__.py": "",
        "nodes/models/__init__.py": "",
        "nodes/models/qwenimage.py": _qwenimage_py(version),
    }


def _git(git_dir: Path, work: Path | None, *args: str, date: str | None = None) -> str:
    env = {**os.environ, "GIT_DIR": str(git_dir), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
           "GIT_AUTHOR_NAME": IDENTITY["name"], "GIT_AUTHOR_EMAIL": IDENTITY["email"],
           "GIT_COMMITTER_NAME": IDENTITY["name"], "GIT_COMMITTER_EMAIL": IDENTITY["email"]}
    if work is not None:
        env["GIT_WORK_TREE"] = str(work)
    if date is not None:
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = date
    proc = subprocess.run(["git", *args], cwd=work or git_dir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProvisionError(f"sandbox git repo {git_dir}: `git {args[0]}` failed: {proc.stderr.strip()[-200:]}")
    return proc.stdout.strip()


def _commit_release(git_dir: Path, tag: str, date: str, tree: dict[str, str] | None = None) -> str:
    """Commit the tree of release `tag` (the plugin's, unless given) on main, tag it (lightweight),
    return the commit SHA."""
    with tempfile.TemporaryDirectory(prefix="sandbox-release-") as tmp:
        work = Path(tmp)
        for rel, text in (tree if tree is not None else plugin_tree(tag.removeprefix("v"))).items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_text(text)
        if _has_commits(git_dir):
            _git(git_dir, work, "read-tree", "HEAD")  # index = previous release, so `add -A` records deletions
        _git(git_dir, work, "add", "-A", "--force")   # as upstream tracks its placeholders under ignored folders
        _git(git_dir, work, "commit", "--quiet", "--no-verify", "-m", f"release {tag}", date=date)
    _git(git_dir, None, "tag", tag)
    return _git(git_dir, None, "rev-parse", "HEAD")


def _has_commits(git_dir: Path) -> bool:
    return bool(_git(git_dir, None, "for-each-ref", "--count=1", "refs/heads"))


def make_plugin_repo(path: Path) -> Path:
    """Create a bare repo at path with one commit per release in RELEASES, tagged like upstream."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _git(path, None, "init", "--quiet", "--bare", "--initial-branch=main")
    for tag, date in RELEASES:
        _commit_release(path, tag, date)
    return path


def add_plugin_tag(path: Path, tag: str) -> str:
    """A new release on main (tree of that version), one day after the newest commit; returns its SHA."""
    if not tag.startswith("v"):
        raise ProvisionError(f"sandbox plugin tag {tag!r}: tags look like v1.2.1")
    Version(tag[1:])
    last = _git(Path(path), None, "log", "-1", "--format=%cI", "main")
    date = (datetime.fromisoformat(last) + timedelta(days=1)).isoformat()
    return _commit_release(Path(path), tag, date)


# Upstream tag dates of the ComfyUI releases the stand-in core knows (Comfy-Org/ComfyUI).
COMFYUI_RELEASES: tuple[tuple[str, str], ...] = (
    ("v0.3.48", "2025-08-01T12:00:00+00:00"),
    ("v0.3.60", "2025-09-23T12:00:00+00:00"),
    ("v0.3.64", "2025-10-08T12:00:00+00:00"),
)


def make_comfyui_repo(path: Path, releases: tuple[tuple[str, str], ...] = COMFYUI_RELEASES) -> Path:
    """A bare repo standing in for ComfyUI: one commit per release whose tree is the sandbox's stand-in
    core of that version (host.comfyui_files: Qwen-Image from 0.3.60, the Edit-2509 nodes, its
    requirements.txt pinning that release's frontend), tagged like upstream."""
    from provisioner.sandbox.host import comfyui_files

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _git(path, None, "init", "--quiet", "--bare", "--initial-branch=master")
    for tag, date in releases:
        _commit_release(path, tag, date, comfyui_files(tag.removeprefix("v")))
    return path
