"""The real-upstream tier: REAL ComfyUI (on CPU, in a real venv) and the REAL ComfyUI-nunchaku
repository on hosts behind real sshd servers. Selected with `-m real` (`make test-real`); the
default run leaves it out. tests/real/upstream.py says where the sources and the venv come from.

A real host: a clone of ComfyUI at a tag, a hard-linked copy of the cached real venv in its
`venv/`, ComfyUI run on CPU by tests/real/service.py (whose `restart` returns before ComfyUI
listens, as `systemctl restart` does), an sshd whose PATH holds no `nvidia-smi` of ours. What
cannot run here stays a stand-in from the sandbox world: the backend wheel (nunchaku needs a
GPU; the release stand-in serves `nunchaku 1.2.1+cu12.8torch2.9` wheels with no code), the Python
packages (diffusers, peft, accelerate: the stand-in wheelhouse) and the model files (the Hub
stand-in). The profile pins `model.precision: int4`, so plans are decided without a GPU.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import upstream
from lab import Lab, open_lab
from realhost import BareRealHost, RealHost, make_bare_host, make_real_host, real_lab_settings

# -- session: sources, the venv, one lab ---------------------------------------------------------

@pytest.fixture(scope="session")
def real_cache() -> Path:
    return upstream.cache_dir()


@pytest.fixture(scope="session")
def comfyui_repo(real_cache: Path) -> Path:
    """Bare mirror of ComfyUI (PROVISION_COMFYUI_REPO): tags v0.3.48, v0.3.60, v0.3.64 at least."""
    return upstream.mirror(upstream.source("PROVISION_COMFYUI_REPO", upstream.COMFYUI_REPO), real_cache)


@pytest.fixture(scope="session")
def plugin_repo(real_cache: Path) -> Path:
    """Bare mirror of ComfyUI-nunchaku (PROVISION_PLUGIN_REPO): its release tags."""
    return upstream.mirror(upstream.source("PROVISION_PLUGIN_REPO", upstream.PLUGIN_REPO), real_cache)


@pytest.fixture(scope="session")
def real_venv(real_cache: Path, comfyui_repo: Path, request: pytest.FixtureRequest) -> Path:
    requirements = upstream.requirements_at(comfyui_repo, upstream.REQUIREMENTS_TAG)
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")

    def say(line: str) -> None:          # a build takes minutes: say so on the terminal, uncaptured
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)

    return upstream.real_venv(real_cache, requirements, say)


@pytest.fixture(scope="session")
def real_wheelhouse(real_cache: Path, comfyui_repo: Path, request: pytest.FixtureRequest) -> Path:
    """The real venv's wheels, for v0.3.60's and v0.3.64's requirements: what a host made from
    nothing installs from, offline."""
    requirements = upstream.wheelhouse_requirements(comfyui_repo)
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")

    def say(line: str) -> None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)

    return upstream.wheelhouse(real_cache, requirements, say)


@pytest.fixture
def bare_host(real_lab: Lab, tmp_path: Path) -> Iterator[Callable[..., BareRealHost]]:
    """Factory: `bare_host()` → a host with no ComfyUI in the lab's inventory; at the end the units
    provision started there stop, and its venv goes."""
    made: list[BareRealHost] = []

    def make(name: str | None = None) -> BareRealHost:
        name = name or f"bare-{len(real_lab.hosts) + 1:02d}"
        (sshd,) = real_lab.fleet.add(1, names=[name], bin_dirs=[tmp_path / name / "bin"])
        host = make_bare_host(tmp_path / name, name, sshd)
        made.append(host)
        real_lab.attach(host)
        return host

    yield make
    for host in made:
        host.stop()
        host.sshd.stop()
        shutil.rmtree(host.comfy / "venv", ignore_errors=True)


@pytest.fixture(scope="session")
def real_lab(tmp_path_factory: pytest.TempPathFactory, plugin_repo: Path) -> Iterator[Lab]:
    """One lab for the whole tier: stand-ins for the backend release, packages and models; every
    host joins its inventory, tests pick theirs with --limit. Backend 1.2.1: the real venv's torch
    is 2.9.1+cu128, and of upstream's releases only 1.2.1 has a wheel built for torch 2.9 with CUDA
    12.8 (1.1.0's and 1.2.0's +torch2.9 wheels were built with CUDA 13.0).

    No nunchaku backend runs without a GPU, so the model family's nodes never register here: the
    profile verifies with a model-free workflow (LoadImage of the checkout's example.png ->
    ImageInvert -> SaveImage) and `verify.family_nodes: false`, which the readiness wait after a
    restart follows too. A test that wants the family's nodes required sets it back for its host
    (`lab.overlays`)."""
    with open_lab(tmp_path_factory.mktemp("real-lab")) as lab:
        real_lab_settings(lab, plugin_repo)
        yield lab


@pytest.fixture
def real_host(real_lab: Lab, comfyui_repo: Path, real_venv: Path,
              tmp_path: Path) -> Iterator[Callable[..., RealHost]]:
    """Factory: `real_host(tag="v0.3.64", start=True, name=None)` → a host in the lab's inventory,
    its ComfyUI started (not waited for); at the end its ComfyUI and sshd stop, its venv goes."""
    made: list[RealHost] = []

    def make(tag: str = "v0.3.64", *, start: bool = True, name: str | None = None,
             patch: Callable[[Path], None] | None = None) -> RealHost:
        name = name or f"real-{len(real_lab.hosts) + 1:02d}"
        root = tmp_path / name
        (sshd,) = real_lab.fleet.add(1, names=[name], bin_dirs=[root / "bin"])
        host = make_real_host(root, name, comfyui_repo, tag, real_venv, sshd)
        if patch:
            patch(host.comfy)
        made.append(host)
        real_lab.attach(host)
        if start:
            host.start()
        return host

    yield make
    for host in made:
        host.stop()
        if host.sshd:
            host.sshd.stop()
        shutil.rmtree(host.venv, ignore_errors=True)


@pytest.fixture(scope="session")
def real_comfyui(tmp_path_factory: pytest.TempPathFactory, comfyui_repo: Path, plugin_repo: Path,
                 real_venv: Path) -> Iterator[RealHost]:
    """One real ComfyUI v0.3.64 with the real ComfyUI-nunchaku v1.1.0 (no backend), reached over
    HTTP only: what the stand-in is held against and the websocket client is tested on. Tests
    share it: each uses its own output prefix and never relies on queue numbers."""
    root = tmp_path_factory.mktemp("real-comfyui")
    host = make_real_host(root, "real-comfyui", comfyui_repo, "v0.3.64", real_venv)
    upstream.git("clone", "--quiet", "--no-checkout", str(plugin_repo), str(host.plugin))
    upstream.git("-C", str(host.plugin), "checkout", "--quiet", "--detach", "v1.1.0")
    host.start()
    try:
        host.wait_ready()
        yield host
    finally:
        host.stop()
        shutil.rmtree(host.venv, ignore_errors=True)
