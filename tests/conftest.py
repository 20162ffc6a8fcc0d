"""Shared fixtures: real OpenSSH servers on loopback (see tests/sshd.py)."""

from __future__ import annotations

import http.server
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import smallfs
from sshd import LIVE, SSHD, SshdFleet, SshdHost

from provisioner.config.records import CACHE_ENV

# A suite a shell started in the background inherits SIGINT ignored, and so would every provision it
# spawns (an ignored signal survives exec): the Ctrl-C tests send SIGINT as a terminal would.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test shows why its real sshd servers ended connections: a lost connection in CI is
    then diagnosed from the report, not guessed at (paramiko races, a killed session, a timeout)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        said = "\n".join(text for fleet in list(LIVE) if (text := fleet.endings()))
        if said:
            report.sections.append(("sshd logs: why connections ended", said))


@pytest.fixture(scope="module", autouse=True)
def _control_cache_per_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The control machine's Hub record (resources/hub_cache.py) of this module's fixtures: never the
    user's own, and never another module's (a later Hub stand-in may reuse an earlier one's port)."""
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("control-cache"))
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture(autouse=True)
def _control_cache_per_test(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """... and each test its own."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("control-cache")))

@pytest.fixture(scope="session")
def sshd_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdFleet]:
    """Servers shared by the whole session; tests must not change their keys or stop them."""
    if not os.path.exists(SSHD):
        pytest.skip("needs OpenSSH server (apt-get install openssh-server)")
    fleet = SshdFleet(tmp_path_factory.mktemp("sshd-shared"))
    yield fleet
    fleet.stop_all()


@pytest.fixture(scope="session")
def sshd_host(sshd_fleet: SshdFleet) -> SshdHost:
    """One shared server, started once per session (read-only use: run, put into tmp dirs)."""
    if not sshd_fleet.hosts:
        sshd_fleet.add(1, names=["shared-01"])
    return sshd_fleet.hosts[0]


@pytest.fixture
def sshd_hosts(tmp_path: Path) -> Iterator[Callable[..., list[SshdHost]]]:
    """Factory: `sshd_hosts(n, bin_dirs=[...], names=[...], trusted=True)` → fresh servers, own
    client key / ssh_config / known_hosts, stopped when the test ends. Free to break (keys, stop)."""
    if not os.path.exists(SSHD):
        pytest.skip("needs OpenSSH server (apt-get install openssh-server)")
    fleet = SshdFleet(tmp_path / "sshd")

    def make(n: int = 1, **kw: object) -> list[SshdHost]:
        return fleet.add(n, **kw)  # type: ignore[arg-type]

    make.fleet = fleet  # type: ignore[attr-defined]
    yield make
    fleet.stop_all()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Factory: `small_fs(nbytes)` → a folder on a size-limited tmpfs of its own (a disk that fills),
    unmounted at the end. Skipped, saying why, where it cannot mount (smallfs.py)."""
    mounted: list[Path] = []

    def make(nbytes: int) -> Path:
        where = smallfs.mount(tmp_path / f"small-fs-{len(mounted)}", nbytes)
        mounted.append(where)
        return where

    yield make
    for where in reversed(mounted):
        smallfs.unmount(where)


@pytest.fixture
def http_port() -> Iterator[int]:
    """A local HTTP server answering `hello from PATH`: what tunnels are tested against."""
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"hello from {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
