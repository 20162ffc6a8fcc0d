"""A stand-in ComfyUI 0.3.64 that speaks its HTTP + websocket API, built from real captured answers.

For tests and sandbox hosts where no GPU runs ComfyUI: /system_stats, /object_info (the captured
478 nodes, plus ComfyUI-nunchaku's), POST /prompt with ComfyUI's validation errors, a queue worker
that emits ComfyUI's websocket messages and writes real PNGs, /history, /view, /queue (read, delete,
clear), /free, /interrupt, /upload/image, /internal/logs. Run it as a process like the real one:
`python -m provisioner.sandbox.comfyui_server --port 8188 --root DIR`.

As unkind as the real one where it matters: the port opens only after a start-up that takes time
(`startup_s`), may hang (`hang_at_start`) or die (`die_at_start`) and logs the plugin's import
failures; `/free` is applied by the prompt worker after its current item or when idle, and the
unload takes time (`unload_s`); an illegal memory access poisons the process (`poison_after`);
with `cpu` it runs on the CPU as `main.py --cpu` does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from provisioner.sandbox import comfyui_boot as boot, comfyui_nodes as nodes, comfyui_png, comfyui_ws as ws
from provisioner.sandbox import nvidia_smi
from provisioner.sandbox.comfyui_exec import Executor, Gpu, Interrupted, NodeFailed
from provisioner.sandbox.comfyui_http import Handler

HISTORY_EVENTS = ("execution_start", "execution_cached", "execution_success", "execution_error",
                  "execution_interrupted")
IDLE_MIB = 256                      # the CUDA context alone, before any model is loaded
RAM_TOTAL, RAM_FREE = 25276510208, 23609884672      # the capture's, reported by a CPU device
TORCH = "2.6.0+cu124"
PYTHON = "3.11.7 (main, May  9 2026, 07:35:25) [GCC 12.2.0]"


class StartupFailed(RuntimeError):
    """The stand-in was told to die during start-up (`die_at_start`)."""


class State:
    """Everything the handlers and the queue worker share, behind one lock."""

    def __init__(self, root: Path, base: dict[str, Any], executor: Executor, gpu_name: str,
                 argv: list[str], echo: bool, cpu: bool = False, unload_s: float = 0.0) -> None:
        self.root, self.base, self.executor, self.gpu_name, self.argv = root, base, executor, gpu_name, argv
        self.cpu, self.unload_s = cpu, unload_s
        self.cond = threading.Condition()
        self.number = 0
        self.pending: list[list[Any]] = []
        self.running: list[Any] | None = None
        self.history: dict[str, Any] = {}
        self.sockets: dict[str, tuple[Any, threading.Lock]] = {}
        self.flags: dict[str, bool] = {}
        self.stopping = False
        self.echo = echo
        self.logs: list[dict[str, str]] = []       # ComfyUI's ring buffer: {"t": ISO time, "m": text}

    def log(self, text: str) -> None:
        """One entry of the console log (a multi-line block is one entry, as ComfyUI keeps it)."""
        text = text if text.endswith("\n") else text + "\n"
        with self.cond:
            self.logs.append({"t": datetime.datetime.now().isoformat(), "m": text})
        if self.echo:
            sys.stdout.write(text)
            sys.stdout.flush()

    def log_entries(self) -> list[dict[str, str]]:
        with self.cond:
            return list(self.logs)

    def registry(self) -> dict[str, Any]:
        return nodes.registry(self.base, self.executor.models_dir, self.root / "input")

    # -- websocket fan-out ---------------------------------------------------------------------
    def send(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        """To one client (`sid`) or all, like PromptServer.send_sync."""
        frame = ws.frame(ws.OP_TEXT, json.dumps({"type": event, "data": data}).encode())
        targets = [self.sockets.get(sid)] if sid else list(self.sockets.values())
        for target in targets:
            if target is None:
                continue
            sock, lock = target
            try:
                with lock:
                    sock.sendall(frame)
            except OSError:
                pass                                   # the handler thread notices and unregisters

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": len(self.pending) + (self.running is not None)}}

    # -- POST /prompt ----------------------------------------------------------------------------
    def post_prompt(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.cond:
            number = float(body["number"]) if "number" in body else self.number
            if body.get("front"):
                number = -number
            self.number += 1
        if "prompt" not in body:
            err = nodes.error_entry("no_prompt", "No prompt provided", "No prompt provided")
            return 400, {"error": err, "node_errors": {}}
        graph = body["prompt"]
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        error, node_errors, outputs = nodes.validate(graph, self.registry(), self.root / "input",
                                                     models_listed=self.executor.models_dir is not None)
        if error is not None:
            self.log(f"invalid prompt: {error}")
            return 400, {"error": error, "node_errors": node_errors}
        extra = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        with self.cond:
            self.log("got prompt")
            self.pending.append([number, prompt_id, graph, extra, outputs])
            self.pending.sort(key=lambda item: item[0])
            self.cond.notify_all()
        self.send("status", {"status": self.queue_info()})
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}

    def free(self, names: set[str]) -> None:
        """POST /free: ComfyUI sets a flag for each truthy key only, and flags add up until applied."""
        with self.cond:
            self.flags.update(dict.fromkeys(names, True))
            self.cond.notify_all()

    def interrupt(self, prompt_id: str | None) -> None:
        """POST /interrupt: the running prompt (only if it is the one named); a pending one is untouched."""
        with self.cond:
            if self.running is not None and prompt_id in (None, self.running[1]):
                self.executor.interrupt.set()

    def edit_queue(self, delete: list[str], clear: bool) -> None:
        """POST /queue: drop pending items (the running one stays, as in ComfyUI)."""
        with self.cond:
            self.pending = [] if clear else [p for p in self.pending if p[1] not in set(delete)]
        self.send("status", {"status": self.queue_info()})

    def _apply_flags(self, flags: dict[str, bool]) -> None:
        """As ComfyUI's prompt worker does after an item, or when idle; unload_models defaults to
        free_memory. Unloading takes time: memory falls while it runs."""
        gpu = self.executor.gpu
        if flags.get("unload_models", flags.get("free_memory", False)):
            steps = 4
            for i in range(1, steps + 1):
                time.sleep(self.unload_s / steps)
                gpu.set(gpu.used_mib - (gpu.used_mib - IDLE_MIB) * i // steps)
            gpu.loaded.clear()
        if flags.get("free_memory"):
            self.executor.cache.clear()

    # -- the queue worker --------------------------------------------------------------------------
    def worker(self) -> None:
        """ComfyUI's prompt_worker: take the next item if there is one, run it, then apply the /free
        flags; a /free sent while idle wakes it and is applied at once."""
        while True:
            with self.cond:
                while not (self.pending or self.flags or self.stopping):
                    self.cond.wait()
                if self.stopping:
                    return
                item = self.running = self.pending.pop(0) if self.pending else None
            if item is not None:
                self.execute(item)
            with self.cond:
                flags, self.flags = self.flags, {}
            self._apply_flags(flags)

    def execute(self, item: list[Any]) -> None:
        number, prompt_id, graph, extra, outputs = item
        sid = extra.get("client_id")
        messages: list[list[Any]] = []

        def send(event: str, data: dict[str, Any]) -> None:
            if event in HISTORY_EVENTS:
                messages.append([event, data])
            self.send(event, data, sid)

        began = time.perf_counter()
        self.executor.interrupt.clear()          # an interrupt sent while idle is forgotten
        send("execution_start", {"prompt_id": prompt_id, "timestamp": int(time.time() * 1000)})
        ui: dict[str, Any] = {}
        try:
            ui = self.executor.run(prompt_id, graph, outputs, send)
            send("execution_success", {"prompt_id": prompt_id, "timestamp": int(time.time() * 1000)})
        except Interrupted as err:
            self.log("Processing interrupted")
            send("execution_interrupted", {
                "prompt_id": prompt_id, "node_id": err.node_id, "node_type": err.node_type,
                "executed": err.executed, "timestamp": int(time.time() * 1000)})
            ui = {}
        except NodeFailed as err:
            self.log("!!! Exception during processing !!! " + str(err).strip())
            send("execution_error", {
                "prompt_id": prompt_id, "node_id": err.node_id, "node_type": err.node_type,
                "executed": err.executed, "exception_message": str(err),
                "exception_type": err.exception_type, "traceback": [],
                "current_inputs": {}, "current_outputs": outputs, "timestamp": int(time.time() * 1000)})
            ui = {}
        ok = messages[-1][0] == "execution_success"
        with self.cond:
            self.history[prompt_id] = {
                "prompt": [number, prompt_id, graph, extra, outputs], "outputs": ui,
                "status": {"status_str": "success" if ok else "error", "completed": ok,
                           "messages": messages},
                "meta": {k: {"node_id": k, "display_node": k, "parent_node": None, "real_node_id": k}
                         for k in ui},
            }
            self.running = None
        # ComfyUI sends this after storing the history: clients take it as "done".
        self.send("executing", {"node": None, "prompt_id": prompt_id}, sid)
        self.log(f"Prompt executed in {time.perf_counter() - began:.2f} seconds")
        self.send("status", {"status": self.queue_info()})

    def system_stats(self) -> dict[str, Any]:
        stats = nodes.load_capture("system_stats.json")
        stats["system"].update(argv=self.argv, pytorch_version=TORCH, python_version=PYTHON)
        if self.cpu:                    # the capture itself was made on a CPU: its device as it is
            return stats
        gpu, mib = self.executor.gpu, 2**20
        stats["devices"] = [{
            "name": device_name(self.gpu_name), "type": "cuda", "index": 0,
            "vram_total": gpu.total_mib * mib, "vram_free": (gpu.total_mib - gpu.used_mib) * mib,
            "torch_vram_total": (gpu.used_mib - IDLE_MIB) * mib, "torch_vram_free": 0}]
        return stats


def device_name(gpu_name: str) -> str:
    """How ComfyUI names a CUDA device in its log and /system_stats."""
    return f"cuda:0 {gpu_name} : cudaMallocAsync"



@dataclass
class ComfyServer:
    url: str
    port: int
    root: Path
    state: State
    httpd: ThreadingHTTPServer

    def stop(self) -> None:
        with self.state.cond:
            self.state.stopping = True
            self.state.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()
        for sock, _ in list(self.state.sockets.values()):
            try:
                sock.close()
            except OSError:
                pass


def _write_gpu_state(path: Path | None, mib: int, gpu_uuid: str | None) -> None:
    if path is not None:                 # the sandbox nvidia-smi shim's state file, written atomically
        nvidia_smi.write_state(path, mib, gpu_uuid)


def start_comfyui(*, port: int = 0, listen: str = "127.0.0.1", root: str | os.PathLike | None = None,
                  nunchaku_nodes: bool = True, plugin: bool = True, image_mode: str = "normal",
                  cold_s: float = 1.5, warm_s: float = 0.2, vram_mib: int = 7910,
                  vram_total_mib: int = 24576, gpu_name: str = "NVIDIA GeForce RTX 3090",
                  gpu_state_file: str | os.PathLike | None = None, gpu_uuid: str | None = None,
                  models_dir: str | os.PathLike | None = None, check_models: bool = False,
                  echo: bool = False, plugin_dir: str = "ComfyUI-nunchaku", backend: str = "1.0.1+torch2.6",
                  backend_error: str | None = None, cpu: bool = False, startup_s: float = 0.0,
                  hang_at_start: bool = False, die_at_start: str | None = None, unload_s: float = 0.0,
                  poison_after: int | None = None, loader_error: str | None = None) -> ComfyServer:
    """Start the stand-in on a thread, after its start-up (`startup_s`, logged like ComfyUI's).

    `nunchaku_nodes=False`: the plugin without a working backend (only its two backend-free nodes):
    not installed, or installed as `backend` but failing to import with `backend_error`;
    `plugin=False`: no ComfyUI-nunchaku at all; `plugin_dir`: its folder under custom_nodes/.
    `models_dir`: loader choices are its files (else any name passes); `check_models`: loaders open
    safetensors headers. `gpu_uuid`: the GPU whose memory it drives in the nvidia-smi state file.
    `die_at_start`: the last line of the traceback it dies with; `hang_at_start`: never listens.
    `loader_error`: `Type: message` the Nunchaku DiT loader raises when a prompt runs it (a plugin
    that calls the core with an argument the core does not take)."""
    if image_mode not in comfyui_png.MODES:
        raise ValueError(f"image_mode {image_mode!r}: use one of {', '.join(comfyui_png.MODES)}")
    base_dir = Path(root) if root else Path(tempfile.mkdtemp(prefix="comfyui-standin-"))
    for sub in ("input", "output", "temp"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    example = base_dir / "input" / "example.png"       # every ComfyUI checkout ships one
    if not example.exists():
        example.write_bytes(comfyui_png.picture(512, 512, 0, "normal"))
    state_file = Path(gpu_state_file) if gpu_state_file and not cpu else None
    gpu = Gpu(vram_total_mib, IDLE_MIB, vram_mib, lambda mib: _write_gpu_state(state_file, mib, gpu_uuid))
    gpu.set(IDLE_MIB)
    executor = Executor(base_dir, gpu, image_mode, cold_s, warm_s,
                        Path(models_dir) if models_dir else None, check_models, poison_after=poison_after,
                        device=f"{gpu_uuid or gpu_name}:{base_dir.resolve()}",
                        loader_error=tuple(loader_error.split(": ", 1)) if loader_error else None)  # type: ignore[arg-type]
    base = nodes.base_registry(plugin=plugin, backend=nunchaku_nodes, plugin_dir=plugin_dir)
    packs = nodes.custom_node_packs(base_dir / "custom_nodes", plugin_dir)
    base.update({name: nodes.pack_entry(name, folder) for folder, names in packs.items() for name in names})
    argv = ["main.py", *(["--cpu"] if cpu else []), "--listen", listen, "--port", str(port)]
    state = State(base_dir, base, executor, gpu_name, argv, echo, cpu=cpu, unload_s=unload_s)
    executor.log = state.log
    for line in boot.banner("cpu" if cpu else device_name(gpu_name), vram_total_mib, TORCH, PYTHON, cpu):
        state.log(line)
    if die_at_start:
        state.log(boot.died(die_at_start))
        raise StartupFailed(die_at_start)
    plugin_path = base_dir / "custom_nodes" / plugin_dir
    if plugin:
        for entry in boot.plugin_block(str(plugin_path), backend if nunchaku_nodes or backend_error else None,
                                       None if nunchaku_nodes else backend_error):
            state.log(entry)
    while hang_at_start:                  # a custom node that never returns from its import
        time.sleep(3600)
    time.sleep(startup_s)                 # the port opens only once every custom node has loaded
    httpd = ThreadingHTTPServer((listen, port), Handler)
    httpd.daemon_threads = True
    real_port = httpd.server_address[1]
    argv[-1] = str(real_port)
    httpd.state = state  # type: ignore[attr-defined]
    threading.Thread(target=state.worker, name="comfyui-prompt-worker", daemon=True).start()
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                     name="comfyui-http", daemon=True).start()
    loaded = ([str(plugin_path)] if plugin else []) + [str(base_dir / "custom_nodes" / f) for f in packs]
    for line in boot.closing(loaded, f"http://{listen}:{real_port}"):
        state.log(line)
    return ComfyServer(f"http://{listen}:{real_port}", real_port, base_dir, state, httpd)


def host_gpu(nvidia_smi_path: str, device: str | None) -> tuple[str, int, str] | None:
    """(name, total MiB, UUID) of the GPU `--cuda-device` names (an index or a UUID; None: the
    first), as the host's nvidia-smi lists it: what torch would find."""
    try:
        out = subprocess.run([nvidia_smi_path, "--query-gpu=index,uuid,name,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.count(",") >= 3]
    for index, gpu_uuid, name, total in rows:
        if device is None or device in (index, gpu_uuid):
            return name, int(total), gpu_uuid
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m provisioner.sandbox.comfyui_server",
                                 description="Stand-in ComfyUI 0.3.64 (no GPU, real API shapes).")
    ap.add_argument("--port", type=int, default=8188)
    ap.add_argument("--listen", default="127.0.0.1")
    ap.add_argument("--root", default=".", help="ComfyUI root: input/, output/, models/ live here")
    ap.add_argument("--models-dir", help="default: ROOT/models when it exists")
    ap.add_argument("--no-nunchaku", action="store_true", help="plugin present, backend missing")
    ap.add_argument("--backend", help="the installed nunchaku's version (with --no-nunchaku: installed, "
                    "failing to import with --backend-error)")
    ap.add_argument("--backend-error", help="what importing the installed backend raises")
    ap.add_argument("--no-plugin", action="store_true", help="no ComfyUI-nunchaku at all")
    ap.add_argument("--plugin-dir", default="ComfyUI-nunchaku", help="its folder under custom_nodes/")
    ap.add_argument("--image-mode", choices=comfyui_png.MODES, default="normal",
                    help="black, uniform: broken pictures; noisy, shifted, wrong-size: degraded ones")
    ap.add_argument("--cold-s", type=float, default=1.5)
    ap.add_argument("--warm-s", type=float, default=0.2)
    ap.add_argument("--vram-mib", type=int, default=7910)
    ap.add_argument("--vram-total-mib", type=int, default=24576)
    ap.add_argument("--gpu-state-file", help="JSON {memory_used_mib} kept current, for an nvidia-smi shim")
    ap.add_argument("--nvidia-smi", help="the host's nvidia-smi: the GPU's name and size come from it")
    ap.add_argument("--cuda-device", help="the GPU to use, index or UUID (as ComfyUI's --cuda-device)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU, as main.py --cpu")
    ap.add_argument("--check-models", action="store_true", help="loaders open safetensors headers")
    ap.add_argument("--startup-s", type=float, default=0.0, help="seconds before the port opens")
    ap.add_argument("--hang-at-start", action="store_true", help="never open the port")
    ap.add_argument("--die-at-start", metavar="ERROR", help="exit 1 during start-up with this error")
    ap.add_argument("--unload-s", type=float, default=0.3, help="seconds an unload (/free) takes")
    ap.add_argument("--poison-after", type=int, help="samplings before an illegal memory access")
    ap.add_argument("--loader-error", metavar="TYPE: MESSAGE", help="what the Nunchaku DiT loader raises when run")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    models = args.models_dir or (str(root / "models") if (root / "models").is_dir() else None)
    gpu = host_gpu(args.nvidia_smi, args.cuda_device) if args.nvidia_smi else None
    name, total, gpu_uuid = gpu or ("NVIDIA GeForce RTX 3090", args.vram_total_mib, None)
    try:
        server = start_comfyui(port=args.port, listen=args.listen, root=root, models_dir=models,
                               nunchaku_nodes=not args.no_nunchaku, plugin=not args.no_plugin,
                               plugin_dir=args.plugin_dir, backend=args.backend or "1.0.1+torch2.6",
                               backend_error=args.backend_error if args.backend else None,
                               image_mode=args.image_mode, cold_s=args.cold_s, warm_s=args.warm_s,
                               vram_mib=args.vram_mib, vram_total_mib=total, gpu_name=name,
                               gpu_state_file=args.gpu_state_file, gpu_uuid=gpu_uuid,
                               check_models=args.check_models, echo=True, cpu=args.cpu,
                               startup_s=args.startup_s, hang_at_start=args.hang_at_start,
                               die_at_start=args.die_at_start, unload_s=args.unload_s,
                               poison_after=args.poison_after, loader_error=args.loader_error)
    except StartupFailed:
        return 1
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
