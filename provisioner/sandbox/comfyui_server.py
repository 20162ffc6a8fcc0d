"""A stand-in ComfyUI 0.3.64 that speaks its HTTP + websocket API, built from real captured answers.

For tests and sandbox hosts where no GPU runs ComfyUI: /system_stats, /object_info (the captured
478 nodes, plus ComfyUI-nunchaku's), POST /prompt with ComfyUI's validation errors, a queue worker
that emits ComfyUI's websocket messages and writes real PNGs, /history, /view, /queue, /free,
/upload/image. Run it as a process like the real one:
`python -m provisioner.sandbox.comfyui_server --port 8188 --root DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from provisioner.sandbox import comfyui_nodes as nodes, comfyui_png, nvidia_smi
from provisioner.sandbox.comfyui_exec import Executor, Gpu, NodeFailed
from provisioner.sandbox.comfyui_http import Handler
from provisioner.verify import ws

HISTORY_EVENTS = ("execution_start", "execution_cached", "execution_success", "execution_error")
IDLE_MIB = 256                      # the CUDA context alone, before any model is loaded


class State:
    """Everything the handlers and the queue worker share, behind one lock."""

    def __init__(self, root: Path, base: dict[str, Any], executor: Executor, gpu_name: str,
                 argv: list[str], echo: bool) -> None:
        self.root, self.base, self.executor, self.gpu_name, self.argv = root, base, executor, gpu_name, argv
        self.cond = threading.Condition()
        self.number = 0
        self.pending: list[list[Any]] = []
        self.running: list[Any] | None = None
        self.history: dict[str, Any] = {}
        self.sockets: dict[str, tuple[Any, threading.Lock]] = {}
        self.flags: dict[str, bool] = {}
        self.stopping = False
        self.echo = echo
        self.logs: list[str] = []

    def log(self, line: str) -> None:
        self.logs.append(line)
        if self.echo:
            print(line, flush=True)

    def registry(self) -> dict[str, Any]:
        return nodes.registry(self.base, self.executor.models_dir, self.root / "input")

    # -- websocket fan-out ---------------------------------------------------------------------
    def send(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        """To one client (`sid`) or all, like PromptServer.send_sync."""
        frame = ws.encode_frame(ws.TEXT, json.dumps({"type": event, "data": data}).encode(), mask=False)
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

    def free(self, unload_models: bool, free_memory: bool) -> None:
        with self.cond:
            self.flags = {"unload_models": unload_models, "free_memory": free_memory}
            self.cond.notify_all()

    def _apply_flags(self) -> None:
        """As ComfyUI's prompt worker does between prompts; unload_models defaults to free_memory."""
        flags, self.flags = self.flags, {}
        if flags.get("unload_models", flags.get("free_memory", False)):
            self.executor.gpu.loaded.clear()
            self.executor.gpu.set(IDLE_MIB)
        if flags.get("free_memory"):
            self.executor.cache.clear()

    # -- the queue worker --------------------------------------------------------------------------
    def worker(self) -> None:
        while True:
            with self.cond:
                while not (self.pending or self.flags or self.stopping):
                    self.cond.wait()
                if self.stopping:
                    return
                self._apply_flags()
                if not self.pending:
                    continue
                self.running = item = self.pending.pop(0)
            self.execute(item)

    def execute(self, item: list[Any]) -> None:
        number, prompt_id, graph, extra, outputs = item
        sid = extra.get("client_id")
        messages: list[list[Any]] = []

        def send(event: str, data: dict[str, Any]) -> None:
            if event in HISTORY_EVENTS:
                messages.append([event, data])
            self.send(event, data, sid)

        began = time.perf_counter()
        send("execution_start", {"prompt_id": prompt_id, "timestamp": int(time.time() * 1000)})
        ui: dict[str, Any] = {}
        try:
            ui = self.executor.run(prompt_id, graph, outputs, send)
            send("execution_success", {"prompt_id": prompt_id, "timestamp": int(time.time() * 1000)})
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
        gpu, mib = self.executor.gpu, 2**20
        stats["system"]["argv"] = self.argv
        stats["devices"] = [{
            "name": f"cuda:0 {self.gpu_name} : cudaMallocAsync", "type": "cuda", "index": 0,
            "vram_total": gpu.total_mib * mib, "vram_free": (gpu.total_mib - gpu.used_mib) * mib,
            "torch_vram_total": (gpu.used_mib - IDLE_MIB) * mib, "torch_vram_free": 0}]
        return stats



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


def _write_gpu_state(path: Path | None, mib: int) -> None:
    if path is not None:                 # the sandbox nvidia-smi shim's state file, written atomically
        nvidia_smi.write_state(path, mib)


def start_comfyui(*, port: int = 0, listen: str = "127.0.0.1", root: str | os.PathLike | None = None,
                  nunchaku_nodes: bool = True, plugin: bool = True, image_mode: str = "normal",
                  cold_s: float = 1.5, warm_s: float = 0.2, vram_mib: int = 7910,
                  vram_total_mib: int = 24576, gpu_name: str = "NVIDIA GeForce RTX 3090",
                  gpu_state_file: str | os.PathLike | None = None,
                  models_dir: str | os.PathLike | None = None, check_models: bool = False,
                  echo: bool = False) -> ComfyServer:
    """Start the stand-in on a thread. `nunchaku_nodes=False`: the plugin without its backend (only
    its two backend-free nodes); `plugin=False`: no ComfyUI-nunchaku at all. `models_dir`: loader
    choices are its files (else any name passes); `check_models`: loaders open safetensors headers."""
    if image_mode not in ("normal", "black", "uniform"):
        raise ValueError(f"image_mode {image_mode!r}: use normal, black or uniform")
    base_dir = Path(root) if root else Path(tempfile.mkdtemp(prefix="comfyui-standin-"))
    for sub in ("input", "output", "temp"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    example = base_dir / "input" / "example.png"       # every ComfyUI checkout ships one
    if not example.exists():
        example.write_bytes(comfyui_png.picture(512, 512, 0, "normal"))
    state_file = Path(gpu_state_file) if gpu_state_file else None
    gpu = Gpu(vram_total_mib, IDLE_MIB, vram_mib, lambda mib: _write_gpu_state(state_file, mib))
    gpu.set(IDLE_MIB)
    executor = Executor(base_dir, gpu, image_mode, cold_s, warm_s,
                        Path(models_dir) if models_dir else None, check_models)
    base = nodes.base_registry(plugin=plugin, backend=nunchaku_nodes)
    httpd = ThreadingHTTPServer((listen, port), Handler)
    httpd.daemon_threads = True
    real_port = httpd.server_address[1]
    state = State(base_dir, base, executor, gpu_name,
                  ["main.py", "--listen", listen, "--port", str(real_port)], echo)
    executor.log = state.log
    httpd.state = state  # type: ignore[attr-defined]
    threading.Thread(target=state.worker, name="comfyui-prompt-worker", daemon=True).start()
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                     name="comfyui-http", daemon=True).start()
    state.log(f"To see the GUI go to: http://{listen}:{real_port}")
    return ComfyServer(f"http://{listen}:{real_port}", real_port, base_dir, state, httpd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m provisioner.sandbox.comfyui_server",
                                 description="Stand-in ComfyUI 0.3.64 (no GPU, real API shapes).")
    ap.add_argument("--port", type=int, default=8188)
    ap.add_argument("--listen", default="127.0.0.1")
    ap.add_argument("--root", default=".", help="ComfyUI root: input/, output/, models/ live here")
    ap.add_argument("--models-dir", help="default: ROOT/models when it exists")
    ap.add_argument("--no-nunchaku", action="store_true", help="plugin present, backend missing")
    ap.add_argument("--no-plugin", action="store_true", help="no ComfyUI-nunchaku at all")
    ap.add_argument("--image-mode", choices=("normal", "black", "uniform"), default="normal")
    ap.add_argument("--cold-s", type=float, default=1.5)
    ap.add_argument("--warm-s", type=float, default=0.2)
    ap.add_argument("--vram-mib", type=int, default=7910)
    ap.add_argument("--vram-total-mib", type=int, default=24576)
    ap.add_argument("--gpu-state-file", help="JSON {memory_used_mib} kept current, for an nvidia-smi shim")
    ap.add_argument("--check-models", action="store_true", help="loaders open safetensors headers")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    models = args.models_dir or (str(root / "models") if (root / "models").is_dir() else None)
    server = start_comfyui(port=args.port, listen=args.listen, root=root, models_dir=models,
                           nunchaku_nodes=not args.no_nunchaku, plugin=not args.no_plugin,
                           image_mode=args.image_mode, cold_s=args.cold_s, warm_s=args.warm_s,
                           vram_mib=args.vram_mib, vram_total_mib=args.vram_total_mib,
                           gpu_state_file=args.gpu_state_file, check_models=args.check_models,
                           echo=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
