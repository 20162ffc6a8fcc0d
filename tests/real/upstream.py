"""The real upstream pieces of the real tier, cached across runs on one machine.

Sources: `PROVISION_COMFYUI_REPO` and `PROVISION_PLUGIN_REPO` each name a git URL, a path (a
checkout or a bare repository) or a git bundle; a relative path is relative to the repository.
Unset, they are the public GitHub repositories. Each source is fetched into a bare mirror (tags
and branches only) under the cache and updated from its source at every session.

The real venv: torch, torchvision and torchaudio from the package index, then ComfyUI's
requirements.txt and `requests` (0.3.64 imports it without listing it). It is built once per
machine into the cache, in a folder named by a hash of everything it holds, so a changed pin or
requirements file builds a new one beside the old. A venv is not relocatable (its scripts name
its own path), so it is built in place under a lock and counts only once its manifest is written:
a build that was killed is found without one and built again. Hosts get hard-linked copies.

The real wheelhouse: the wheels of that venv (torch, torchvision, torchaudio and their CUDA
libraries, each ComfyUI tag's requirements.txt, `requests`), downloaded once with `pip download` into
`wheelhouse/<key>/` and kept: a host provision makes from nothing installs from it with `--no-index`,
offline, as an air-gapped fleet does from its mirror. Counted once its manifest is written.

`PROVISION_REAL_CACHE` is the cache folder (default `~/.cache/provision-real`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from provisioner.sandbox.host import own_scripts

REPO = Path(__file__).resolve().parents[2]
COMFYUI_REPO = "https://github.com/Comfy-Org/ComfyUI.git"
PLUGIN_REPO = "https://github.com/nunchaku-ai/ComfyUI-nunchaku.git"
# The recipe that runs ComfyUI v0.3.48, v0.3.60 and v0.3.64 on CPU: the three torch pins install
# together (the wheels carry CUDA libraries, unused on CPU); ComfyUI's own unpinned torch,
# torchvision and torchaudio are then satisfied. requirements.txt is read from this tag.
TORCH_PINS = ("torch==2.9.1", "torchvision==0.24.1", "torchaudio==2.9.*")
EXTRA = ("requests",)
REQUIREMENTS_TAG = "v0.3.64"
WHEELHOUSE_TAGS = ("v0.3.60", "v0.3.64")       # the tags a host made from nothing is pinned to in the tier
MANIFEST = "provision-real.json"
RECIPE = 1                       # bump when the build steps change in a way the inputs do not show


def cache_dir() -> Path:
    # Resolved: a venv's scripts name the path it was built at, and copies rewrite exactly that.
    return Path(os.environ.get("PROVISION_REAL_CACHE") or Path.home() / ".cache" / "provision-real").resolve()


def source(var: str, default: str) -> str:
    """The env var's source as git can fetch it: a URL as given, a path made absolute."""
    value = os.environ.get(var) or default
    if re.match(r"^[\w+.-]+://", value) or re.match(r"^[^/]+@[^/:]+:", value):
        return value
    path = Path(value).expanduser()
    path = path if path.is_absolute() else REPO / path
    if not path.exists():
        raise RuntimeError(f"{var}={value}: {path} does not exist (a git URL, a path or a .bundle)")
    return str(path.resolve())


def git(*args: str, cwd: Path | None = None, timeout: float = 900) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip()


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`: two test runs on one machine build one thing at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def requirements_at(comfyui_repo: Path, tag: str) -> str:
    """ComfyUI's requirements.txt at `tag`, as the real venv and the wheelhouse are keyed by it."""
    return git("-C", str(comfyui_repo), "show", f"{tag}:requirements.txt") + "\n"


def wheelhouse_requirements(comfyui_repo: Path) -> dict[str, str]:
    """What the real wheelhouse holds wheels for: each of WHEELHOUSE_TAGS's requirements.txt."""
    return {tag: requirements_at(comfyui_repo, tag) for tag in WHEELHOUSE_TAGS}


def mirror(src: str, cache: Path) -> Path:
    """A bare mirror of `src`'s branches and tags, created once (atomically), updated each call."""
    slug = re.sub(r"[^\w.-]+", "-", src.rstrip("/").rsplit("/", 1)[-1]).removesuffix(".git").removesuffix(".bundle")
    dest = cache / "git" / f"{slug}-{hashlib.sha256(src.encode()).hexdigest()[:12]}.git"
    refs = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
    with locked(dest.with_suffix(".lock")):
        if (dest / "HEAD").exists():
            git("-C", str(dest), "fetch", "--quiet", "--prune", "--force", src, *refs)
            return dest
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        git("init", "--quiet", "--bare", str(tmp))
        git("-C", str(tmp), "fetch", "--quiet", "--force", src, *refs)
        tmp.rename(dest)
    return dest


def venv_inputs(requirements: str) -> dict[str, object]:
    """Everything the real venv holds or depends on: its cache key is a hash of this."""
    return {"recipe": RECIPE, "python": sys.version, "implementation": sys.implementation.name,
            "machine": platform.machine(), "base_python": os.path.realpath(sys._base_executable),
            "pins": list(TORCH_PINS), "requirements": requirements, "extra": list(EXTRA)}


def venv_key(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def real_venv(cache: Path, requirements: str, say: Callable[[str], None] = print) -> Path:
    """The cached real venv for these requirements; built first when it is not there."""
    inputs = venv_inputs(requirements)
    dest = cache / "venvs" / venv_key(inputs)
    if _intact(dest, say):
        return dest
    with locked(dest.with_suffix(".lock")):
        if _intact(dest, say):                    # another run built it while we waited
            return dest
        shutil.rmtree(dest, ignore_errors=True)   # a build that was killed half-way
        log = dest.with_suffix(".log")
        say(f"building the real ComfyUI venv (once per machine, a few minutes): {dest} (log: {log})")
        started = time.monotonic()
        req_file = dest.with_suffix(".requirements.txt")
        req_file.write_text(requirements)
        python = str(dest / "bin" / "python")
        with open(log, "w") as out:
            for argv in ([sys.executable, "-m", "venv", str(dest)],
                         [python, "-m", "pip", "install", *TORCH_PINS],
                         [python, "-m", "pip", "install", "-r", str(req_file), *EXTRA]):
                out.write(f"$ {' '.join(argv)}\n")
                out.flush()
                if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(f"building the real venv failed: {' | '.join(tail)} (log: {log})")
        freeze = _frozen(Path(python))
        manifest = {**inputs, "freeze": freeze, "build_seconds": round(time.monotonic() - started, 1)}
        tmp = dest / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.rename(dest / MANIFEST)               # the venv counts from here on
        say(f"built the real venv in {manifest['build_seconds']} s")
    return dest


def _frozen(python: Path) -> list[str]:
    return subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True,
                          check=True).stdout.split()


def _intact(dest: Path, say: Callable[[str], None]) -> bool:
    """Built, and still holding exactly what it was built with: something installed into the cache
    by hand (it is a real venv anyone can run) would make every host start with it."""
    if not (dest / MANIFEST).exists():
        return False
    recorded = json.loads((dest / MANIFEST).read_text()).get("freeze")
    now = _frozen(dest / "bin" / "python")
    if now == recorded:
        return True
    extra = sorted(set(now) - set(recorded or ()))
    say(f"the cached real venv changed since it was built ({', '.join(extra[:3]) or 'packages removed'}): "
        "building it again")
    (dest / MANIFEST).unlink()
    return False


def copy_venv(cached: Path, dest: Path) -> Path:
    """A hard-linked copy of the cached venv (no space, ~1 s), its scripts made its own: pip
    installing into the copy writes new files and unlinks old ones, never touching the cache.
    Where the cache is on another file system than the tests' temp folder, a full copy."""
    if subprocess.run(["cp", "-al", str(cached), str(dest)], capture_output=True).returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        subprocess.run(["cp", "-a", str(cached), str(dest)], check=True)
    (dest / MANIFEST).unlink()
    own_scripts(dest, cached)
    return dest


def wheelhouse(cache: Path, requirements: dict[str, str], say: Callable[[str], None] = print) -> Path:
    """The cached wheelhouse holding the real venv's wheels for every ComfyUI tag in `requirements`
    (tag -> its requirements.txt); downloaded first when it is not there."""
    inputs = {"recipe": RECIPE, "python": sys.version, "machine": platform.machine(), "pins": list(TORCH_PINS),
              "requirements": requirements, "extra": list(EXTRA)}
    dest = cache / "wheelhouse" / venv_key(inputs)
    if (dest / MANIFEST).exists():
        return dest
    with locked(dest.with_suffix(".lock")):
        if (dest / MANIFEST).exists():
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        log = dest.with_suffix(".log")
        say(f"downloading the real ComfyUI wheels (once per machine, a few minutes): {dest} (log: {log})")
        started = time.monotonic()
        with open(log, "w") as out:
            for tag, text in sorted(requirements.items()):  # one resolution per tag: their frontends differ
                req_file = dest.with_name(f"{dest.name}.{tag}.requirements.txt")
                req_file.write_text(text)
                argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
                        "-d", str(dest), *TORCH_PINS, "-r", str(req_file), *EXTRA]
                out.write(f"$ {' '.join(argv)}\n")
                out.flush()
                if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(f"downloading the real wheels failed: {' | '.join(tail)} (log: {log})")
        manifest = {**inputs, "wheels": sorted(p.name for p in dest.glob("*.whl")),
                    "download_seconds": round(time.monotonic() - started, 1)}
        (dest / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1))
        (dest / (MANIFEST + ".tmp")).rename(dest / MANIFEST)
        say(f"downloaded {len(manifest['wheels'])} wheels in {manifest['download_seconds']} s")
    return dest
