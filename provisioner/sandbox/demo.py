"""`make demo` provisions a local sandbox host end to end, offline: plan, apply, lock, apply again.

Real: the provisioner, its CLI, the facts script, git, pip into a real venv, the downloads over
HTTP with resume and sha256, the ComfyUI HTTP API client. Stand-ins (this machine has no GPU and
no internet): the GitHub release server, the Hugging Face Hub endpoint, the ComfyUI-nunchaku git
repository, tiny wheels for torch/nunchaku/diffusers/peft, small model files, `nvidia-smi`
printing an RTX 3090, and a ComfyUI that answers the real API shapes without a GPU.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

from rich.console import Console

from provisioner import cli
from provisioner.errors import ProvisionError
from provisioner.config.records import CACHE_ENV
from provisioner.sandbox import comfyui_process
from provisioner.sandbox.host import make_sandbox_host
from provisioner.sandbox.world import start_world, write_yaml

STAND_INS = """\
[bold]Stand-ins[/] (no GPU, no internet here): GitHub releases server, Hugging Face Hub endpoint,
ComfyUI-nunchaku git repository (local bare repo with tags v1.0.0…v1.2.0), tiny wheels for torch
2.6.0+cu124 / nunchaku 1.0.1 / diffusers / peft, 2 MB model files, an nvidia-smi printing an
RTX 3090, and a ComfyUI API server without a GPU.
[bold]Real[/]: provision itself, SSH-free local transport, the one-round-trip facts script, git,
pip into a real venv, resumable sha256-checked downloads over HTTP, ComfyUI's HTTP API client."""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="make demo", description=(__doc__ or "").split("\n\n")[0].replace("`make demo` provisions", "Provision"),
        epilog="Everything it makes lives in .demo/ of the repository (the report: "
               ".demo/report/report.html); `make clean` removes it.")
    parser.add_argument("--keep", action="store_true",
                        help="keep the stand-ins and the sandbox's ComfyUI up afterwards (until Ctrl-C), and print "
                             "how to run provision against them")
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    try:
        return _demo(console, keep=args.keep)
    except (ProvisionError, comfyui_process.StandInFailed) as err:
        console.print(f"[red]demo failed:[/] {err}")
        return 1


def _demo(console: Console, *, keep: bool = False) -> int:
    repo = Path(__file__).resolve().parents[2]
    base = repo / ".demo"
    console.rule("[bold]provision demo: one sandbox host, offline")
    console.print(STAND_INS)
    started = time.monotonic()
    host_root = base / "host"
    if host_root.exists():  # every demo starts from a fresh host, so the first plan has work to show
        comfyui_process.stop(host_root / "ComfyUI")
        shutil.rmtree(host_root)
    world = start_world(base / "world")
    try:
        host = make_sandbox_host(host_root, gpu="rtx3090", torch="2.6.0+cu124",
                                 venv_template=world.venv_template)
        port = free_port()
        comfyui_process.start(host.comfyui_root, port, gpu_state=host.gpu_state)
        os.environ["PATH"] = host.path  # the local host's nvidia-smi is the sandbox's
        # The stand-in Hub's answers are recorded here, fresh each demo, not in the user's own record.
        shutil.rmtree(base / "control-cache", ignore_errors=True)
        os.environ[CACHE_ENV] = str(base / "control-cache")
        inventory = write_yaml(base / "inventory.yaml", {"all": {"hosts": {
            "sandbox-3090": {"ansible_connection": "local"}}}},
            "The demo's one host: this machine, reached without SSH.")
        profile = {
            "extends": str(repo / "profiles" / "rtx3090.yaml"),
            "inventory": str(inventory),
            "hosts": "all",
            "comfyui": {"root": str(host.comfyui_root), "port": port, "restart": {"command": [
                sys.executable, "-m", "provisioner.sandbox.comfyui_process", "restart",
                str(host.comfyui_root)]}},
            **world.profile_overrides(),
            # The stand-in ComfyUI generates in ~0.2 s: keep the 3090 profile's thresholds.
        }
        profile_path = write_yaml(base / "demo.yaml", profile,
                                  "The RTX 3090 profile, pointed at the sandbox's stand-ins.")
        (base / "demo.lock.yaml").unlink(missing_ok=True)  # of an earlier demo's profile (another port)
        steps = [
            ("plan: what would change (nothing is touched)", ["plan", str(profile_path)]),
            ("apply: converge, restart ComfyUI once, confirm, verify",
             ["apply", str(profile_path), "--report", str(base / "report"),
              "--log-dir", str(base / "logs")]),
            ("lock: what the fleet now runs, pinned for every control machine (demo.lock.yaml)",
             ["lock", str(profile_path)]),
            ("apply again, under the lock: nothing left to do", ["apply", str(profile_path),
                                                                "--log-dir", str(base / "logs")]),
        ]
        codes = []
        for title, argv in steps:
            console.rule(f"$ provision {' '.join(a if '/' not in a else Path(a).name for a in argv)}")
            console.print(f"[dim]{title}[/]")
            codes.append(cli.main(argv))
            console.print(f"[dim]exit code {codes[-1]}[/]")
        console.rule()
        ok = codes == [2, 2, 2, 0]
        console.print(f"{'[green]demo ok' if ok else '[red]demo failed'}[/]: exit codes {codes} "
                      f"(expected [2, 2, 2, 0]) in {time.monotonic() - started:.0f} s; sandbox in .demo/, "
                      f"report in .demo/report/report.html")
        # provision against the sandbox needs its nvidia-smi on PATH and the demo's Hub record.
        command = (f"PATH={shlex.quote(host.path)} {CACHE_ENV}={shlex.quote(str(base / 'control-cache'))} "
                   f"{shlex.quote(sys.executable)} -m provisioner plan {shlex.quote(str(profile_path))}")
        if not keep:
            console.print("The stand-ins stop now. To try provision against them yourself: "
                          "[bold]make demo ARGS=--keep[/]")
            return 0 if ok else 1
        console.print("The stand-ins and the sandbox's ComfyUI stay up until Ctrl-C. In another terminal:")
        console.print(command, soft_wrap=True, markup=False)
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0 if ok else 1))
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        return 0 if ok else 1
    finally:
        comfyui_process.stop(host_root / "ComfyUI")
        world.stop()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
