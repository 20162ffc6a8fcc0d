"""Verify one host: reach ComfyUI through a tunnel, check its device and nodes, run the verification
generations, judge them.

Liveness is not readiness: ComfyUI answering its API (`comfyui_reachable`) says nothing of whether
it can generate; `comfyui_ready` passes only once a first generation completed. The checks are the
rungs of a ladder (checks.LADDER), climbed in order: a rung that fails stops the climb.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from provisioner.config.model import Profile
from provisioner.connection.base import Connection, Held
from provisioner.errors import ProvisionError, VerifyError
from provisioner.facts.model import Facts
from provisioner.resources import service, units
from provisioner.verify import checks, graph as graphs
from provisioner.verify.kept import KeyedImage, image_key
from provisioner.verify.fingerprint import fingerprint
from provisioner.verify.checks import Check, HostVerification, ImageCheck, RunResult
from provisioner.verify.comfyui import ComfyClient, PromptHistory, PromptRejected, PromptTimeout
from provisioner.verify.images import look

INPUT_NAME = "provision_verify_input.png"   # where a given input image is uploaded (input/)
OUTPUT_PREFIX = "provision_verify"
VRAM_INTERVAL_MS = 200
FREE_POLL_S = 0.05         # how often /system_stats is read while /free takes effect
FREE_WAIT_S = 120.0         # /free is applied after whatever ComfyUI runs now: wait that long at most
FREED_MIB = 256             # torch holding no more than this: nothing is loaded
SETTLED_S = 1.0             # or: memory fell, then stayed put this long (what stays is not a model)
LOG_LINES = 400             # of the service's log, searched for why a node did not register
REACH_LINES = 15            # of it shown when ComfyUI does not answer
# One nvidia-smi for the whole verification, sampling by itself; it is killed when our stdin
# closes (fd 3: a background job's own stdin would be /dev/null), and its errors come out on stdout.
_STREAM = ('exec 3<&0; nvidia-smi "$@" </dev/null 2>&1 & pid=$!; '
           '(exec >/dev/null 2>&1; cat <&3; kill "$pid") & wait "$pid" 2>/dev/null')


class VramStream:
    """One long-lived `nvidia-smi --query-gpu=memory.used -lms N -i GPU` on the host (not one exec
    per sample), read in a thread: (monotonic time, MiB used) samples of ComfyUI's GPU."""

    def __init__(self, conn: Connection, gpu: str | None, interval_ms: int) -> None:
        self.conn = conn
        self.argv = ("sh", "-c", _STREAM, "sh", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                     "-lms", str(interval_ms), *(("-i", gpu) if gpu else ()))
        self.samples: list[tuple[float, int]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._held: Held | None = None
        self._thread = threading.Thread(target=self._read, name=f"vram-{conn.name}", daemon=True)

    def _read(self) -> None:
        try:
            with self.conn.hold(self.argv) as lines:
                self._held = lines
                for line in lines:
                    text = line.strip()
                    if text.isdigit():
                        self.samples.append((time.monotonic(), int(text)))
                    elif text:
                        self.error = f"nvidia-smi: {text[:160]}"
                    if self._stop.is_set():
                        return
        except ProvisionError as err:
            self.error = str(err)
        if not self.samples and not self.error:
            self.error = "nvidia-smi gave no reading"

    def __enter__(self) -> VramStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        # Once it has given a sample, nvidia-smi is let go at once rather than at its next sample
        # (up to an interval later); a sample arriving after the last generation ended counted for
        # none of them. With none yet, the first is still waited for, as before.
        if self.samples and self._held is not None:
            self._held.end()
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


def _sketch(png: bytes) -> object:
    """agreement.sketch, or None for what is no image (the agreement says so when it decodes it)."""
    from provisioner.verify import agreement     # numpy: loaded by then, while ComfyUI generates

    try:
        return agreement.sketch(png)
    except agreement.NotAnImage:
        return None


def _max(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def verify_host(conn: Connection, profile: Profile, facts: Facts | None | Callable[[], Facts | None], *,
                workflow_graph: Mapping[str, Any] | Callable[[Facts], Mapping[str, Any]],
                input_image: bytes | None = None, vram_interval_ms: int = VRAM_INTERVAL_MS,
                while_freeing: Callable[[], None] | None = None) -> HostVerification:
    """Run every check against the ComfyUI of `conn`'s host. Never raises for a host's failure.
    `while_freeing`: called (after ComfyUI's node list is read) while the cold start's /free takes
    effect, a wait of the host's own: the caller's work that should not compete with the connect.

    `facts` may be a function that waits for them (raising what stopped them), and `workflow_graph`
    one that renders it from them: then the tunnel, ComfyUI's first answers and the cold start's /free wait (none of which
    needs either) run while the facts are still being gathered.

    The first generation runs cold (`POST /free`, then wait until the memory is really released),
    then each prompt of `profile.verify.prompts` runs `warm_runs` warm times. Warm run j
    (1..warm_runs) uses seed `verify.seed + j`: fixed per run, yet never a repeat of the cold run,
    which ComfyUI would answer from its cache in milliseconds without sampling.
    """
    spec = profile.comfyui
    where = f"{spec.local_host}:{spec.port}"
    run = _Verification(conn, profile, facts, workflow_graph, input_image, where, vram_interval_ms, while_freeing)
    try:
        with conn.tunnel(spec.port, spec.local_host) as port, \
                ComfyClient(f"http://127.0.0.1:{port}", timeout=60.0,
                            label=f"{where} on {conn.name}", lost=conn.lost) as client:
            run.client = client
            run.all()
    except ProvisionError as err:      # tunnel refused, host gone mid-run, ComfyUI died mid-run
        run.found.append(Check("comfyui_reachable" if not run.found else "verification", False, str(err)))
    try:
        run.resolve()                   # a ComfyUI that never answered left them unasked
    except ProvisionError:
        pass                            # the caller's own wait for the facts reports this
    found_print = None if run.facts is None else fingerprint(run.facts, profile, run.stats, run.object_info,
                                                             run.graph)
    return HostVerification(conn.name, tuple(run.found), tuple(run.runs), run.version, run.device,
                            run.vram_peak, run.vram_baseline, found_print, images=tuple(run.images))


class _Verification:
    """The state of one host's verification while it runs; `found` holds the checks so far."""

    client: ComfyClient

    def __init__(self, conn: Connection, profile: Profile, facts: Facts | None | Callable[[], Facts | None],
                 graph: Mapping[str, Any] | Callable[[Facts], Mapping[str, Any]],
                 input_image: bytes | None, where: str, interval_ms: int,
                 while_freeing: Callable[[], None] | None = None) -> None:
        self.conn, self.profile = conn, profile
        self._while_freeing = while_freeing
        self._sources = (facts, graph)
        self._resolved = False
        self.facts: Facts | None = None
        self.graph: dict[str, Any] = {}
        self.input_image, self.where, self.interval_ms = input_image, where, interval_ms
        self.found: list[Check] = []
        self.runs: list[RunResult] = []
        self.version: str | None = None
        self.device: str | None = None
        self.vram_peak: int | None = None
        self.vram_baseline: int | None = None
        self.stats: dict[str, Any] | None = None
        self.object_info: dict[str, Any] | None = None
        self.images: list[KeyedImage] = []          # the first run of each prompt, whole
        self._log: list[str] | None = None
        self._cold_note = ""

    def resolve(self) -> None:
        """The facts (waiting for them if they are still being gathered) and the graph."""
        if self._resolved:
            return
        facts, graph = self._sources
        self.facts = found = facts() if callable(facts) else facts     # a failure to gather them raises
        if callable(graph):
            if found is None:
                raise VerifyError("no facts to render the workflow with")
            graph = graph(found)
        self.graph = dict(graph)
        self._resolved = True

    def all(self) -> None:
        try:
            stats = self.client.system_stats()
        except VerifyError as err:               # why it does not answer: its log's last lines
            self.found.append(Check("comfyui_reachable", False, str(err),
                                    lines=tuple(x for x in self._service_log() if x.strip())[-REACH_LINES:]))
            return
        self.found.append(checks.reachable(stats, self.where))
        self.stats = stats
        self.version = (stats.get("system") or {}).get("comfyui_version")
        self.device = checks.device_name(stats)
        # Before the facts are needed: releasing the models takes ComfyUI a while (its node list is
        # read meanwhile). Nothing that follows loads a model before the first generation.
        self._cold_note = self._cold_start(meanwhile=self._meanwhile)
        self.resolve()
        self.found.append(checks.device(stats, self.facts))
        self.found.append(checks.nodes(
            self.object_info, self.graph, service.required_nodes(self.profile),
            f"custom_nodes.{self.profile.plugin.name}", checks.backend_of(self.facts), self._cause))
        self.found += [c for c in (checks.custom_node_imports(self._logged()), self._listen_address()) if c]
        if not self._climbs_to("workflow"):
            return
        graph, size = self._inputs()
        self.client.listen()
        gpu = self.facts.gpu if self.facts is not None else None
        selector = (gpu.uuid or str(gpu.index)) if gpu is not None else None
        if not checks.on_gpu(stats):
            self._generate(graph, size, None, "not measured: ComfyUI does not run on a GPU")
            return
        with VramStream(self.conn, selector, self.interval_ms) as vram:
            self._generate(graph, size, vram, "")

    def _climbs_to(self, rung: str) -> bool:
        """The ladder (checks.LADDER) goes on to `rung` only when every rung below it passed."""
        failed = checks.ladder(self.found).failed
        return failed is None or checks.RUNGS.index(failed) >= checks.RUNGS.index(rung)

    def _logged(self) -> list[str]:
        """ComfyUI's log: its /internal/logs, else the service's log (the journal, the container's
        log, the profile's log file); read once."""
        if self._log is None:
            self._log = self.client.logs() or self._service_log()
        return self._log

    def _cause(self, node: str) -> str | None:
        """ComfyUI's own words for a node that did not register."""
        return checks.import_failure(self._logged(), node)

    def _listen_address(self) -> Check | None:
        if self.facts is None:
            return None
        port, spec = self.profile.comfyui.port, self.profile.comfyui
        return checks.listen_address(self.facts.listeners.get(port, ()), units.exposed(self.profile, self.facts, port),
                                     spec.listen, self.profile.verify.allow_exposed, units.describe)

    def _service_log(self) -> list[str]:
        step = service.log_step(self.profile, LOG_LINES)
        if step is None:
            return []
        where = self.conn.machine if step.on_machine else self.conn
        try:
            res = where.run(step.argv, timeout=step.timeout, check=False)
        except ProvisionError:
            return []
        return (res.stdout + "\n" + res.stderr).splitlines()

    def _inputs(self) -> tuple[dict[str, Any], tuple[int, int] | None]:
        """The graph with its input image in place, and the size its output should have."""
        graph, names, source = self.graph, graphs.load_image_names(self.graph), self.input_image
        if names and self.input_image is not None:   # our own name: the host's input/ files stay untouched
            self.client.upload_image(INPUT_NAME, self.input_image)
            graph = graphs.prepare(graph, image=INPUT_NAME)
        elif names:                                  # the host's own file (example.png): its size decides
            try:
                source = self.client.view(names[0], type="input")
            except VerifyError:
                source = None                        # ComfyUI's validation will name the missing file
        return graph, graphs.expected_size(graph, _size(source))

    def _meanwhile(self) -> None:
        self.object_info = self.client.object_info()
        if self._while_freeing is not None:
            self._while_freeing()

    def _cold_start(self, meanwhile: Callable[[], None]) -> str:
        """POST /free, then (after `meanwhile`, while it takes effect) wait until ComfyUI really
        released the models: ComfyUI applies /free only between prompts, and unloading takes
        time. Returns a note when it did not."""
        self.client.free(unload_models=True, free_memory=True)
        meanwhile()
        started = time.monotonic()
        first = last = None
        last_drop = started
        while True:
            stats = self.client.system_stats()
            reserved = checks.torch_reserved_mib(stats)
            now = time.monotonic()
            if reserved is None or reserved <= FREED_MIB:
                break
            if last is not None and reserved < last:
                last_drop = now
            if first is not None and reserved < first and now - last_drop >= SETTLED_S:
                break
            first = reserved if first is None else first
            last = reserved
            if now - started > FREE_WAIT_S:
                return f"(models still loaded {FREE_WAIT_S:g} s after /free: not a cold start)"
            time.sleep(FREE_POLL_S)
        # The device's own reading at that moment (nvidia-smi's samples trail it by up to an interval).
        self.vram_baseline = checks.vram_used_mib(stats)
        return ""

    def _generate(self, graph: dict[str, Any], size: tuple[int, int] | None, vram: VramStream | None,
                  no_vram: str) -> None:
        # Each image is judged and thumbnailed in a thread while ComfyUI makes the next one (about
        # 0.1 s of the controller's CPU per 1024 px image, no longer between two generations).
        # The first image of each prompt, kept for the agreement, is sketched there too.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"images-{self.conn.name}") as pool:
            looks: list[Future[tuple[ImageCheck, bytes]]] = []
            sketches: list[Future[object]] = []
            try:
                done = self._generations(graph, vram, lambda png: looks.append(pool.submit(look, png, size)),
                                         lambda png: sketches.append(pool.submit(_sketch, png)))
            finally:
                self.runs = [dataclasses.replace(run, image=image, thumbnail=thumb)
                             for run, (image, thumb) in zip(self.runs, (look.result() for look in looks))]
                self.images = [dataclasses.replace(kept, sketch=made.result())
                               for kept, made in zip(self.images, sketches)]
        if done:
            result = HostVerification(self.conn.name, (), tuple(self.runs), None, None, self.vram_peak,
                                      self.vram_baseline)
            self.found.extend(checks.judge(self.runs, result.figures, self.profile.verify.thresholds,
                                           self._vram_source(vram, no_vram), self._cold_note))

    def _generations(self, graph: dict[str, Any], vram: VramStream | None,
                     look: Callable[[bytes], None], keep: Callable[[bytes], None]) -> bool:
        """The cold run, then the warm ones; each image goes to `look`, each kept one (the first
        of its prompt) to `keep` as well. False: one failed."""
        verify = self.profile.verify
        prompts = verify.prompts or (self.profile.workflow.prompt,)
        plan: list[tuple[str, Literal["cold", "warm"], int]] = [(prompts[0], "cold", verify.seed)]
        plan += [(p, "warm", verify.seed + j) for p in prompts for j in range(1, verify.warm_runs + 1)]
        stats_peaks: list[int | None] = []
        # A run's image is fetched (and its run recorded) once the next run is queued: ComfyUI
        # generates while it comes through the tunnel (2 MB for 1024 px).
        fetch: Callable[[], None] | None = None
        for index, (prompt, kind, seed) in enumerate(plan):
            tag = f"{OUTPUT_PREFIX}/{index:02d}-{kind}"
            start = time.monotonic()
            try:
                prompt_id = self.client.queue_prompt(graphs.prepare(graph, prompt=prompt, seed=seed, prefix=tag))
            except PromptRejected as err:
                if fetch is not None:
                    fetch()
                self.found.append(Check("workflow_accepted", False, err.headline, lines=err.node_lines))
                return False
            if fetch is not None:
                try:
                    fetch()
                except ProvisionError:
                    with contextlib.suppress(ProvisionError):   # the fetch's error is the one to tell
                        self.client.cancel(prompt_id)           # not left to run on unseen
                    raise
                fetch = None
            if not self.runs:
                self.found.append(Check("workflow_accepted", True, f"{len(graph)} nodes validated by ComfyUI"))
            done, failure = self._wait(prompt_id, prompt, kind)
            end = time.monotonic()
            if done is None:
                self._failed(failure)
                return False
            if cached := self._from_cache(graph, done, kind, prompt, seed, end - start):
                self.found.append(cached)
                return False
            stats_peaks.append(checks.vram_used_mib(self.client.system_stats()))
            peak = _max(vram.peak(start, end) if vram else None, stats_peaks[-1])
            fetch = functools.partial(self._fetched, graph, done, RunResult(prompt, kind, seed, prompt_id, done.seconds,
                                                                           end - start, peak, None), look, keep)
        if fetch is not None:
            fetch()
        n = len(self.runs)
        self.found.append(Check("generation", True, f"{n} runs ({sum(r.kind == 'cold' for r in self.runs)} "
                                f"cold) of {len(prompts)} prompt(s) completed", float(n)))
        self.found.append(Check("runs_sampled", True, f"seeds {', '.join(str(r.seed) for r in self.runs)}; "
                                "no run was served from ComfyUI's cache"))
        self.vram_peak = _max(*(r.vram_peak_mib for r in self.runs), *stats_peaks)
        return True

    def _fetched(self, graph: Mapping[str, Any], done: PromptHistory, run: RunResult,
                 look: Callable[[bytes], None], keep: Callable[[bytes], None]) -> None:
        """A finished run's image fetched and handed on, and the run recorded."""
        png = self.client.view(done.images[0].filename, done.images[0].subfolder, done.images[0].type)
        self.runs.append(run)
        look(png)
        if all(kept.prompt != run.prompt for kept in self.images):
            key = image_key(run.prompt, run.seed, graphs.prepare(graph, prompt=run.prompt, seed=run.seed))
            self.images.append(KeyedImage(key, run.prompt, run.seed, png))
            keep(png)
        if len(self.runs) == 1:
            self.found.append(Check("comfyui_ready", True, f"a first generation completed ({run.kind}, "
                                    f"{self.runs[0].seconds:.2f} s)"))

    @staticmethod
    def _from_cache(graph: Mapping[str, Any], done: PromptHistory, kind: str, prompt: str, seed: int,
                    seconds: float) -> Check | None:
        """A run ComfyUI answered from its cache (`cached_nodes` covers every node but the savers)
        sampled nothing: its time would pass any threshold while saying nothing of the GPU."""
        computing = graphs.computing_nodes(graph)
        if not computing or not computing <= set(done.cached_nodes):
            return None
        return Check("runs_sampled", False, f"{kind} run of {prompt!r} (seed {seed}) was served from ComfyUI's "
                     f"cache in {seconds:.2f} s: all {len(computing)} computing nodes cached, nothing sampled; "
                     "the workflow has no seed input provision can set (an input named seed or noise_seed)")

    def _wait(self, prompt_id: str, prompt: str, kind: str) -> tuple[PromptHistory | None, str]:
        """Until the prompt is done: (its history, "") when it made an image, else (None, why not).
        One that runs out of time is taken out of ComfyUI's queue, so it does not run on unseen."""
        timeout = self.profile.verify.timeout_s
        try:
            done = self.client.wait(prompt_id, timeout)
        except PromptTimeout:
            left = self.client.cancel(prompt_id)
            fate = ("interrupted and removed from ComfyUI's queue" if left is None else
                    f"still {left} in ComfyUI's queue after an attempt to remove it")
            return None, f"{kind} run of {prompt!r} did not finish within {timeout:g} s; {fate}"
        if done.error is not None and checks.poisoned(done.error.exception_type, done.error.exception_message):
            restart = service.restart_argv(self.profile)
            how = f"`{' '.join(restart)}`" if restart else "ComfyUI's process"
            return None, (f"{kind} run of {prompt!r}: {done.error}: this CUDA error poisons ComfyUI's "
                          f"process, every later generation fails until it restarts: restart {how}")
        if done.state == "error" or not done.images:
            return None, f"{kind} run of {prompt!r}: {done.error or 'finished without an output image'}"
        return done, ""

    def _failed(self, why: str) -> None:
        """A generation failed: ComfyUI is not ready if none had completed yet."""
        if not self.runs:
            self.found.append(Check("comfyui_ready", False, f"no generation completed: {why}"))
        self.found.append(Check("generation", False, why))

    def _vram_source(self, vram: VramStream | None, no_vram: str) -> str:
        if vram is None:
            return no_vram
        gpu = self.facts.gpu if self.facts is not None else None
        on = f" of {gpu.uuid or gpu.index}" if gpu is not None else ""
        idle = "" if self.vram_baseline is None else f", {checks.gib(self.vram_baseline):.2f} GiB after /free"
        if vram.samples:
            return f"nvidia-smi stream{on} and /system_stats{idle}"
        return f"/system_stats only; {vram.error or 'no nvidia-smi sample'}{idle}"

