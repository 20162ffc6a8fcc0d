"""The real-hosts tier: provision against REAL systemd (a Debian rootfs booted by systemd-nspawn,
reached over its own sshd on 127.0.0.1) and REAL Docker (a dockerd started by hand), running REAL
ComfyUI on CPU from the upstream repositories of the real tier (tests/real/upstream.py: the same
mirrors and the same wheelhouse, bound read-only into the hosts). Selected with `-m hosts`
(`make test-hosts`); root only, skipped with the reason elsewhere. tests/hosts/machines.py is the
harness; docs/testing.md says what it costs.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "real"))    # the real tier's helpers

import machines  # noqa: E402
import upstream  # noqa: E402
from lab import Lab, open_lab  # noqa: E402
from machines import Machine, make_machine  # noqa: E402
from realhost import real_lab_settings  # noqa: E402


def _say(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """A line on the terminal, uncaptured: a build takes minutes."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")

    def say(line: str) -> None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
    return say


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Where this machine cannot run the tier, each of its tests is skipped saying why, before any
    fixture (the upstream mirrors, the stand-ins) is made for it."""
    tier = [item for item in items if item.get_closest_marker("hosts")]
    reason = machines.unable() if tier else None
    for item in tier if reason else ():
        item.add_marker(pytest.mark.skip(reason=f"the real-hosts tier {reason}"))


@pytest.fixture(scope="session")
def hosts_cache() -> Path:
    return machines.cache_dir()


@pytest.fixture(scope="session")
def base_rootfs(hosts_cache: Path, request: pytest.FixtureRequest) -> Path:
    return machines.rootfs(hosts_cache, _say(request))


@pytest.fixture(scope="session")
def real_cache() -> Path:
    return upstream.cache_dir()


@pytest.fixture(scope="session")
def comfyui_repo(real_cache: Path) -> Path:
    return upstream.mirror(upstream.source("PROVISION_COMFYUI_REPO", upstream.COMFYUI_REPO), real_cache)


@pytest.fixture(scope="session")
def plugin_repo(real_cache: Path) -> Path:
    return upstream.mirror(upstream.source("PROVISION_PLUGIN_REPO", upstream.PLUGIN_REPO), real_cache)


@pytest.fixture(scope="session")
def real_wheelhouse(real_cache: Path, comfyui_repo: Path, request: pytest.FixtureRequest) -> Path:
    return upstream.wheelhouse(real_cache, upstream.wheelhouse_requirements(comfyui_repo), _say(request))


@pytest.fixture(scope="session")
def hosts_lab(tmp_path_factory: pytest.TempPathFactory, plugin_repo: Path) -> Iterator[Lab]:
    """The stand-ins of the real tier (backend release, packages, models) and its profile; every
    host joins its inventory, tests pick theirs with --limit."""
    with open_lab(tmp_path_factory.mktemp("hosts-lab"), venv_template=False) as lab:
        real_lab_settings(lab, plugin_repo)
        yield lab


@pytest.fixture(scope="session")
def boot(hosts_lab: Lab, base_rootfs: Path, hosts_cache: Path, real_cache: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Machine]]:
    """Factory: `boot(name)` → a booted host, a copy of the rootfs. What the tests made on this
    machine (the stand-ins' wheelhouses, pytest's temp folders) and the real tier's cache (mirrors,
    wheelhouse) are bound read-only at their own paths, as a fleet's shared mirror would be. Every
    host is powered off and its copy removed at the end of the session."""
    made: list[Machine] = []
    hosts_dir = hosts_cache / "hosts"
    binds = (tmp_path_factory.getbasetemp(), real_cache)

    def make(name: str) -> Machine:
        machine = make_machine(hosts_lab.fleet, base_rootfs, hosts_dir, f"{name}-{os.getpid()}", binds=binds)
        made.append(machine)
        machine.boot()
        return machine

    yield make
    for machine in made:
        machine.stop()
        shutil.rmtree(machine.root, ignore_errors=True)
        machine.log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def dockerd(hosts_cache: Path) -> Iterator[machines.Dockerd]:
    """A dockerd of the tier's own (its socket under /run, its data root in the cache, locked: one
    daemon per data root); its containers removed and it stopped at the end of the session."""
    if shutil.which("dockerd") is None:
        pytest.skip("the real-hosts tier's Docker cases need dockerd (apt-get install docker.io)")
    with machines.locked(hosts_cache / "docker.lock"):
        daemon = machines.Dockerd(hosts_cache / "docker", Path(f"/run/{machines.LABEL}-{os.getpid()}"))
        try:
            daemon.start()
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture(scope="session")
def base_image(dockerd: machines.Dockerd, base_rootfs: Path) -> str:
    """The rootfs as an image (no registry here), kept in the daemon's data root."""
    return dockerd.import_rootfs(base_rootfs)


@pytest.fixture(scope="session")
def comfyui_image(dockerd: machines.Dockerd, base_image: str, comfyui_repo: Path, real_wheelhouse: Path,
                  request: pytest.FixtureRequest) -> str:
    """The seed's image: real ComfyUI v0.3.64 in /opt/ComfyUI with its venv (torch and the tag's
    requirements.txt from the real wheelhouse, offline), on the rootfs imported as an image. Made
    once per machine (kept in the daemon's data root, tagged by a hash of what it holds)."""
    return machines.comfyui_image(dockerd, base_image, comfyui_repo, real_wheelhouse,
                                  upstream.REQUIREMENTS_TAG, upstream.TORCH_PINS, upstream.EXTRA, _say(request))
