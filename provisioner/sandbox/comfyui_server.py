"""A stand-in ComfyUI 0.3.64 that speaks its HTTP + websocket API, built from real captured answers.

For tests and sandbox hosts where no GPU runs ComfyUI: /system_stats, /object_info (the v0.3.64
tag's 478 core nodes, plus ComfyUI-nunchaku's), POST /prompt validated as ComfyUI validates it, a
queue worker that emits ComfyUI's websocket messages in ComfyUI's order and writes real PNGs,
/history, /view, /queue, /free, /interrupt, /upload/image, /internal/*, every route under /api.
The real tier holds it against real ComfyUI request by request (tests/real/test_real_standin.py).
Run it as a process like the real one: `python -m provisioner.sandbox.comfyui_server --port 8188 --root DIR`.

As unkind as the real one where it matters: the port opens only after a start-up that takes time
(`startup_s`), may hang (`hang_at_start`) or die (`die_at_start`) and logs the plugin's import
failures; `/free` is applied by the prompt worker after its current item or when idle, and the
unload takes time (`unload_s`); the cache keeps only the last prompt's outputs; an interrupt lands
when the next node starts; an illegal memory access poisons the process (`poison_after`); with
`cpu` it runs on the CPU as `main.py --cpu` does.
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import heapq
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
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
MAX_HISTORY = 10000                 # ComfyUI's MAXIMUM_HISTORY_SIZE: the oldest entry goes first
SENSITIVE = ("auth_token_comfy_org", "api_key_comfy_org")   # extra_data keys /history leaves out
LOG_CAPACITY = 300                  # ComfyUI's console ring buffer (/internal/logs): older entries drop out
IDLE_MIB = 256                      # the CUDA context alone, before any model is loaded
RAM_TOTAL, RAM_FREE = 25276510208, 23609884672      # the capture's, where /proc/meminfo is not
# The v0.3.64 tag's workflow templates (the capture was of a commit that had moved to 0.1.95).
TEMPLATES = {"installed_templates_version": "0.1.94", "required_templates_version": "0.1.94"}
TORCH = "2.6.0+cu124"
PYTHON = "3.11.7 (main, May  9 2026, 07:35:25) [GCC 12.2.0]"


class StartupFailed(RuntimeError):
    """The stand-in was told to die during start-up (`die_at_start`)."""


class State:
    """Everything the handlers and the queue worker share, behind one lock."""

    def __init__(self, root: Path, base: dict[str, Any], executor: Executor, gpu_name: str,
                 argv: list[str], echo: bool, cpu: bool = False, unload_s: float = 0.0,
                 version: str = "0.3.64") -> None:
        self.root, self.base, self.executor, self.gpu_name, self.argv = root, base, executor, gpu_name, argv
        self.version = version
        self.cpu, self.unload_s = cpu, unload_s
        self.cond = threading.Condition()
        self.number = 0
        self.pending: list[tuple[Any, ...]] = []     # a heap, as ComfyUI's: (number, id, graph, extra, outputs)
        self.running: tuple[Any, ...] | None = None
        self.history: dict[str, Any] = {}
        self.sockets: dict[str, tuple[Any, threading.Lock]] = {}
        self.client_id: str | None = None             # the running prompt's client, as ComfyUI's server has
        self.last_node: str | None = None
        self.subscribers: set[str] = set()            # PATCH /internal/logs/subscribe
        self.flags: dict[str, Any] = {}
        self.stopping = False
        self.echo = echo
        self.logs: collections.deque[dict[str, str]] = collections.deque(maxlen=LOG_CAPACITY)
        self.outbox: queue.Queue[tuple[str, Any, str | None] | None] = queue.Queue()

    def log(self, text: str) -> None:
        """One entry of the console log (a multi-line block is one entry, as ComfyUI keeps it);
        subscribed websockets get it as a `logs` message."""
        text = text if text.endswith("\n") else text + "\n"
        entry = {"t": datetime.datetime.now().isoformat(), "m": text}
        with self.cond:
            self.logs.append(entry)
            for sid in list(self.subscribers):
                if sid in self.sockets:
                    self.send("logs", {"entries": [entry], "size": None}, sid)
                else:                                  # ComfyUI drops a subscriber that went away
                    self.subscribers.discard(sid)
        if self.echo:
            sys.stdout.write(text)
            sys.stdout.flush()

    def log_entries(self) -> list[dict[str, str]]:
        with self.cond:
            return list(self.logs)

    def registry(self) -> dict[str, Any]:
        return nodes.registry(self.base, self.executor.models_dir, self.root / "input")

    def object_info(self, name: str | None = None) -> dict[str, Any]:
        """/object_info (or one class of it): listing Load3D makes input/3d, as its INPUT_TYPES
        does, after the folder loaders listed input/ (so the first answer does not show it)."""
        found = self.registry()
        if name is None or name in ("Load3D", "Load3DAnimation"):
            (self.root / "input" / "3d").mkdir(parents=True, exist_ok=True)
        return found if name is None else ({name: found[name]} if name in found else {})

    # -- websocket fan-out ---------------------------------------------------------------------
    def send(self, event: str, data: Any, sid: str | None = None) -> None:
        """To one client (`sid`) or, with None, to all: queued and sent in order by one thread,
        like PromptServer.send_sync and its publish loop."""
        self.outbox.put((event, data, sid))

    def publish(self) -> None:
        while (message := self.outbox.get()) is not None:
            event, data, sid = message
            frame = ws.frame(ws.OP_TEXT, json.dumps({"type": event, "data": data}).encode())
            targets = list(self.sockets.values()) if sid is None else [self.sockets[sid]] if sid in self.sockets else []
            for sock, lock in targets:
                try:
                    with lock:
                        sock.sendall(frame)
                except OSError:
                    pass                                   # the handler thread notices and unregisters

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": len(self.pending) + (self.running is not None)}}

    def queue_updated(self) -> None:
        self.send("status", {"status": self.queue_info()})

    # -- POST /prompt ----------------------------------------------------------------------------
    def post_prompt(self, body: Any) -> tuple[int, dict[str, Any]]:
        """ComfyUI's POST /prompt on a body that parsed as JSON, whatever its type: a body its
        handler cannot walk raises here, as there, and the caller answers 500. Every body that
        gets this far takes a queue number, unless it gives its own (`front` is then ignored)."""
        with self.cond:
            if "number" in body:
                number = float(body["number"])
            else:
                number = -self.number if "front" in body and body["front"] else self.number
                self.number += 1
        if "prompt" not in body:
            err = nodes.error_entry("no_prompt", "No prompt provided", "No prompt provided")
            return 400, {"error": err, "node_errors": {}}
        graph = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        targets = body["partial_execution_targets"] if "partial_execution_targets" in body else None
        error, node_errors, outputs = nodes.validate(graph, self.registry(), self.root / "input", targets)
        extra = body["extra_data"] if "extra_data" in body else {}
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        if error is not None:
            for out in dict.fromkeys(o for e in node_errors.values() for o in e["dependent_outputs"]):
                self.log(f"Failed to validate prompt for output {out}:\nOutput will be ignored")
            self.log(f"invalid prompt: {error}")
            return 400, {"error": error, "node_errors": node_errors}
        with self.cond:
            heapq.heappush(self.pending, (number, prompt_id, graph, extra, outputs))
            self.queue_updated()
            self.cond.notify_all()
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}

    def free(self, body: Any) -> None:
        """POST /free: ComfyUI sets a flag for each truthy key only, and flags add up until applied."""
        unload, free = body.get("unload_models", False), body.get("free_memory", False)
        with self.cond:
            if unload:
                self.flags["unload_models"] = unload
            if free:
                self.flags["free_memory"] = free
            self.cond.notify_all()

    def interrupt(self, body: Any) -> None:
        """POST /interrupt: the running prompt when it is the one named; without a name, whatever
        runs (or the next node of nothing: the flag is cleared when a prompt starts)."""
        prompt_id = body.get("prompt_id")
        with self.cond:
            if not prompt_id:
                self.log("Global interrupt (no prompt_id specified)")
            elif self.running is None or self.running[1] != prompt_id:
                self.log(f"Prompt {prompt_id} is not currently running, skipping interrupt")
                return
            else:
                self.log(f"Interrupting prompt {prompt_id}")
            self.executor.interrupt.set()

    def edit_queue(self, body: Any) -> None:
        """POST /queue: clear, and/or delete pending items by id (the running one stays); each
        removal is a `status` message, two when it empties the queue, as in ComfyUI."""
        with self.cond:
            if "clear" in body and body["clear"]:
                self.pending = []
                self.queue_updated()
            if "delete" in body:
                for doomed in body["delete"]:
                    at = next((i for i, item in enumerate(self.pending) if item[1] == doomed), None)
                    if at is None:
                        continue
                    if len(self.pending) == 1:
                        self.pending = []
                        self.queue_updated()
                    else:
                        self.pending.pop(at)
                        heapq.heapify(self.pending)
                    self.queue_updated()

    def edit_history(self, body: Any) -> None:
        """POST /history: clear, and/or delete entries by id."""
        with self.cond:
            if "clear" in body and body["clear"]:
                self.history = {}
            if "delete" in body:
                for doomed in body["delete"]:
                    self.history.pop(doomed, None)

    def get_history(self, prompt_id: str | None = None, max_items: int | None = None,
                    offset: int = -1) -> dict[str, Any]:
        """GET /history (the last `max_items` by default, or `max_items` from `offset`) or one entry."""
        with self.cond:
            if prompt_id is not None:
                return {prompt_id: copy.deepcopy(self.history[prompt_id])} if prompt_id in self.history else {}
            if offset < 0 and max_items is not None:
                offset = len(self.history) - max_items
            out: dict[str, Any] = {}
            for i, key in enumerate(self.history):
                if i >= offset:
                    out[key] = self.history[key]
                    if max_items is not None and len(out) >= max_items:
                        break
            return out

    def _apply_flags(self, flags: dict[str, Any]) -> None:
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
                item = self.running = copy.deepcopy(heapq.heappop(self.pending)) if self.pending else None
                if item is not None:
                    self.queue_updated()               # the worker took it
            if item is not None:
                self.execute(item)
            with self.cond:
                flags, self.flags = self.flags, {}
            self._apply_flags(flags)

    def execute(self, item: tuple[Any, ...]) -> None:
        """One prompt, with ComfyUI's messages: the execution_* ones are kept for /history and sent
        only to the prompt's client (an interruption to everyone when there is none); executing
        and executed only to a client; progress_state and progress to the client or everyone."""
        number, prompt_id, graph, extra, outputs = item
        sid = extra.get("client_id") if "client_id" in extra else None
        self.client_id = sid
        messages: list[list[Any]] = []

        def add_message(event: str, data: dict[str, Any], broadcast: bool = False) -> None:
            data = {**data, "timestamp": int(time.time() * 1000)}
            messages.append([event, data])
            if sid is not None or broadcast:
                self.send(event, data, sid)

        def send(event: str, data: dict[str, Any]) -> None:
            if event in HISTORY_EVENTS:
                add_message(event, data)
            elif event in ("progress_state", "progress"):
                self.send(event, data, sid)
            elif sid is not None:
                if event == "executing":
                    self.last_node = data["node"]
                self.send(event, data, sid)

        began = time.perf_counter()
        self.executor.interrupt.clear()          # an interrupt sent while idle is forgotten
        add_message("execution_start", {"prompt_id": prompt_id})
        ok = False
        try:
            self.executor.run(prompt_id, graph, outputs, send)
            add_message("execution_success", {"prompt_id": prompt_id})
            ok = True
        except Interrupted as err:
            self.log("Processing interrupted")
            add_message("execution_interrupted", {"prompt_id": prompt_id, "node_id": err.node_id,
                                                  "node_type": err.node_type, "executed": err.executed},
                        broadcast=True)
        except NodeFailed as err:
            self.log(f"!!! Exception during processing !!! {err}")
            add_message("execution_error", {
                "prompt_id": prompt_id, "node_id": err.node_id, "node_type": err.node_type,
                "executed": err.executed, "exception_message": f"{err}\n",
                "exception_type": err.exception_type, "traceback": _traceback(err),
                "current_inputs": err.inputs, "current_outputs": list(graph)})
        ui = self.executor.outputs_of(graph)
        self.last_node = None
        with self.cond:
            if len(self.history) > MAX_HISTORY:
                self.history.pop(next(iter(self.history)))
            kept = {k: v for k, v in extra.items() if k not in SENSITIVE} if isinstance(extra, dict) else extra
            self.history[prompt_id] = {
                "prompt": [number, prompt_id, graph, kept, outputs], "outputs": ui,
                "status": {"status_str": "success" if ok else "error", "completed": ok,
                           "messages": messages},
                "meta": {k: {"node_id": k, "display_node": k, "parent_node": None, "real_node_id": k}
                         for k in ui},
            }
            self.running = None
            self.queue_updated()                 # the history is stored first: clients take these as "done"
        if sid is not None:
            self.send("executing", {"node": None, "prompt_id": prompt_id}, sid)
        self.log(f"Prompt executed in {time.perf_counter() - began:.2f} seconds")

    def system_stats(self) -> dict[str, Any]:
        """ComfyUI's answer: this machine's RAM (as psutil reads it); on the CPU, the device is the
        RAM too, as `main.py --cpu` reports it; else the stand-in GPU."""
        stats = nodes.load_capture("system_stats.json")
        ram_total, ram_free = machine_ram()
        stats["system"].update(argv=self.argv, pytorch_version=TORCH, python_version=PYTHON,
                               comfyui_version=self.version,
                               ram_total=ram_total, ram_free=ram_free, **TEMPLATES)
        if self.cpu:
            stats["devices"] = [{"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total,
                                 "vram_free": ram_free, "torch_vram_total": ram_total, "torch_vram_free": ram_free}]
            return stats
        gpu, mib = self.executor.gpu, 2**20
        stats["devices"] = [{
            "name": device_name(self.gpu_name), "type": "cuda", "index": 0,
            "vram_total": gpu.total_mib * mib, "vram_free": (gpu.total_mib - gpu.used_mib) * mib,
            "torch_vram_total": (gpu.used_mib - IDLE_MIB) * mib, "torch_vram_free": 0}]
        return stats


def machine_ram() -> tuple[int, int]:
    """(total, available) bytes of this machine's RAM from /proc/meminfo; the capture's elsewhere."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(info["MemTotal"].split()[0]) * 1024, int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return RAM_TOTAL, RAM_FREE


def _traceback(err: BaseException) -> list[str]:
    """The failing node's traceback as ComfyUI lists it: one text per frame, ours here."""
    return traceback.format_tb(err.__traceback__) or [f"  File \"execution.py\", in execute\n    raise {type(err).__name__}\n"]


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
        self.state.outbox.put(None)
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
                  poison_after: int | None = None, loader_error: str | None = None,
                  comfyui_version: str = "0.3.64", dit_import_error: str | None = None) -> ComfyServer:
    """Start the stand-in on a thread, after its start-up (`startup_s`, logged like ComfyUI's).

    `nunchaku_nodes=False`: the plugin without a working backend (only its two backend-free nodes):
    not installed, or installed as `backend` but failing to import with `backend_error`;
    `plugin=False`: no ComfyUI-nunchaku at all; `plugin_dir`: its folder under custom_nodes/.
    `models_dir`: loader choices are its files (default: ROOT/models; none there: every name is
    refused, as ComfyUI refuses them); `check_models`: loaders open
    safetensors headers. `gpu_uuid`: the GPU whose memory it drives in the nvidia-smi state file.
    `die_at_start`: the last line of the traceback it dies with; `hang_at_start`: never listens.
    `loader_error`: `Type: message` the Nunchaku DiT loader raises when a prompt runs it (a plugin
    that calls the core with an argument the core does not take, or reads an attribute it lacks).
    `comfyui_version`: what it reports (/system_stats, its log); `dit_import_error`: `Type: message`
    the plugin's DiT loader module raises on import (a symbol the core no longer has): that node is
    not registered, and the plugin logs why, as ComfyUI-nunchaku does."""
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
                        Path(models_dir) if models_dir else base_dir / "models", check_models,
                        poison_after=poison_after,
                        device=f"{gpu_uuid or gpu_name}:{base_dir.resolve()}",
                        loader_error=tuple(loader_error.split(": ", 1)) if loader_error else None)  # type: ignore[arg-type]
    base = nodes.base_registry(plugin=plugin, backend=nunchaku_nodes, plugin_dir=plugin_dir)
    if dit_import_error:
        base.pop(nodes.DIT_LOADER, None)
    packs = nodes.custom_node_packs(base_dir / "custom_nodes", plugin_dir)
    base.update({name: nodes.pack_entry(name, folder) for folder, names in packs.items() for name in names})
    argv = ["main.py", *(["--cpu"] if cpu else []), "--listen", listen, "--port", str(port)]
    state = State(base_dir, base, executor, gpu_name, argv, echo, cpu=cpu, unload_s=unload_s,
                  version=comfyui_version)
    executor.log = state.log
    for line in boot.banner("cpu" if cpu else device_name(gpu_name), vram_total_mib, TORCH, PYTHON, cpu,
                            comfyui_version):
        state.log(line)
    if die_at_start:
        time.sleep(startup_s)             # real ComfyUI dies seconds in, once torch is imported
        state.log(boot.died(die_at_start))
        raise StartupFailed(die_at_start)
    plugin_path = base_dir / "custom_nodes" / plugin_dir
    if plugin:
        for entry in boot.plugin_block(str(plugin_path), backend if nunchaku_nodes or backend_error else None,
                                       None if nunchaku_nodes else backend_error):
            state.log(entry)
        if dit_import_error and nunchaku_nodes:       # logger.exception's shape, as the plugin logs it
            state.log(f"Node `{nodes.DIT_LOADER}` import failed:\nTraceback (most recent call last):\n"
                      f'  File "{plugin_path}/__init__.py", line 65, in <module>\n'
                      "    from .nodes.models.qwenimage import NunchakuQwenImageDiTLoader\n"
                      f"{dit_import_error}")
    while hang_at_start:                  # a custom node that never returns from its import
        time.sleep(3600)
    time.sleep(startup_s)                 # the port opens only once every custom node has loaded
    httpd = ThreadingHTTPServer((listen, port), Handler)
    httpd.daemon_threads = True
    real_port = httpd.server_address[1]
    argv[-1] = str(real_port)
    httpd.state = state  # type: ignore[attr-defined]
    threading.Thread(target=state.worker, name="comfyui-prompt-worker", daemon=True).start()
    threading.Thread(target=state.publish, name="comfyui-publish", daemon=True).start()
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                     name="comfyui-http", daemon=True).start()
    broken = {str(base_dir / "custom_nodes" / f): error
              for f, error in nodes.broken_node_packs(base_dir / "custom_nodes", plugin_dir).items()}
    for path, error in broken.items():
        for line in boot.import_failed(path, error):
            state.log(line)
    loaded = ([str(plugin_path)] if plugin else []) + [str(base_dir / "custom_nodes" / f) for f in packs] + list(broken)
    for line in boot.closing(loaded, f"http://{listen}:{real_port}", tuple(broken)):
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
    ap.add_argument("--models-dir", help="default: ROOT/models")
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
    ap.add_argument("--dit-import-error", metavar="TYPE: MESSAGE",
                    help="what importing the Nunchaku DiT loader's module raises (it is not registered)")
    ap.add_argument("--comfyui-version", default="0.3.64", help="the core version it reports")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    models = args.models_dir
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
                               poison_after=args.poison_after, loader_error=args.loader_error,
                               comfyui_version=args.comfyui_version, dit_import_error=args.dit_import_error)
    except StartupFailed:
        return 1
    # SIGTERM ends it at once, as it ends real ComfyUI (no handler of its own: one that set an Event
    # deadlocked when a second SIGTERM came while the first one's was running); Ctrl-C stops it cleanly.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
