"""Run the ComfyUI stand-in as a sandbox host's ComfyUI process, restartable like the real one.

Like real ComfyUI, what it serves is decided at start-up from the host's files: the Nunchaku
nodes are registered only when the plugin's folder is in `custom_nodes/` (ComfyUI-nunchaku, or
comfyui-nunchaku as ComfyUI-Manager names it) AND the venv holds the real `nunchaku` backend (the
plugin without its backend registers only two nodes, and logs why). The GPU is the one the host's
nvidia-smi lists (`--cuda-device` in the saved arguments picks another). So a verification before
`apply` + restart fails, and after it passes, for the same reasons as on a real host. The backend is
imported by the venv's own interpreter, as ComfyUI would: a wheel that fails to import (built for
another torch: `undefined symbol`) registers no loader, and ComfyUI logs why. A plugin from v1.2.0
on a core whose `QwenTimestepProjEmbeddings` does not take `use_additional_t_cond` (read from the
core's own signature, not grepped) loads, and its DiT loader fails when a prompt runs it; so does
any plugin on core 0.4.0 (`ModelPatcher.pinned`); on a core whose comfy/ldm/qwen_image/model.py lacks
`apply_rotary_emb` (0.23) the DiT loader's import fails and it is not registered.

`python -m provisioner.sandbox.comfyui_process restart ROOT` is the command a sandbox profile gives
as `comfyui.restart`: like `systemctl restart` or `docker restart`, it returns as soon as the new
process is started, long before ComfyUI listens.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PLUGIN_DIRS = ("ComfyUI-nunchaku", "comfyui-nunchaku")
PIDFILE = ".provision-sandbox/comfyui.pid"
PORTFILE = ".provision-sandbox/comfyui.port"
ARGSFILE = ".provision-sandbox/comfyui.args"      # extra stand-in flags, kept across restarts
HOST_ARGSFILE = "comfyui.args"   # the same beside the checkout (host.py's layout), for a host that has none yet
LOGFILE = ".provision-sandbox/comfyui.log"


def plugin_dir(root: Path) -> str | None:
    """The plugin's folder under custom_nodes/, when one is there."""
    return next((d for d in PLUGIN_DIRS if (root / "custom_nodes" / d / "__init__.py").is_file()), None)


def backend_version(venv: Path) -> str | None:
    """The real nunchaku's version in a venv (a `+torchA.B` or, from 1.2.1, `+cuX.YtorchA.B` build),
    else None."""
    for info in venv.glob("lib/python*/site-packages/nunchaku-*.dist-info"):
        version = info.name[len("nunchaku-"):-len(".dist-info")]
        if re.search(r"\+(cu[\d.]+)?torch\d", version):
            return version
    return None


def backend_import_error(venv: Path) -> str | None:
    """The last line `import nunchaku` prints in the venv running ComfyUI when it fails, else None."""
    python = venv / "bin" / "python"
    try:
        proc = subprocess.run([str(python), "-I", "-c", "import nunchaku"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"{type(err).__name__}: {err}"
    lines = [x.strip() for x in proc.stderr.splitlines() if x.strip()]
    return (lines[-1] if lines else f"exit {proc.returncode}") if proc.returncode else None


T_COND = "use_additional_t_cond"
ROTARY = "apply_rotary_emb"
CORE_MODEL = ("comfy", "ldm", "qwen_image", "model.py")


def _numbers(path: Path, pattern: str) -> tuple[int, ...] | None:
    # Standard library only: a bare host's venv, made by provision, runs this (main.py) and has
    # no `packaging`. The plugin's and the core's versions are plain X.Y.Z.
    found = re.search(pattern + r'\s*=\s*"(\d+)\.(\d+)\.(\d+)', path.read_text(), re.M) if path.is_file() else None
    return tuple(int(x) for x in found.groups()) if found else None


def plugin_version(root: Path, folder: str) -> tuple[int, ...] | None:
    return _numbers(root / "custom_nodes" / folder / "pyproject.toml", "^version")


def core_version(root: Path) -> str | None:
    found = _numbers(root / "comfyui_version.py", "__version__")
    return ".".join(map(str, found)) if found else None


def dit_import_error(root: Path, folder: str) -> str | None:
    """What importing the plugin's DiT loader raises on this core: v1.0+ imports apply_rotary_emb from
    comfy/ldm/qwen_image/model.py, which core 0.23 moved away (ComfyUI-nunchaku#820)."""
    found, core = plugin_version(root, folder), root.joinpath(*CORE_MODEL)
    if found is None or found < (1, 0, 0) or not core.is_file():
        return None
    tree = ast.parse(core.read_text())
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    names |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    if ROTARY in names:
        return None
    return f"ImportError: cannot import name '{ROTARY}' from 'comfy.ldm.qwen_image.model'"


def loader_error(root: Path, folder: str) -> str | None:
    """What the plugin's DiT loader raises on this core when it runs: core 0.4.0 reads
    ModelPatcher.pinned, which the patcher the plugin builds lacks (Comfy-Org/ComfyUI#11235); from
    v1.2.0 it passes `use_additional_t_cond` to the core's QwenTimestepProjEmbeddings, which older
    cores do not take."""
    found = plugin_version(root, folder)
    if found is None:
        return None
    if found >= (1, 0, 0) and core_version(root) == "0.4.0":
        return "AttributeError: 'ModelPatcher' object has no attribute 'pinned'"
    core = root.joinpath(*CORE_MODEL)
    if found < (1, 2, 0) or not core.is_file():
        return None
    for node in ast.walk(ast.parse(core.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == "QwenTimestepProjEmbeddings":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    args = item.args
                    names = {a.arg for a in args.args + args.kwonlyargs}
                    if T_COND in names or args.kwarg is not None:
                        return None
    return f"TypeError: QwenTimestepProjEmbeddings.__init__() got an unexpected keyword argument '{T_COND}'"


def detect(root: Path) -> tuple[bool, bool]:
    """(plugin present, real backend installed) for the ComfyUI checkout at `root`."""
    return plugin_dir(root) is not None, backend_version(root / "venv") is not None


def _write(path: Path, text: str) -> None:
    """Whole or not at all, as a service manager keeps its state: a restart killed mid-write (the
    controller's supervisor stops it) must leave the next one a readable port and pid."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def set_args(root: Path, extra: tuple[str, ...]) -> None:
    """Stand-in flags for this checkout's next starts (e.g. --die-at-start, --startup-s)."""
    (root / ARGSFILE).parent.mkdir(parents=True, exist_ok=True)
    _write(root / ARGSFILE, json.dumps(list(extra)))


def set_host_args(root: Path, extra: tuple[str, ...]) -> None:
    """Stand-in flags for the main.py of whatever checkout `root` will be (a bare host's, which
    provision clones): kept beside it, so the root itself stays absent."""
    _write(root.parent / HOST_ARGSFILE, json.dumps(list(extra)))


def found_args(root: Path, venv: Path) -> list[str]:
    """The stand-in server's flags for what this checkout holds, found as real ComfyUI finds it: the
    plugin in custom_nodes/ and its backend in the venv that runs it, the host's GPU (its nvidia-smi)."""
    folder, backend = plugin_dir(root), backend_version(venv)
    argv = ["--root", str(root), "--check-models"]
    if folder is None:
        argv.append("--no-plugin")
    else:
        argv += ["--plugin-dir", folder]
        failed = backend_import_error(venv) if backend is not None else None
        if backend is None:
            argv.append("--no-nunchaku")
        elif failed:
            argv += ["--no-nunchaku", "--backend", backend, "--backend-error", failed]
        else:
            argv += ["--backend", backend]
        if (error := loader_error(root, folder)) is not None:
            argv += ["--loader-error", error]
        if (error := dit_import_error(root, folder)) is not None:
            argv += ["--dit-import-error", error]
    if (version := core_version(root)) is not None:
        argv += ["--comfyui-version", version]
    gpu_state = root.parent / "gpu-state.json"          # the sandbox host's own (host.py lays it out)
    if gpu_state.exists():
        argv += ["--gpu-state-file", str(gpu_state)]
    host_smi = root.parent / "bin" / "nvidia-smi"
    if host_smi.is_file():
        argv += ["--nvidia-smi", str(host_smi)]
    return argv


def start(root: Path, port: int, *, gpu_state: Path | None = None, extra: tuple[str, ...] = (),
          wait: bool = True) -> int:
    """Start detached (its own session, so it outlives the command that started it); returns PID.
    `wait`: until it answers (a process that exits meanwhile raises StandInFailed)."""
    argv = [sys.executable, "-m", "provisioner.sandbox.comfyui_server", *found_args(root, root / "venv"),
            "--port", str(port), *extra]
    if gpu_state and "--gpu-state-file" not in argv:
        argv += ["--gpu-state-file", str(gpu_state)]
    (root / PIDFILE).parent.mkdir(parents=True, exist_ok=True)
    with open(root / LOGFILE, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=root)
    _write(root / PIDFILE, str(proc.pid))
    _write(root / PORTFILE, str(port))
    set_args(root, extra)
    if wait:
        _wait_ready(port, proc, root / LOGFILE)
    return proc.pid


# Every option real ComfyUI's command line takes (comfy/cli_args.py of Comfy-Org/ComfyUI at
# v0.3.64, the `--name` strings of its parser.add_argument calls): it parses with parse_args, so
# any other exits 2 with "unrecognized arguments" before a node loads. The stand-in does the same.
COMFYUI_OPTIONS = frozenset((
    "--async-offload --auto-launch --base-directory --bf16-text-enc --bf16-unet --bf16-vae --cache-classic "
    "--cache-lru --cache-none --comfy-api-base --cpu --cpu-vae --cuda-device --cuda-malloc --database-url "
    "--default-device --default-hashing-function --deterministic --directml --disable-all-custom-nodes "
    "--disable-api-nodes --disable-auto-launch --disable-cuda-malloc --disable-ipex-optimize --disable-metadata "
    "--disable-mmap --disable-smart-memory --disable-xformers --dont-print-server --dont-upcast-attention "
    "--enable-compress-response-body --enable-cors-header --extra-model-paths-config --fast "
    "--force-channels-last --force-fp16 --force-fp32 --force-non-blocking --force-upcast-attention "
    "--fp16-text-enc --fp16-unet --fp16-vae --fp32-text-enc --fp32-unet --fp32-vae --fp64-unet --front-end-root "
    "--front-end-version --gpu-only --highvram --input-directory --listen --log-stdout --lowvram "
    "--max-upload-size --mmap-torch-files --multi-user --normalvram --novram --oneapi-device-selector "
    "--output-directory --port --preview-method --preview-size --quick-test-for-ci --reserve-vram "
    "--supports-fp8-compute --temp-directory --tls-certfile --tls-keyfile --use-flash-attention "
    "--use-pytorch-cross-attention --use-quad-cross-attention --use-sage-attention --use-split-cross-attention "
    "--user-directory --verbose --whitelist-custom-nodes --windows-standalone-build").split())


def main_py(root: Path | str, argv: list[str]) -> int:
    """The sandbox checkout's main.py, run by a venv's python as a service runs real ComfyUI: its
    own flags (--listen, --port, --cpu, --cuda-device; ComfyUI's other options are accepted and
    ignored, any other is refused as ComfyUI refuses it: exit 2), the GPU
    CUDA_VISIBLE_DEVICES leaves it, what the checkout and that venv hold, and the stand-in flags the
    tests saved for this checkout (set_args)."""
    from provisioner.sandbox import comfyui_server

    root = Path(root)
    ap = argparse.ArgumentParser(prog="main.py")
    ap.add_argument("--listen", default="127.0.0.1")
    ap.add_argument("--port", default="8188")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--cuda-device")
    known, rest = ap.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") and a.split("=", 1)[0] not in COMFYUI_OPTIONS]
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    server = [*found_args(root, Path(sys.prefix)), "--listen", known.listen, "--port", known.port]
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    device = visible[0] if visible else known.cuda_device
    server += ["--cpu"] if known.cpu else ["--cuda-device", device] if device else []
    saved = next((f for f in (root / ARGSFILE, root.parent / HOST_ARGSFILE) if f.exists()), None)
    server += json.loads(saved.read_text()) if saved else []
    return comfyui_server.main(server)


def pid(root: Path) -> int | None:
    """The running stand-in's PID, None when it is not running."""
    try:
        number = int((root / PIDFILE).read_text())
    except (OSError, ValueError):
        return None
    return number if _running(number) else None


def _running(number: int) -> bool:
    """Whether a stand-in runs as `number`: a zombie (ended, not yet reaped by whoever
    is its parent now) does not, nor a process that took the number since: a PID file outlives its
    process, and PIDs come round again within minutes on a busy machine (pid_max 32768), so a stop
    that trusted the number alone once signalled whatever process had it then (an sshd session)."""
    try:
        os.waitpid(number, os.WNOHANG)                 # ours: reaped here
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{number}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
        with open(f"/proc/{number}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    return b"provisioner.sandbox.comfyui_server" in argv


def stop(root: Path) -> None:
    """SIGTERM, SIGKILL 5 s later if need be; returns once the process has ended (its port is free)."""
    pidfile = root / PIDFILE
    if not pidfile.exists():
        return
    number = int(pidfile.read_text())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _running(number):
            break
        try:
            os.kill(number, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 5
        while _running(number) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _running(number):
            break
    pidfile.unlink(missing_ok=True)


def restart(root: Path, *, wait: bool = False) -> int:
    """Stop, then start with the saved port and flags; returns at once unless `wait`."""
    port = int((root / PORTFILE).read_text())
    extra = tuple(json.loads((root / ARGSFILE).read_text())) if (root / ARGSFILE).exists() else ()
    gpu_state = root.parent / "gpu-state.json"
    stop(root)
    return start(root, port, gpu_state=gpu_state if gpu_state.exists() else None, extra=extra, wait=wait)


class StandInFailed(RuntimeError):
    """The stand-in ComfyUI exited or never answered; the message ends with its last log line."""


def _wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    """Until /system_stats answers; a process that exited is reported at once, with its log's last line."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=1):
                return
        except OSError:
            code = proc.poll()
            if code is not None or time.monotonic() > deadline:
                lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
                why = lines[-1].strip() if lines else "no output"
                what = f"exited with code {code}" if code is not None else f"did not answer in {timeout:g}s"
                raise StandInFailed(f"ComfyUI stand-in on port {port} {what}: {why} (log: {log})")
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m provisioner.sandbox.comfyui_process")
    ap.add_argument("action", choices=("start", "stop", "restart"))
    ap.add_argument("root", type=Path, help="the ComfyUI checkout of the sandbox host")
    ap.add_argument("--port", type=int, default=8188)
    args = ap.parse_args(argv)
    root = args.root.resolve()
    if args.action == "start":
        gpu_state = root.parent / "gpu-state.json"
        start(root, args.port, gpu_state=gpu_state if gpu_state.exists() else None, wait=False)
    elif args.action == "stop":
        stop(root)
    else:
        restart(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
