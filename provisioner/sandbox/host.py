"""A sandbox GPU host on this machine: a ComfyUI checkout, its real venv, and an nvidia-smi shim."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version

from provisioner.catalog.compat import EDIT_NODES, FAMILY_NODES, LAST_WITHOUT_QWEN_IMAGE
from provisioner.errors import ProvisionError
from provisioner.sandbox import nvidia_smi
from provisioner.sandbox.wheels import build_torch_wheel, build_torchvision_wheel, cuda_of

H100_CAPTURE = Path(__file__).with_name("captures") / "h100-80gb" / "nvidia-smi-query.csv"
STATE_FILE = "gpu-state.json"
# Cut-off as in resources/compat.py: upstream added `use_additional_t_cond` (Qwen-Image-Layered,
# Comfy-Org/ComfyUI #11408, Dec 2025) after 0.5.1; the sandbox gives it to cores >= 0.6.0.
T_COND_SINCE = Version("0.6.0")
# Core 0.23 moved apply_rotary_emb out of comfy/ldm/qwen_image/model.py; core PR #14364 put the name
# back (ComfyUI-nunchaku#820, #822): the stand-in's 0.23.x has the broken shape.
ROTARY_MOVED = (Version("0.23.0"), Version("0.24.0"))
# The Qwen edit text encoders of ComfyUI core (comfy_extras/nodes_qwen.py, 0.3.60 has both).
EDIT_NODES_PY = (
    '"""Sandbox stand-in for ComfyUI core\'s Qwen-Image-Edit text encoder nodes."""\n\n\n'
    "class TextEncodeQwenImageEdit:\n    CATEGORY = \"advanced/conditioning\"\n\n\n"
    "class TextEncodeQwenImageEditPlus:\n    CATEGORY = \"advanced/conditioning\"\n"
)
MODEL_DIRS = {  # the placeholder files a real checkout ships in each models/ folder
    "diffusion_models": "put_diffusion_model_files_here",
    "text_encoders": "put_text_encoder_files_here",
    "vae": "put_vae_here",
    "loras": "put_loras_here",
}


@dataclass(frozen=True)
class SandboxHost:
    root: Path
    comfyui_root: Path
    venv: Path
    python: Path                 # venv/bin/python: always run pip as `python -m pip`
    bin_dir: Path                # holds nvidia-smi; first on this host's PATH
    gpu_state: Path              # JSON {"memory_used_mib": N} read by the shim
    gpu: str | None
    torch: str | None
    comfyui_version: str | None          # None: a bare host (no ComfyUI, no venv)

    @property
    def path(self) -> str:
        """The PATH for this host: bin_dir first; with gpu=None, no other nvidia-smi either."""
        rest = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d]
        if self.gpu is None:
            rest = [d for d in rest if not os.access(Path(d) / "nvidia-smi", os.X_OK)]
        return os.pathsep.join([str(self.bin_dir), *rest])

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """A full environment (os.environ or `base`) with this host's PATH."""
        return {**(os.environ if base is None else base), "PATH": self.path}


def _h100_capture() -> dict:
    row = next(csv.reader(H100_CAPTURE.read_text().splitlines(), skipinitialspace=True))
    index, name, gpu_uuid, total, used, free, driver, cc, bus = row
    reserved = int(total) - int(used) - int(free)
    return dict(index=int(index), name=name, uuid=gpu_uuid, total=int(total), used=int(used),
                reserved=reserved, driver=driver, cc=cc, bus=bus)


def gpu_config(gpu: str, state_file: Path) -> dict:
    """The CONFIG baked into a host's nvidia-smi for a preset name, or several joined by commas
    (`rtx5090,rtx3090`: GPU 0 and GPU 1, on their own PCI buses)."""
    names = gpu.split(",")
    for name in names:
        if name not in nvidia_smi.PRESETS or (name == "broken-driver" and len(names) > 1):
            known = ", ".join(sorted(nvidia_smi.PRESETS))
            raise ProvisionError(f"sandbox gpu {name!r} is not a preset; use one of: {known}, or None")
    if gpu == "broken-driver":
        return {"broken": True}
    cards = []
    for index, name in enumerate(names):
        seed = name if index == 0 else f"{name}#{index}"
        card = {**nvidia_smi.PRESETS[name], "index": index, "uuid": f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, seed)}"}
        if name == "h100":
            card.update(_h100_capture(), index=index)
        if index:
            card["bus"] = f"00000000:{0x01 + 0x20 * index:02X}:00.0"
        cards.append(card)
    return {"gpus": cards, "state": str(state_file)}


def install_nvidia_smi(bin_dir: Path, config: dict, python: str = sys.executable) -> Path:
    """Write bin_dir/nvidia-smi: the shim's own source with CONFIG filled in (values, not paths),
    run by `python` (a host's own python3 when bin_dir is inside another root)."""
    source = Path(nvidia_smi.__file__).read_text()
    marker = "CONFIG: dict = {}  # replaced by host.py in the installed copy"
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!{python}\n" + source.replace(marker, f"CONFIG: dict = {config!r}", 1))
    script.chmod(0o755)
    return script


def set_vram_used(host_root_or_state_file: Path, mib: int) -> None:
    """Make the host's nvidia-smi report `mib` MiB used on GPU 0 (free shrinks to match)."""
    path = Path(host_root_or_state_file)
    nvidia_smi.write_state(path / STATE_FILE if path.is_dir() else path, mib)


def _pip(python: Path, *args: str) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
           "PIP_CONFIG_FILE": os.devnull, "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise ProvisionError(f"sandbox: `pip {' '.join(args[:2])}` in {python} failed: {tail}")


def installed_torch(venv: Path) -> str | None:
    """The torch version a venv holds, read from its dist-info (no interpreter start)."""
    for meta in venv.glob("lib/python3*/site-packages/torch-*.dist-info/METADATA"):
        for line in meta.read_text().splitlines():
            if line.startswith("Version: "):
                return line.removeprefix("Version: ").strip()
    return None


def _set_torch(venv: Path, torch: str | None) -> None:
    """torch and its paired torchvision, as every ComfyUI venv has them (or neither)."""
    if installed_torch(venv) == torch:
        return
    python = venv / "bin" / "python"
    if torch is None:
        _pip(python, "uninstall", "--yes", "torch", "torchvision")
        return
    # By name from a --find-links folder, as from PyTorch's index: pip records no direct_url.json,
    # so the venv reads as the real world's (torch an index install, which a rollback must fetch
    # from the torch index again), not as installed from a file that is gone.
    with tempfile.TemporaryDirectory(prefix="sandbox-torch-") as tmp:
        build_torch_wheel(Path(tmp), torch, cuda_of(torch))
        vision = build_torchvision_wheel(Path(tmp), torch)
        pins = (f"torch=={torch}", f"torchvision=={vision.name.split('-')[1]}")
        _pip(python, "install", "--no-index", "--find-links", tmp, "--no-deps", "--force-reinstall", *pins)


def make_venv_template(path: Path, torch: str | None = "2.6.0+cu124", *, base_python: str | None = None) -> Path:
    """A real venv with pip (and the tiny torch) to copy into many hosts: built once per session."""
    path = Path(path)
    proc = subprocess.run([base_python or sys.executable, "-m", "venv", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProvisionError(f"sandbox: cannot create venv {path}: {proc.stderr.strip()[-200:]}")
    _set_torch(path, torch)
    return path


# comfyui-frontend-package pinned by each real release's requirements.txt (checked in the real tags);
# a later stand-in version keeps 0.3.64's.
FRONTENDS = {"0.3.48": "1.23.4", "0.3.60": "1.26.13", "0.3.64": "1.27.10"}
# As the real repository ignores them: what ComfyUI's users add never dirties the checkout.
GITIGNORE = ("__pycache__/\n/output/\n/input/\n/models/\n/temp/\n/custom_nodes/\n"
             "!custom_nodes/example_node.py.example\nvenv/\n.venv/\n/user/\n*.log\n")


def comfyui_files(version: str) -> dict[str, str]:
    """The stand-in ComfyUI core of `version`, file by file: what a sandbox host has, and what each
    tag of the stand-in ComfyUI repository (gitrepo.py) holds."""
    t_cond = Version(version) >= T_COND_SINCE
    extra = "use_additional_t_cond=False, " if t_cond else ""
    rotary = "" if ROTARY_MOVED[0] <= Version(version) < ROTARY_MOVED[1] else (
        "def apply_rotary_emb(x, freqs_cis):\n    return x\n\n\n")
    model = (
        '"""Sandbox stand-in for ComfyUI core\'s Qwen-Image model (the real class is a torch nn.Module)."""\n\n\n'
        + rotary +
        "class QwenTimestepProjEmbeddings:\n"
        f"    def __init__(self, embedding_dim, pooled_projection_dim, {extra}"
        "dtype=None, device=None, operations=None):\n"
        "        self.embedding_dim = embedding_dim\n"
        "        self.pooled_projection_dim = pooled_projection_dim\n"
        + ("        self.use_additional_t_cond = use_additional_t_cond\n" if t_cond else "")
    )
    main = (
        '"""Sandbox stand-in for ComfyUI\'s main.py: the sandbox ComfyUI server, serving this checkout as real\n'
        'ComfyUI would (its custom_nodes/, the venv running it, CUDA_VISIBLE_DEVICES, --listen, --port)."""\n'
        "import os\nimport sys\n\n"
        f"sys.path.append({str(Path(__file__).resolve().parents[2])!r})  # where provisioner.sandbox lives\n"
        "from provisioner.sandbox import comfyui_process  # noqa: E402\n\n"
        "sys.exit(comfyui_process.main_py(os.path.dirname(os.path.abspath(__file__)), sys.argv[1:]))\n"
    )
    frontend = FRONTENDS.get(version) or FRONTENDS["0.3.64"]
    return {
        "main.py": main,
        "comfyui_version.py": (
            "# This file is automatically generated by the build process when version is\n"
            f'# updated in pyproject.toml.\n__version__ = "{version}"\n'
        ),
        "pyproject.toml": f'[project]\nname = "ComfyUI"\nversion = "{version}"\nrequires-python = ">=3.9"\n',
        "requirements.txt": f"comfyui-frontend-package=={frontend}\ntorch\ntorchvision\nsafetensors\naiohttp\n"
                            "pyyaml\nPillow\n",
        ".gitignore": GITIGNORE,
        "custom_nodes/example_node.py.example": "# Sandbox stand-in for ComfyUI's example custom node.\n",
        **({"comfy/ldm/qwen_image/model.py": model} if Version(version) > LAST_WITHOUT_QWEN_IMAGE else {}),
        **({EDIT_NODES: EDIT_NODES_PY} if Version(version) >= FAMILY_NODES["qwen-image-edit-2509"][1] else {}),
        **{f"models/{d}/{marker}": "" for d, marker in MODEL_DIRS.items()},
        "output/_output_images_will_be_put_here": "",
    }


def own_scripts(venv: Path, template: Path) -> None:
    """Point a copied venv's scripts (bin/pip, activate) at the copy: their shebangs name the
    template's python, so `venv/bin/pip` would install into the template. Each is replaced by a
    new file, never rewritten in place: in a hard-linked copy that would rewrite the template's."""
    old, new = str(Path(template).resolve()).encode(), str(venv).encode()
    for script in (venv / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            text = script.read_bytes()
            if old in text:
                mode = script.stat().st_mode & 0o7777
                script.unlink()
                script.write_bytes(text.replace(old, new))
                script.chmod(mode)


def make_sandbox_host(
    root: Path,
    *,
    gpu: str | None = "rtx3090",
    torch: str | None = "2.6.0+cu124",
    comfyui_version: str | None = "0.3.64",
    venv_template: Path | None = None,
) -> SandboxHost:
    """Lay out a GPU host under root: ComfyUI/ (checkout + venv), bin/nvidia-smi, gpu-state.json.
    `comfyui_version` None: a bare host, with no ComfyUI and no venv (ComfyUI/ is where they would go)."""
    root = Path(root).resolve()
    comfy = root / "ComfyUI"
    config = gpu_config(gpu, root / STATE_FILE) if gpu is not None else None  # bad preset: fail first
    venv = comfy / "venv"
    if comfyui_version is not None:
        for rel, text in comfyui_files(comfyui_version).items():
            (comfy / rel).parent.mkdir(parents=True, exist_ok=True)
            (comfy / rel).write_text(text)
        for empty in ("custom_nodes", "user", "input"):
            (comfy / empty).mkdir(parents=True, exist_ok=True)
        if venv_template is not None:
            shutil.copytree(venv_template, venv, symlinks=True)
            own_scripts(venv, venv_template)
            _set_torch(venv, torch)
        else:
            make_venv_template(venv, torch)
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    state = root / STATE_FILE
    if config is not None:
        install_nvidia_smi(bin_dir, config)
        if not config.get("broken"):
            set_vram_used(state, config["gpus"][0]["used"])
    return SandboxHost(root=root, comfyui_root=comfy, venv=venv, python=venv / "bin" / "python",
                       bin_dir=bin_dir, gpu_state=state, gpu=gpu, torch=torch if comfyui_version else None,
                       comfyui_version=comfyui_version)


def read_gpu_state(state_file: Path) -> dict:
    """The shim's state (for tests and the ComfyUI stand-in)."""
    return json.loads(Path(state_file).read_text())
