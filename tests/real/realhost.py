"""A real test host: a ComfyUI checkout at a tag, a hard-linked copy of the cached real venv,
ComfyUI run on CPU by service.py (its `restart` returns before ComfyUI listens), an sshd."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import upstream
from lab import REPO, Lab, service_port
from service import running_pid
from service_manager import stop_all as stop_units
from sshd import SshdHost, free_port, install_service_manager

SERVICE = Path(__file__).with_name("service.py")
TEMPLATES = Path(__file__).with_name("templates")
SMOKE_TEMPLATE = "smoke-invert.json.j2"       # model-free: runs on real ComfyUI on a CPU
READY_TIMEOUT_S = 300.0          # ComfyUI starts in ~5 s on an idle 2-core machine; CI may be loaded
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def real_lab_settings(lab: Lab, plugin_repo: Path) -> None:
    """The real tier's profile: the real plugin at v1.1.0, backend 1.2.1 (the real venv's torch is
    2.9.1+cu128, and of upstream's releases only 1.2.1 has a wheel built for torch 2.9 with CUDA
    12.8), int4 so plans are decided without a GPU, and a model-free workflow (LoadImage of the
    checkout's example.png -> ImageInvert -> ImageAddNoise, seeded so no warm run is served from the cache -> SaveImage) with `verify.family_nodes: false`, which the
    readiness wait after a restart follows too: no nunchaku backend runs on a CPU."""
    lab.base_profile = REPO / "profiles" / "base.yaml"
    lab.profile_extra = {"plugin": {"repo": str(plugin_repo), "tag": "v1.1.0"},
                         "backend": {"version": "1.2.1"}, "model": {"precision": "int4"},
                         "workflow": {"template_dir": str(TEMPLATES), "templates": [SMOKE_TEMPLATE]},
                         "verify": {"family_nodes": False}}
    lab.write()


def http_json(url: str, timeout: float = 30.0) -> Any:
    with NO_PROXY.open(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class RealHost:
    """A test host running real ComfyUI; `root` holds the checkout (`comfy`), `service/`, `bin/`."""

    name: str
    sshd: SshdHost | None                  # None: a ComfyUI server only, reached over HTTP
    root: Path
    port: int
    tag: str

    @property
    def comfy(self) -> Path:
        return self.root / "ComfyUI"

    @property
    def venv(self) -> Path:
        return self.comfy / "venv"

    @property
    def plugin(self) -> Path:
        return self.comfy / "custom_nodes" / "ComfyUI-nunchaku"

    @property
    def service(self) -> Path:
        return self.root / "service"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def provision_vars(self) -> dict[str, Any]:
        return {"comfyui": {"root": str(self.comfy), "port": self.port, "restart": {
            "command": [sys.executable, str(SERVICE), "restart", str(self.service)]}}}

    def _service(self, action: str) -> None:
        """As the host runs it: a process of its own, so ComfyUI is nobody's child here."""
        subprocess.run([sys.executable, str(SERVICE), action, str(self.service)], check=True,
                       capture_output=True)

    def start(self) -> None:
        self._service("start")

    def stop(self) -> None:
        self._service("stop")

    def pid(self) -> int | None:
        return running_pid(self.service)

    def log(self) -> str:
        """ComfyUI's console since its last start."""
        text = (self.service / "comfyui.log").read_text(errors="replace")
        return text[text.rfind("=== start"):]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        """/system_stats once ComfyUI answers; a ComfyUI that exited fails at once, with its log."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return http_json(self.url + "/system_stats", timeout=5)
            except OSError:                 # refused until ComfyUI has imported everything
                if self.pid() is None:
                    raise AssertionError(f"ComfyUI on {self.name} exited:\n{self.log()[-3000:]}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"ComfyUI on {self.name} did not answer in {timeout:g} s:\n"
                                         f"{self.log()[-3000:]}") from None
                time.sleep(0.25)

    def git(self, *args: str) -> str:
        return upstream.git("-C", str(self.plugin), *args)


def make_real_host(root: Path, name: str, comfyui_repo: Path, tag: str, venv: Path,
                   sshd: SshdHost | None = None) -> RealHost:
    """Clone ComfyUI at `tag`, give it a copy of the real venv and a service (not started)."""
    host = RealHost(name, sshd, root, free_port(), tag)
    upstream.git("clone", "--quiet", "--no-checkout", str(comfyui_repo), str(host.comfy))
    upstream.git("-C", str(host.comfy), "checkout", "--quiet", "--detach", tag)
    upstream.copy_venv(venv, host.venv)
    host.service.mkdir(parents=True)
    argv = [str(host.venv / "bin" / "python"), "main.py", "--cpu", "--listen", "127.0.0.1",
            "--port", str(host.port), "--disable-auto-launch"]
    (host.service / "service.json").write_text(json.dumps({"argv": argv, "cwd": str(host.comfy)}))
    return host


@dataclass
class BareRealHost:
    """A host with nothing of ComfyUI on it (python3, git, a systemd: the service manager of the tests):
    provision clones the real ComfyUI, makes the real venv from the real wheelhouse, writes the unit
    that runs real ComfyUI on CPU, under `root`."""

    name: str
    sshd: SshdHost
    root: Path
    port: int

    @property
    def comfy(self) -> Path:
        return self.root / "ComfyUI"

    @property
    def unit_dir(self) -> Path:
        return self.root / "etc" / "systemd" / "system"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def provision_vars(self) -> dict[str, Any]:
        """ComfyUI on CPU, as provision's own unit (there is no GPU here)."""
        return {"comfyui": {"root": str(self.comfy), "port": self.port, "restart": None, "service": "systemd",
                            "unit_dir": str(self.unit_dir), "args": ["--cpu", "--disable-auto-launch"],
                            "allow_root": True}}     # the test hosts' roots are root's: said explicitly

    def journal(self, unit: str = "comfyui") -> str:
        return subprocess.run([str(self.root / "bin" / "journalctl"), "-u", unit, "-n", "2000", "--no-pager"],
                              capture_output=True, text=True).stdout

    def stop(self) -> None:
        stop_units(str(self.root / "systemd"))


def make_bare_host(root: Path, name: str, sshd: SshdHost) -> BareRealHost:
    install_service_manager(root / "bin", root / "etc" / "systemd" / "system", root / "systemd")
    return BareRealHost(name, sshd, root, service_port())
