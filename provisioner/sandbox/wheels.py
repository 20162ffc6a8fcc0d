"""Real, pip-installable wheels built in-process: tiny torch, nunchaku, its PyPI impostor, a wheelhouse."""

from __future__ import annotations

import base64
import hashlib
import re
import sys
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from provisioner.catalog import wheels
from provisioner.catalog.requirements import backend_requires

NUNCHAKU_HOME = "https://github.com/nunchaku-tech/nunchaku"
NUNCHAKU_SUMMARY = "Nunchaku: high-performance inference engine for 4-bit diffusion models (SVDQuant)"
IMPOSTOR_SUMMARY = "Optimally partition data into piece-wise linear segments (data segmentation)"
TORCH_SUMMARY = "Tensors and Dynamic neural networks in Python with strong GPU acceleration"

# Fixed zip timestamps: the same inputs give byte-identical wheels (stable sha256 for tests).
_ZIP_DATE = (2025, 1, 1, 0, 0, 0)
_GENERATOR = "provisioner-sandbox (1.0)"


def current_python_tag() -> str:
    """The CPython tag of the running interpreter, e.g. `cp311`."""
    impl = {"cpython": "cp", "pypy": "pp"}.get(sys.implementation.name, "py")
    return f"{impl}{sys.version_info.major}{sys.version_info.minor}"


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _escape(name: str) -> str:
    # Wheel file names and dist-info folders use the normalised name with `_` (PEP 427 / 491).
    return re.sub(r"[-_.]+", "_", str(canonicalize_name(name)))


def _metadata(name: str, version: str, summary: str, home: str, requires: Iterable[str]) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    if summary:
        lines.append(f"Summary: {summary}")
    if home:
        lines.append(f"Home-page: {home}")
    lines += [f"Requires-Dist: {req}" for req in requires]
    return "\n".join(lines) + "\n\n"


def build_wheel(
    out_dir: Path,
    name: str,
    version: str,
    files: Mapping[str, str],
    *,
    tag: str = "py3-none-any",
    requires: Iterable[str] = (),
    summary: str = "",
    home: str = "",
) -> Path:
    """Write `NAME-VERSION-TAG.whl` into out_dir with `files` (archive path -> text) and valid RECORD."""
    Version(version)  # reject what pip would reject, here rather than at install time
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{_escape(name)}-{version}"
    dist_info = f"{stem}.dist-info"
    purelib = tag.endswith("-none-any")
    meta = {
        f"{dist_info}/METADATA": _metadata(name, version, summary, home, requires),
        f"{dist_info}/WHEEL": (
            f"Wheel-Version: 1.0\nGenerator: {_GENERATOR}\n"
            f"Root-Is-Purelib: {'true' if purelib else 'false'}\nTag: {tag}\n\n"
        ),
    }
    entries = [(path, text.encode()) for path, text in {**files, **meta}.items()]
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in entries)
    entries.append((f"{dist_info}/RECORD", (record + f"{dist_info}/RECORD,,\n").encode()))
    wheel = out_dir / f"{stem}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in entries:
            info = zipfile.ZipInfo(path, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return wheel


def cuda_of(torch_version: str) -> str | None:
    """CUDA version implied by a torch local version: `2.6.0+cu124` -> `12.4`, `+cpu` -> None."""
    local = Version(torch_version).local or ""
    match = re.fullmatch(r"cu(\d+)(\d)", local)
    return f"{match[1]}.{match[2]}" if match else None


def build_torch_wheel(out_dir: Path, version: str = "2.6.0+cu124", cuda: str | None = "12.4") -> Path:
    """A few-KB `torch` whose metadata and torch/version.py read like the real one's."""
    version_py = (
        "from typing import Optional\n\n"
        "__all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip']\n"
        f"__version__ = {version!r}\n"
        "debug = False\n"
        f"cuda: Optional[str] = {cuda!r}\n"
        "git_version = '0000000000000000000000000000000000000000'\n"
        "hip: Optional[str] = None\n"
        "xpu: Optional[str] = None\n"
    )
    init_py = (
        '"""Sandbox stand-in for torch: metadata and version only, no tensors."""\n'
        "from torch.version import __version__, cuda as _cuda  # noqa: F401\n"
    )
    return build_wheel(
        out_dir, "torch", version,
        {"torch/__init__.py": init_py, "torch/version.py": version_py},
        summary=TORCH_SUMMARY, home="https://pytorch.org/",
    )


def build_torchvision_wheel(out_dir: Path, torch_version: str = "2.6.0+cu124") -> Path:
    """The torchvision paired with a torch build (2.6.0+cu124 -> 0.21.0+cu124), pinned to it like
    the real one: ComfyUI's venvs have it, and nunchaku requires torchvision>=0.20."""
    torch = Version(torch_version)
    version = f"0.{torch.minor + 15}.{torch.micro}" + (f"+{torch.local}" if torch.local else "")
    return build_wheel(out_dir, "torchvision", version,
                       {"torchvision/__init__.py": f'"""Sandbox stand-in for torchvision."""\n__version__ = {version!r}\n'},
                       requires=[f"torch=={torch_version}"], summary="image and video datasets and models for torch deep learning",
                       home="https://github.com/pytorch/vision")


def build_torchaudio_wheel(out_dir: Path, torch_version: str = "2.6.0+cu124") -> Path:
    """The torchaudio of a torch build (the same version, 2.6.0+cu124), pinned to it like the real one."""
    return build_wheel(out_dir, "torchaudio", torch_version,
                       {"torchaudio/__init__.py": f'"""Sandbox stand-in for torchaudio."""\n__version__ = {torch_version!r}\n'},
                       requires=[f"torch=={torch_version}"], summary="An audio package for PyTorch",
                       home="https://github.com/pytorch/audio")


# The torch builds of the stand-in PyTorch index, one folder per CUDA flavour as download.pytorch.org
# has one index per flavour (cu124/, cu126/, cu128/, cu130/).
TORCH_BUILDS = ("2.6.0+cu124", "2.6.0+cu126", "2.8.0+cu126", "2.8.0+cu128", "2.9.1+cu128", "2.9.1+cu130")


def build_torch_wheelhouse(out_dir: Path, builds: Iterable[str] = TORCH_BUILDS) -> Path:
    """`out_dir/cuXYZ/`: torch, torchvision and torchaudio of each build, for `--find-links
    out_dir/{flavour}` (the sandbox's stand-in for PyTorch's per-flavour indexes)."""
    out_dir = Path(out_dir)
    for build in builds:
        folder = out_dir / (Version(build).local or "cpu")
        build_torch_wheel(folder, build, cuda_of(build))
        build_torchvision_wheel(folder, build)
        build_torchaudio_wheel(folder, build)
    return out_dir


def nunchaku_wheel_name(version: str, torch: str, python_tag: str, platform: str, cuda: str | None = None) -> str:
    """The release asset name: `nunchaku-1.0.1+torch2.6-cp312-...`, `nunchaku-1.2.1+cu12.8torch2.9-...`."""
    host = wheels.HostTorch(Version(f"{torch}.0"), cuda)
    return wheels.wheel_filename(version, host, python_tag, platform)


def build_nunchaku_wheel(
    out_dir: Path,
    version: str = "1.0.1",
    torch: str = "2.6",
    python_tag: str = "cp312",
    platform: str = "linux_x86_64",
    cuda: str | None = None,
) -> Path:
    """The real backend's wheel, in name and metadata (`1.0.1+torch2.6`, `1.2.1+cu12.8torch2.9` with
    `cuda`), with no compiled code."""
    return build_nunchaku_wheel_named(out_dir, nunchaku_wheel_name(version, torch, python_tag, platform, cuda))


def build_nunchaku_wheel_named(out_dir: Path, filename: str, *, import_error: str | None = None) -> Path:
    """Exactly the release asset `filename`, as a tiny real wheel carrying the release's Requires-Dist.
    `import_error`: importing it fails as a wheel built for another torch does, with the error's
    text after `ImportError: ` (its `_C` extension's path is put in front, like the real one's)."""
    version = parse_wheel_filename(filename)[1]
    init_py = (
        '"""Sandbox stand-in for the nunchaku backend (SVDQuant INT4/FP4 kernels live upstream)."""\n'
        f"__version__ = {str(version)!r}\n"
    )
    if import_error:
        init_py += ("import os as _os\n"
                    "raise ImportError(_os.path.join(_os.path.dirname(__file__), '_C.so') + ': ' + "
                    f"{import_error!r})\n")
    tag = "-".join(filename[:-len(".whl")].split("-")[-3:])
    return build_wheel(
        out_dir, "nunchaku", str(version), {"nunchaku/__init__.py": init_py}, tag=tag,
        requires=backend_requires(version.public) or (), summary=NUNCHAKU_SUMMARY, home=NUNCHAKU_HOME,
    )


def build_impostor_nunchaku(out_dir: Path) -> Path:
    """PyPI's unrelated `nunchaku` 0.16.1, what a bare `pip install nunchaku` brings."""
    init_py = (
        '"""Sandbox stand-in for PyPI\'s unrelated nunchaku (data segmentation, not diffusion)."""\n'
        "__version__ = '0.16.1'\n"
    )
    return build_wheel(out_dir, "nunchaku", "0.16.1", {"nunchaku/__init__.py": init_py}, summary=IMPOSTOR_SUMMARY)


# What ComfyUI-nunchaku and the backend's Requires-Dist need beside torch (an old diffusers and peft
# too, for hosts that ran the seed's unquoted install).
STAND_INS: tuple[tuple[str, str], ...] = (
    ("diffusers", "0.34.0"), ("diffusers", "0.35.2"), ("diffusers", "0.36.0"), ("peft", "0.16.0"),
    ("peft", "0.17.1"), ("transformers", "4.57.1"), ("accelerate", "1.11.0"), ("einops", "0.8.1"),
    ("huggingface-hub", "0.35.3"), ("protobuf", "6.32.1"), ("sentencepiece", "0.2.1"),
    # the stand-in ComfyUI core's requirements.txt (sandbox/host.py), frontends of each of its releases
    ("safetensors", "0.6.2"), ("aiohttp", "3.12.15"), ("pyyaml", "6.0.2"), ("pillow", "11.3.0"),
    ("comfyui-frontend-package", "1.23.4"), ("comfyui-frontend-package", "1.26.13"),
    ("comfyui-frontend-package", "1.27.10"),
)


# Stand-ins that depend on another: pinning tokenizers 0.22.2 makes pip's resolver move
# huggingface-hub 0.35.3 -> 0.34.4 as well (the tokenizers pin that moved huggingface_hub
# without the plan showing it). The older hub is below the newest, so nothing else resolves to it.
DEPENDENT: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("huggingface-hub", "0.34.4", ()),
    ("tokenizers", "0.22.1", ("huggingface-hub>=0.34",)),
    ("tokenizers", "0.22.2", ("huggingface-hub>=0.34,<0.35",)),
)


def build_package_wheelhouse(out_dir: Path, names: Iterable[str] | None = None) -> Path:
    """A --find-links folder with stand-ins for what ComfyUI-nunchaku requires beside the backend
    (`names`: only those): no dependencies, except DEPENDENT's."""
    out_dir = Path(out_dir)
    only = None if names is None else set(names)
    for name, version, requires in [(n, v, ()) for n, v in STAND_INS] + list(DEPENDENT):
        if only is not None and name not in only:
            continue
        init_py = f'"""Sandbox stand-in for {name} {version}."""\n__version__ = {version!r}\n'
        build_wheel(
            out_dir, name, version, {f"{name}/__init__.py": init_py}, requires=requires,
            summary=f"Sandbox stand-in for {name} {version} (no code; lets pip resolve offline)",
        )
    return out_dir
