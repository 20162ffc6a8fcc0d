"""Verify one host: reach ComfyUI through a tunnel, run the verification generations, judge them."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from provisioner.config.model import Profile
from provisioner.connection.base import Connection
from provisioner.errors import ProvisionError, VerifyError
from provisioner.facts.model import Facts
from provisioner.verify import checks, graph as graphs
from provisioner.verify.checks import Check, HostVerification, RunResult
from provisioner.verify.comfyui import ComfyClient, PromptRejected
from provisioner.verify.images import check_image, thumbnail

INPUT_NAME = "provision_verify_input.png"   # where a given input image is uploaded (input/)
OUTPUT_PREFIX = "provision_verify"
VRAM_INTERVAL_S = 0.5


class VramSampler:
    """Polls `nvidia-smi` on the host in a thread: (monotonic time, MiB used) samples."""

    def __init__(self, conn: Connection, gpu_index: int | None, interval: float) -> None:
        self.conn, self.interval = conn, interval
        self.argv = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        if gpu_index is not None:
            self.argv += ["-i", str(gpu_index)]
        self.samples: list[tuple[float, int]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"vram-{conn.name}", daemon=True)

    def _loop(self) -> None:
        while True:
            try:
                res = self.conn.run(self.argv, check=False, timeout=10)
            except ProvisionError as err:
                self.error = str(err)
                return
            line = res.stdout.strip().splitlines()[:1] if res.ok else []
            if not line or not line[0].strip().isdigit():
                self.error = f"nvidia-smi: {(res.stderr or res.stdout).strip()[:120] or 'no figure'}"
                return
            self.samples.append((time.monotonic(), int(line[0])))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> VramSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def peak(self, start: float, end: float) -> int | None:
        inside = [mib for t, mib in self.samples if start <= t <= end]
        return max(inside) if inside else None


def _size(png: bytes | None) -> tuple[int, int] | None:
    if png is None:
        return None
    try:
        with Image.open(io.BytesIO(png)) as img:
            return img.size
    except (UnidentifiedImageError, OSError):
        return None                           # not an image: ComfyUI's LoadImage will say so


def _max(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def verify_host(conn: Connection, profile: Profile, facts: Facts | None, *,
                workflow_graph: Mapping[str, Any], input_image: bytes | None = None,
                vram_interval_s: float = VRAM_INTERVAL_S) -> HostVerification:
    """Run every check against the ComfyUI of `conn`'s host. Never raises for a host's failure.

    The first generation runs cold (`POST /free` unloads models first), then each prompt of
    `profile.verify.prompts` runs `warm_runs` warm times. Warm run j (1..warm_runs) uses seed
    `verify.seed + j`: fixed per run, yet never a repeat of the cold run, which ComfyUI would
    answer from its cache in milliseconds without sampling.
    """
    spec = profile.comfyui
    remote = "127.0.0.1" if spec.listen in ("0.0.0.0", "::", "") else spec.listen
    where = f"{remote}:{spec.port}"
    found: list[Check] = []
    runs: list[RunResult] = []
    meta: dict[str, str | None] = {}
    try:
        with conn.tunnel(spec.port, remote) as port, \
                ComfyClient(f"http://127.0.0.1:{port}", timeout=60.0,
                            label=f"{where} on {conn.name}") as client:
            _verify(client, conn, profile, facts, dict(workflow_graph), input_image, where,
                    vram_interval_s, found, runs, meta)
    except ProvisionError as err:      # tunnel refused, host gone mid-run, ComfyUI died mid-run
        name = "comfyui_reachable" if not found else "verification"
        found.append(Check(name, False, str(err)))
    return HostVerification(conn.name, tuple(found), tuple(runs), meta.get("version"), meta.get("device"))


def _verify(client: ComfyClient, conn: Connection, profile: Profile, facts: Facts | None,
            graph: dict[str, Any], input_image: bytes | None, where: str, interval: float,
            found: list[Check], runs: list[RunResult], meta: dict[str, str | None]) -> None:
    try:
        stats = client.system_stats()
    except VerifyError as err:
        found.append(Check("comfyui_reachable", False, str(err)))
        return
    found.append(checks.reachable(stats, where))
    meta["version"] = (stats.get("system") or {}).get("comfyui_version")
    meta["device"] = checks.device_of(stats)[0]
    found.append(checks.nodes(client.object_info(), graph))

    names = graphs.load_image_names(graph)
    source = input_image
    if names and input_image is not None:     # our own name: the host's input/ files stay untouched
        client.upload_image(INPUT_NAME, input_image)
        graph = graphs.prepare(graph, image=INPUT_NAME)
    elif names:                               # the host's own file (example.png): its size decides
        try:
            source = client.view(names[0], type="input")
        except VerifyError:
            source = None                     # ComfyUI's validation will name the missing file
    size = graphs.expected_size(graph, _size(source))
    verify = profile.verify
    gpu = facts.gpu if facts is not None else None
    client.listen()
    client.free(unload_models=True, free_memory=True)   # so the first run is really cold
    vram_stats: list[int | None] = [checks.vram_used_mib(stats)]
    prompts = verify.prompts or (profile.workflow.prompt,)
    cold: list[tuple[str, Literal["cold", "warm"], int]] = [(prompts[0], "cold", verify.seed)]
    plan = cold + [(p, "warm", verify.seed + j) for p in prompts for j in range(1, verify.warm_runs + 1)]
    with VramSampler(conn, gpu.index if gpu else None, interval) as sampler:
        for prompt, kind, seed in plan:
            tag = f"{OUTPUT_PREFIX}/{len(runs):02d}-{kind}"
            run_graph = graphs.prepare(graph, prompt=prompt, seed=seed, prefix=tag)
            start = time.monotonic()
            try:
                prompt_id = client.queue_prompt(run_graph)
            except PromptRejected as err:
                found.append(Check("workflow_accepted", False, f"{err.type}: {err.message}"
                                   + (f" ({err.details})" if err.details else ""),
                                   lines=err.node_lines))
                return
            if not runs:
                found.append(Check("workflow_accepted", True,
                                   f"{len(graph)} nodes validated by ComfyUI"))
            done = client.wait(prompt_id, verify.timeout_s)
            end = time.monotonic()
            after = checks.vram_used_mib(client.system_stats())
            vram_stats.append(after)
            if done.state == "error" or not done.images:
                why = str(done.error) if done.error else "finished without an output image"
                found.append(Check("generation", False, f"{kind} run of {prompt!r}: {why}"))
                return
            png = client.view(done.images[0].filename, done.images[0].subfolder, done.images[0].type)
            runs.append(RunResult(prompt, kind, seed, prompt_id, done.seconds, end - start,
                                  _max(sampler.peak(start, end), after),
                                  check_image(png, size), thumbnail(png)))
    found.append(Check("generation", True, f"{len(runs)} runs ({sum(r.kind == 'cold' for r in runs)} "
                       f"cold) of {len(verify.prompts)} prompt(s) completed", float(len(runs))))
    vram_source = "nvidia-smi samples and /system_stats" if sampler.samples else \
        f"/system_stats only; {sampler.error or 'no nvidia-smi sample'}"
    peak = _max(*(r.vram_peak_mib for r in runs), *vram_stats)
    found.extend(checks.judge(runs, verify.thresholds, peak, vram_source))
