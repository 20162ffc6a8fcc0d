"""A sandbox fleet for end-to-end tests: sandbox GPU hosts behind real sshd servers, the stand-in
world (release server, Hub, git repo, wheelhouse), a ComfyUI stand-in process per host, and the
profile + inventory that point `provision` at all of it. Commands run through the real CLI.

A lab host is anything with a name, an sshd, the `provision:` variables of its inventory entry
and a `stop()`: `LabHost` here (a sandbox host and the ComfyUI stand-in), `RealHost` in
tests/real/ (real ComfyUI in a real venv).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from service_manager import stop_all as stop_units
from sshd import SshdFleet, SshdHost, free_port, install_service_manager, inventory_for

from provisioner import cli
from provisioner.sandbox import comfyui_process
from provisioner.sandbox.host import SandboxHost, make_sandbox_host
from provisioner.sandbox.world import World, start_world, write_yaml

REPO = Path(__file__).resolve().parents[1]
# Seconds a lab ComfyUI takes to open its port after a (re)start: a restart returns long before it
# listens, as `systemctl restart` and `docker restart` do, so every apply here waits for readiness.
STARTUP_S = 1.0


class AnyHost(Protocol):
    name: str
    sshd: SshdHost

    def provision_vars(self) -> dict[str, Any]: ...

    def stop(self) -> None: ...


@dataclass
class LabHost:
    name: str
    sandbox: SandboxHost
    sshd: SshdHost
    port: int                                   # the ComfyUI stand-in's
    managed: bool = False                       # provision makes ComfyUI and its unit (comfyui.service: systemd)

    @property
    def comfy(self) -> Path:
        return self.sandbox.comfyui_root

    @property
    def unit_dir(self) -> Path:
        """Where this host's systemd (tests/service_manager.py) reads unit files: comfyui.unit_dir."""
        return self.sandbox.root / "etc" / "systemd" / "system"

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """This host's systemctl, as provision runs it there."""
        return subprocess.run([str(self.sandbox.bin_dir / "systemctl"), *args], capture_output=True, text=True)

    def journal(self, unit: str = "comfyui") -> str:
        return subprocess.run([str(self.sandbox.bin_dir / "journalctl"), "-u", unit, "-n", "400", "--no-pager"],
                              capture_output=True, text=True).stdout

    @property
    def plugin(self) -> Path:
        return self.comfy / "custom_nodes" / "ComfyUI-nunchaku"

    def pip(self, *args: str) -> None:
        subprocess.run([str(self.sandbox.python), "-m", "pip", "install", "-q", "--no-index",
                        "--disable-pip-version-check", *args], check=True)

    def git(self, *args: str) -> str:
        return subprocess.run(["git", "-C", str(self.plugin), *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    def comfyui_args(self, *args: str) -> None:
        """Stand-in flags for its next (re)starts, beside the lab's start-up delay."""
        comfyui_process.set_args(self.comfy, ("--startup-s", str(STARTUP_S), *args))

    def under_systemd(self, unit: str = "comfyui", then: str = "", listen: str = "127.0.0.1") -> dict[str, Any]:
        """Run this host's ComfyUI as a systemd unit written by hand (the seed's own setup): its main.py
        from its venv, `then` as ExecStartPost (run before `systemctl restart` returns). Returns its
        `comfyui` keys: provision restarts that unit (`comfyui.restart.systemd`)."""
        post = f"ExecStartPost=/bin/sh -c {json.dumps(then)}\n" if then else ""
        (self.unit_dir / f"{unit}.service").write_text(
            f"[Unit]\nDescription=ComfyUI (written by hand)\n\n[Service]\nWorkingDirectory={self.comfy}\n"
            f"ExecStart={self.sandbox.python} {self.comfy}/main.py --listen {listen} --port {self.port}\n{post}"
            "\n[Install]\nWantedBy=multi-user.target\n")
        comfyui_process.stop(self.comfy)
        for args in (("daemon-reload",), ("enable", unit), ("start", unit)):
            assert self.systemctl(*args).returncode == 0, args
        return {"root": str(self.comfy), "port": self.port, "restart": {"systemd": unit}}

    def provision_vars(self) -> dict[str, Any]:
        if self.managed:
            return {"comfyui": {"root": str(self.comfy), "port": self.port, "restart": None,
                                "service": "systemd", "unit_dir": str(self.unit_dir),
                                "allow_root": True}}     # the test hosts' roots are root's: said explicitly
        return {"comfyui": {
            "root": str(self.comfy), "port": self.port,
            "restart": {"command": [sys.executable, "-m", "provisioner.sandbox.comfyui_process",
                                    "restart", str(self.comfy)]}}}

    def stop(self) -> None:
        stop_units(str(self.sandbox.root / "systemd"))
        comfyui_process.stop(self.comfy)


@dataclass
class Lab:
    root: Path
    world: World
    fleet: SshdFleet
    hosts: list[Any] = field(default_factory=list)             # LabHost, or any AnyHost
    extra_hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    overlays: dict[str, dict[str, Any]] = field(default_factory=dict)   # host → more `provision:` keys
    host_vars: dict[str, dict[str, Any]] = field(default_factory=dict)  # host → more inventory vars
    profile_extra: dict[str, Any] = field(default_factory=dict)
    base_profile: Path = REPO / "profiles" / "rtx3090.yaml"    # what the lab's profile extends

    def add(self, n: int = 1, *, gpu: str | None = "rtx3090", torch: str | None = "2.6.0+cu124",
            comfyui_version: str = "0.3.64", comfyui_args: tuple[str, ...] = ()) -> list[LabHost]:
        made = []
        for _ in range(n):
            name = f"gpu-{len(self.hosts) + 1:02d}"
            sandbox = make_sandbox_host(self.root / "hosts" / name, gpu=gpu, torch=torch,
                                        comfyui_version=comfyui_version,
                                        venv_template=self.world.venv_template)
            install_service_manager(sandbox.bin_dir, sandbox.root / "etc" / "systemd" / "system",
                                    sandbox.root / "systemd")
            (server,) = self.fleet.add(1, names=[name], bin_dirs=[sandbox.bin_dir])
            port = free_port()
            comfyui_process.start(sandbox.comfyui_root, port, gpu_state=sandbox.gpu_state,
                                  extra=("--startup-s", str(STARTUP_S), *comfyui_args))
            host = LabHost(name, sandbox, server, port)
            self.hosts.append(host)
            made.append(host)
        self.write()
        return made

    def add_bare(self, n: int = 1, *, gpu: str | None = "rtx3090") -> list[LabHost]:
        """Hosts with no ComfyUI at all (a GPU, python3, git, systemd): provision makes ComfyUI there and
        runs it as its own unit (`comfyui.service: systemd`); give the profile `world.core_overrides()`."""
        made = []
        for _ in range(n):
            name = f"gpu-{len(self.hosts) + 1:02d}"
            sandbox = make_sandbox_host(self.root / "hosts" / name, gpu=gpu, comfyui_version=None)
            install_service_manager(sandbox.bin_dir, sandbox.root / "etc" / "systemd" / "system",
                                    sandbox.root / "systemd")
            (server,) = self.fleet.add(1, names=[name], bin_dirs=[sandbox.bin_dir])
            host = LabHost(name, sandbox, server, service_port(), managed=True)
            comfyui_process.set_host_args(host.comfy, ("--startup-s", str(STARTUP_S)))
            self.hosts.append(host)
            made.append(host)
        self.write()
        return made

    def attach(self, host: AnyHost) -> None:
        """Put a host made elsewhere (with its own sshd from `self.fleet`) into the inventory."""
        self.hosts.append(host)
        self.write()

    def add_unreachable(self, name: str = "gpu-down") -> None:
        self.extra_hosts[name] = {"ansible_host": "127.0.0.1", "ansible_port": free_port(),
                                  "ansible_user": "root"}
        self.write()

    @property
    def inventory(self) -> Path:
        return self.root / "inventory.yaml"

    @property
    def profile(self) -> Path:
        return self.root / "profile.yaml"

    def write(self) -> None:
        inv = inventory_for([h.sshd for h in self.hosts])
        for host in self.hosts:
            inv["all"]["hosts"][host.name]["provision"] = {**host.provision_vars(),
                                                           **self.overlays.get(host.name, {})}
            inv["all"]["hosts"][host.name].update(self.host_vars.get(host.name, {}))
        inv["all"]["hosts"].update(self.extra_hosts)
        write_yaml(self.inventory, inv)
        profile = {"extends": str(self.base_profile), "inventory": str(self.inventory),
                   "hosts": "all", "comfyui": {"root": "/nonexistent/set-per-host"},
                   **self.world.profile_overrides()}
        for key, value in self.profile_extra.items():
            profile[key] = {**profile.get(key, {}), **value} if isinstance(value, dict) else value
        write_yaml(self.profile, profile)

    def ssh_args(self) -> list[str]:
        return ["--ssh-config", str(self.fleet.ssh_config), "--known-hosts", str(self.fleet.known_hosts),
                "--connect-timeout", "3"]

    def run(self, verb: str, *args: str) -> tuple[int, str]:
        """`provision VERB PROFILE ARGS` in-process; returns (exit code, everything it printed)."""
        out = io.StringIO()
        argv = [verb, str(self.profile), *self.ssh_args(), "--no-color", *args]
        if verb == "apply" and "--log-dir" not in args:
            argv += ["--log-dir", str(self.root / "logs")]  # not the default, in the working tree
        with redirect_stdout(out), redirect_stderr(out):
            code = cli.main(argv)
        return code, out.getvalue()

    def spawn(self, verb: str, *args: str, log_dir: Path | None = None) -> subprocess.Popen[str]:
        """The same as a separate process (to be killed, or run concurrently)."""
        argv = [sys.executable, "-m", "provisioner", verb, str(self.profile), *self.ssh_args(),
                "--no-color", *args]
        if log_dir is not None:
            argv += ["--log-dir", str(log_dir)]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "COLUMNS": "200"})

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()
        self.fleet.stop_all()


def service_port(span: int = 4) -> int:
    """A port for a ComfyUI that provision starts minutes from now (and `span` - 1 above it free too,
    for per-gpu instances): below the kernel's ephemeral range, so that no test elsewhere on this
    machine that binds port 0 meanwhile is handed it."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low - span)
        try:
            for p in range(port, port + span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    return free_port()


@contextmanager
def open_lab(root: Path, **world: Any) -> Iterator[Lab]:
    """A lab with its own world (stand-in servers) under `root`; everything stopped at the end."""
    started = start_world(root / "world", **world)
    lab = Lab(root, started, SshdFleet(root / "sshd"))
    try:
        yield lab
    finally:
        lab.stop()
        started.stop()


def tree_state(root: Path, skip: Sequence[str] = (".provision-sandbox", "output", "__pycache__")) -> dict[str, str]:
    """Path → sha256 (files) or 'dir', for byte-identity checks; ComfyUI's own output is skipped."""
    state: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in skip for part in rel.parts):
            continue
        if path.is_symlink():
            state[str(rel)] = "link:" + os.readlink(path)
        elif path.is_file():
            state[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[str(rel)] = "dir"
    return state


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if ".provision-sandbox" not in p.parts and "output" not in p.relative_to(root).parts}
