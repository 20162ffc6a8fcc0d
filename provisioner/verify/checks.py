"""What a verification found (Check, RunResult, Figures, HostVerification) and the pure checks that
judge it. The console and the report read these very types; the report writes them as JSON and
reads them back (`to_json` / `from_json`). Every VRAM figure is GiB (2**30 bytes: nvidia-smi's
MiB / 1024), shown as GiB.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from provisioner.catalog.models import NodeRequirement
from provisioner.config.model import Thresholds
from provisioner.facts.model import Facts, Gpu
from provisioner.facts.parse import is_real_nunchaku
from provisioner.verify.fingerprint import Fingerprint
from provisioner.verify.kept import Agreement, KeyedImage


# CUDA errors that poison the process: once a kernel faulted, every later CUDA call of that
# process fails the same way, so only a restart brings ComfyUI back.
STICKY_CUDA_ERRORS = ("illegal memory access", "misaligned address", "unspecified launch failure",
                      "device-side assert", "illegal instruction")
_IMPORT_FAILED = re.compile(r"Nodes? `.*import failed:?")
# ComfyUI's own lines for a custom node that failed to import (nodes.py): its import time marked so,
# and the error it logged beneath the traceback.
_PACK_FAILED = re.compile(r"[\d.]+ seconds \(IMPORT FAILED\): (.+?)\s*$")
_CANNOT_IMPORT = re.compile(r"Cannot import (.+?) module for custom nodes: (.*?)\s*$")
_EXCEPTION = re.compile(r"\b[A-Za-z_][\w.]*(Error|Exception)\b(:.*)?$")


def _finite(value: Any) -> float | None:
    """A number for JSON: NaN/inf (a broken measurement) or a non-number become None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _mib(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    value: float | None = None
    lines: tuple[str, ...] = ()     # further detail, one line each (per-node errors)
    warning: bool = False           # passed, but says what an operator should know (a broken pack)

    @property
    def mark(self) -> str:
        return "FAIL" if not self.passed else "WARN" if self.warning else "PASS"

    @property
    def line(self) -> str:
        return f"{self.mark} {self.name}: {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail, "value": _finite(self.value),
                "lines": list(self.lines), "warning": self.warning}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Check:
        return cls(str(raw["name"]), bool(raw["passed"]), str(raw.get("detail", "")), _finite(raw.get("value")),
                   tuple(str(x) for x in raw.get("lines") or ()), bool(raw.get("warning", False)))


# The ladder a verification climbs, in order: each rung and the checks that make it. A rung is
# climbed only when every rung below it passed: a ComfyUI that lacks the plugin's nodes is not
# sent a workflow, one that cannot make a first image is not timed. `device` (ComfyUI on the
# host's GPU) belongs to the timed runs: a ComfyUI on another device still generates, but its
# figures are not that GPU's.
LADDER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reachable", ("comfyui_reachable", "listen_address")),
    ("nodes", ("nodes_registered", "custom_nodes_imported")),
    ("workflow", ("workflow_accepted",)),
    ("first_generation", ("comfyui_ready",)),
    ("timed_runs", ("device", "generation", "runs_sampled", "cold_time", "warm_time", "vram_peak")),
    ("images", ("images_ok",)),
    ("agreement", ("image_agreement",)),
)
RUNGS = tuple(rung for rung, _ in LADDER)
RUNG_OF = {name: rung for rung, names in LADDER for name in names}


@dataclass(frozen=True)
class Ladder:
    """How far up the ladder a verification got: each rung passed, failed or not reached."""

    states: tuple[tuple[str, str], ...]          # (rung, "passed" | "failed" | "not reached")

    @property
    def failed(self) -> str | None:
        """The rung it stopped at, or None when nothing failed."""
        return next((rung for rung, state in self.states if state == "failed"), None)

    @property
    def line(self) -> str:
        marks = {"passed": "✓", "failed": "✗", "not reached": "·"}
        return " > ".join(f"{rung} {marks[state]}" for rung, state in self.states)

    def to_json(self) -> dict[str, Any]:
        return {"failed_rung": self.failed, "rungs": [{"rung": r, "state": s} for r, s in self.states]}


def ladder(found: Sequence[Check], *, unreachable: bool = False) -> Ladder:
    """The rungs of these checks: failed (one of its checks failed), passed (all passed) or not
    reached (none ran, or a rung below it failed). A failed check of no rung (the connection lost
    mid-run), or a host not reached at all, fails the first rung that had not passed."""
    failed = {RUNG_OF.get(c.name) for c in found if not c.passed} | ({None} if unreachable else set())
    seen = {RUNG_OF.get(c.name) for c in found}
    states = [(rung, "failed" if rung in failed else "passed" if rung in seen else "not reached")
              for rung in RUNGS]
    if None in failed and not any(state == "failed" for _, state in states):
        first = next((i for i, (_, state) in enumerate(states) if state != "passed"), None)
        if first is not None:
            states[first] = (states[first][0], "failed")
    # Above the first failed rung nothing counts as climbed (a check that ran early, `device`, passes
    # at timed_runs only once the runs were timed); what failed there still shows.
    stop = next((i for i, (_, state) in enumerate(states) if state == "failed"), len(states))
    states = states[:stop + 1] + [(rung, "failed" if state == "failed" else "not reached")
                                  for rung, state in states[stop + 1:]]
    return Ladder(tuple(states))


# What images.look found in one picture. Here, not beside the code that judges it: a run that
# only reads or writes results (every apply, the report) imports no Pillow.
@dataclass(frozen=True)
class ImageCheck:
    ok: bool
    width: int
    height: int
    mean: float                   # mean luminance, 0-255
    std: float                    # luminance standard deviation
    black_fraction: float         # exact (0,0,0) pixels
    saturated_fraction: float     # pure-primary/secondary pixels (NaN tiles)
    reasons: tuple[str, ...] = ()  # why it failed, one short phrase each

    @property
    def summary(self) -> str:
        if self.ok:
            return f"{self.width}x{self.height}, mean {self.mean:.0f}, std {self.std:.0f}"
        return f"{self.width}x{self.height}: " + "; ".join(self.reasons)



def image_to_json(image: ImageCheck) -> dict[str, Any]:
    return {"ok": image.ok, "width": image.width, "height": image.height, "mean": _finite(image.mean),
            "std": _finite(image.std), "black_fraction": _finite(image.black_fraction),
            "saturated_fraction": _finite(image.saturated_fraction), "reasons": list(image.reasons)}


def image_from_json(raw: Mapping[str, Any]) -> ImageCheck:
    return ImageCheck(bool(raw.get("ok")), int(raw.get("width") or 0), int(raw.get("height") or 0),
                      _finite(raw.get("mean")) or 0.0, _finite(raw.get("std")) or 0.0,
                      _finite(raw.get("black_fraction")) or 0.0, _finite(raw.get("saturated_fraction")) or 0.0,
                      tuple(str(r) for r in raw.get("reasons") or ()))


@dataclass(frozen=True)
class RunResult:
    prompt: str
    kind: Literal["cold", "warm"]
    seed: int
    prompt_id: str
    seconds_comfy: float | None      # ComfyUI's execution_start -> execution_success
    seconds_wall: float              # queue -> history done, seen from here
    vram_peak_mib: int | None
    image: ImageCheck | None
    thumbnail: bytes = b""           # PNG, at most 256 px

    @property
    def seconds(self) -> float:
        """The figure thresholds use: ComfyUI's own timing when it gave one."""
        return self.seconds_comfy if self.seconds_comfy is not None else self.seconds_wall

    def to_json(self, *, thumbnail: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": self.prompt, "kind": self.kind, "seed": self.seed, "prompt_id": self.prompt_id,
            "seconds_comfy": _finite(self.seconds_comfy), "seconds_wall": round(_finite(self.seconds_wall) or 0.0, 3),
            "vram_peak_mib": self.vram_peak_mib,
            "image": None if self.image is None else image_to_json(self.image)}
        if thumbnail:
            out["thumbnail_png_base64"] = base64.b64encode(self.thumbnail).decode() if self.thumbnail else None
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RunResult:
        try:
            png = base64.b64decode(raw.get("thumbnail_png_base64") or "", validate=True)
        except (binascii.Error, ValueError):
            png = b""                 # a garbled thumbnail loses the picture, not the run
        seed = raw.get("seed")
        return cls(str(raw.get("prompt", "")), "cold" if raw.get("kind") == "cold" else "warm",
                   seed if isinstance(seed, int) and not isinstance(seed, bool) else 0,
                   str(raw.get("prompt_id") or ""), _finite(raw.get("seconds_comfy")),
                   _finite(raw.get("seconds_wall")) or 0.0, _mib(raw.get("vram_peak_mib")),
                   None if raw.get("image") is None else image_from_json(raw["image"]), png)


@dataclass(frozen=True)
class Figures:
    """A host's headline numbers, computed here once; the console, the report and the checks read them."""

    cold_s: float | None = None
    warm_median_s: float | None = None
    warm_max_s: float | None = None
    vram_peak_gib: float | None = None
    vram_baseline_gib: float | None = None       # what the GPU held after /free, before the cold run

    @classmethod
    def of(cls, runs: Sequence[RunResult], vram_peak_mib: int | None = None,
           vram_baseline_mib: int | None = None) -> Figures:
        cold = [r.seconds for r in runs if r.kind == "cold"]
        warm = [r.seconds for r in runs if r.kind == "warm"]
        peaks = [m for m in (vram_peak_mib, *(r.vram_peak_mib for r in runs)) if m is not None]
        return cls(
            cold_s=round(cold[0], 3) if cold else None,
            warm_median_s=round(statistics.median(warm), 3) if warm else None,
            warm_max_s=round(max(warm), 3) if warm else None,
            vram_peak_gib=gib(max(peaks)) if peaks else None,
            vram_baseline_gib=None if vram_baseline_mib is None else gib(vram_baseline_mib))

    def to_json(self) -> dict[str, Any]:
        return {"cold_s": self.cold_s, "warm_median_s": self.warm_median_s, "warm_max_s": self.warm_max_s,
                "vram_peak_gib": self.vram_peak_gib, "vram_baseline_gib": self.vram_baseline_gib}


def gib(mib: int) -> float:
    """MiB (nvidia-smi's unit) as GiB, to the hundredth shown everywhere."""
    return round(mib / 1024, 2)


@dataclass(frozen=True)
class HostVerification:
    host: str
    checks: tuple[Check, ...]
    runs: tuple[RunResult, ...] = ()
    comfyui_version: str | None = None
    device: str | None = None                    # ComfyUI's own name for it: "cuda:0 NVIDIA … : cudaMallocAsync"
    vram_peak_mib: int | None = None             # every reading during the runs, not only per run
    vram_baseline_mib: int | None = None
    fingerprint: Fingerprint | None = None
    agreement: tuple[Agreement, ...] = ()        # set once the fleet's references are known
    # The first run of each prompt, whole, for that comparison; never written out.
    images: tuple[KeyedImage, ...] = field(default=(), compare=False, repr=False)
    figures: Figures = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "figures", Figures.of(self.runs, self.vram_peak_mib, self.vram_baseline_mib))

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def ladder(self) -> Ladder:
        return ladder(self.checks)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping (thumbnails base64) for the fleet report."""
        return {"host": self.host, "passed": self.passed, "ladder": self.ladder.to_json(),
                "comfyui_version": self.comfyui_version,
                "device": self.device, "vram_peak_mib": self.vram_peak_mib,
                "vram_baseline_mib": self.vram_baseline_mib, "figures": self.figures.to_json(),
                "checks": [c.to_json() for c in self.checks], "runs": [r.to_json() for r in self.runs],
                "fingerprint": None if self.fingerprint is None else self.fingerprint.to_json(),
                "agreement": [a.to_json() for a in self.agreement]}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> HostVerification:
        """Back from `to_json` (figures are recomputed from the runs, never trusted from the file)."""
        return cls(str(raw.get("host", "")), tuple(Check.from_json(c) for c in raw.get("checks") or ()),
                   tuple(RunResult.from_json(r) for r in raw.get("runs") or ()),
                   raw.get("comfyui_version"), raw.get("device"), _mib(raw.get("vram_peak_mib")),
                   _mib(raw.get("vram_baseline_mib")),
                   Fingerprint.from_json(raw["fingerprint"]) if isinstance(raw.get("fingerprint"), Mapping) else None,
                   tuple(Agreement.from_json(a) for a in raw.get("agreement") or () if isinstance(a, Mapping)))


# -- the checks ---------------------------------------------------------------------------------

def _device(stats: Mapping[str, Any]) -> Mapping[str, Any]:
    return (stats.get("devices") or [{}])[0]


def device_name(stats: Mapping[str, Any]) -> str | None:
    return _device(stats).get("name")


def on_gpu(stats: Mapping[str, Any]) -> bool:
    return _device(stats).get("type") == "cuda"


def vram_used_mib(stats: Mapping[str, Any]) -> int | None:
    """What the GPU holds, from /system_stats; None on a CPU device (its figures are RAM)."""
    dev = _device(stats)
    total, free = dev.get("vram_total"), dev.get("vram_free")
    if not on_gpu(stats) or not isinstance(total, int) or not isinstance(free, int):
        return None
    return (total - free) // 2**20


def torch_reserved_mib(stats: Mapping[str, Any]) -> int | None:
    """What torch's allocator holds on the GPU (models, caches): near 0 once everything is unloaded."""
    reserved = _device(stats).get("torch_vram_total")
    return reserved // 2**20 if on_gpu(stats) and isinstance(reserved, int) else None


def reachable(stats: Mapping[str, Any], where: str) -> Check:
    """Liveness: ComfyUI answers its API. Not readiness: a poisoned process answers too."""
    version = (stats.get("system") or {}).get("comfyui_version", "?")
    return Check("comfyui_reachable", True, f"ComfyUI {version} answers at {where}")


def gpu_label(gpu: Gpu) -> str:
    return f"{gpu.index}: {gpu.name} {gpu.uuid}".rstrip()


def device(stats: Mapping[str, Any], facts: Facts | None) -> Check:
    """ComfyUI runs on the GPU it should: not on the CPU of a host that has one, and on the GPU
    `comfyui.gpu` names. ComfyUI names its device, not its UUID: the names are compared."""
    dev = _device(stats)
    name = str(dev.get("name") or "no device")
    if facts is None:
        return Check("device", True, f"ComfyUI runs on {name} (the host's GPUs were not read)")
    gpu = facts.gpu
    if not on_gpu(stats):
        if gpu is None:
            return Check("device", True, f"ComfyUI runs on {name}; the host lists no GPU "
                                         f"({facts.gpu_error or 'nvidia-smi lists none'})")
        torch = facts.env.torch or ""
        why = (f"its torch {torch} is a CPU build" if "+cpu" in torch else
               "it was started with --cpu, or its torch cannot reach the GPU")
        return Check("device", False, f"ComfyUI runs on the CPU ({name}) although the host has "
                                      f"{gpu_label(gpu)}: {why}")
    if gpu is None:
        return Check("device", True, f"ComfyUI runs on {name}; nvidia-smi lists no GPU "
                                     f"({facts.gpu_error or 'none'}), so VRAM comes from ComfyUI alone")
    if gpu.name not in name:
        whose = "the one comfyui.gpu names" if facts.comfyui_gpu is not None else "the first nvidia-smi lists"
        return Check("device", False, f"ComfyUI runs on {name}, not on {gpu_label(gpu)} ({whose}): give "
                                      f"ComfyUI CUDA_VISIBLE_DEVICES={gpu.uuid or gpu.index}, or set comfyui.gpu "
                                      "to the GPU it uses")
    return Check("device", True, f"ComfyUI runs on {name}: {gpu_label(gpu)}, {gpu.vram_total_mib / 1024:.2f} GiB")


def backend_of(facts: Facts | None) -> str | None:
    """The nunchaku in ComfyUI's venv, as the nodes check words it: its version, `PyPI's unrelated
    nunchaku X`, `missing`; None when the host's packages were not read."""
    if facts is None or not facts.env.exists:
        return None
    dist = facts.env.distributions.get("nunchaku")
    if dist is None:
        return "missing"
    return dist.version if is_real_nunchaku(dist) else f"PyPI's unrelated nunchaku {dist.version}"


def import_failure(lines: Sequence[str], node: str) -> str | None:
    """ComfyUI's own words for why `node` did not register: ComfyUI-nunchaku's "Node `X` import
    failed:" line, with the exception its traceback ends in."""
    for i, line in enumerate(lines):
        found = _IMPORT_FAILED.search(line)
        if not found or f"`{node}`" not in line:
            continue
        for later in lines[i + 1:]:
            if _IMPORT_FAILED.search(later):
                break
            error = _EXCEPTION.search(later)
            if error and not later.lstrip().startswith(("File ", "Traceback")):
                return f"{found.group(0)} {error.group(0).strip()}"
        return found.group(0)
    return None


def custom_node_imports(lines: Sequence[str]) -> Check | None:
    """Every custom node ComfyUI logged as `(IMPORT FAILED)`, each with the error it logged: a
    warning row (ComfyUI runs on without them, and the workflow may not need them); a passing row
    when its import times list none; None when its log holds no import times to read."""
    if not any("Import times for custom nodes" in line for line in lines):
        return None
    failed = list(dict.fromkeys(m.group(1) for line in lines if (m := _PACK_FAILED.search(line))))
    if not failed:
        return Check("custom_nodes_imported", True, "ComfyUI imported every custom node")
    said = {m.group(1): m.group(2) for line in lines if (m := _CANNOT_IMPORT.search(line))}
    return Check("custom_nodes_imported", True,
                 f"{len(failed)} custom node{'s' * (len(failed) != 1)} failed to import, ComfyUI runs without "
                 f"{'them' if len(failed) != 1 else 'it'}: {', '.join(failed)}", value=float(len(failed)),
                 lines=tuple(f"{path}: {said.get(path, 'see ComfyUI log')}" for path in failed), warning=True)


def listen_address(listeners: Sequence[Any], exposed: Sequence[Any], listen: str, allowed: bool,
                   describe: Callable[[Sequence[Any]], str]) -> Check | None:
    """ComfyUI listening beyond loopback while the profile says loopback (`exposed`): a failure unless
    `verify.allow_exposed`; None when the facts name no listener."""
    if not listeners:
        return None
    if not exposed:
        return Check("listen_address", True, f"ComfyUI listens on {describe(listeners)}, as comfyui.listen "
                                             f"{listen} says")
    said = f"ComfyUI listens on {describe(exposed)}: anyone who reaches this host can use it"
    if allowed:
        return Check("listen_address", True, f"{said} (allowed by verify.allow_exposed)", warning=True)
    return Check("listen_address", False, f"{said}, and comfyui.listen says {listen}: restart it with --listen "
                                          f"{listen} (apply does, under comfyui.service: systemd), or set "
                                          "verify.allow_exposed: true if that is meant")


def _missing(req: NodeRequirement, plugin_nodes: list[str], plugin_module: str, backend: str | None,
             cause: str | None) -> str:
    logged = f"; ComfyUI logged: {cause}" if cause else ""
    if not req.plugin:
        return f"{req.name} is not registered (verify.required_nodes){logged}"
    if not plugin_nodes:
        return (f"{req.name} is not registered: ComfyUI-nunchaku is not loaded (no node of module "
                f"{plugin_module}: is it in custom_nodes/, and does plugin.name match its folder?){logged}")
    only = f"it registered only {', '.join(plugin_nodes)}"
    if backend == "missing":
        return (f"{req.name} is not registered: ComfyUI-nunchaku loaded without its nunchaku backend ({only}); "
                f"install the backend wheel into ComfyUI's venv and restart{logged}")
    if backend is not None and backend.startswith("PyPI"):
        return (f"{req.name} is not registered: ComfyUI's venv holds {backend}, not the backend ({only}); "
                f"replace it with the backend wheel and restart{logged}")
    if backend is None:
        return f"{req.name} is not registered: ComfyUI-nunchaku could not load its backend ({only}){logged}"
    return (f"{req.name} is not registered though the nunchaku backend {backend} is installed: it fails to "
            f"import ({only}); " + (f"ComfyUI logged: {cause}" if cause else
                                     "ComfyUI's log does not say why: read its start-up log"))


def nodes(object_info: Mapping[str, Any], graph: Mapping[str, Any], required: Sequence[NodeRequirement],
          plugin_module: str, backend: str | None, cause: Callable[[str], str | None]) -> Check:
    """Every required class registered with the inputs the workflow sets, and every class the
    workflow uses registered. A missing one is explained: the plugin not loaded, its backend
    missing or failing to import, in ComfyUI's own logged words (`cause(node)`) where it has them."""
    problems: list[str] = []
    plugin_nodes = sorted(k for k, v in object_info.items() if v.get("python_module") == plugin_module)
    for req in required:
        entry = object_info.get(req.name)
        if not entry:
            problems.append(_missing(req, plugin_nodes, plugin_module, backend, cause(req.name)))
            continue
        declared = {k for part in (entry.get("input") or {}).values() if isinstance(part, dict) for k in part}
        absent = [i for i in req.inputs if i not in declared]
        if absent:
            problems.append(f"{req.name} has no input {', '.join(absent)} (a ComfyUI-nunchaku older than v1.0?)")
    names = {r.name for r in required}
    unknown = sorted({str(n.get("class_type")) for n in graph.values()} - set(object_info) - names)
    if unknown:
        problems.append(f"the workflow uses unregistered node classes: {', '.join(unknown)}")
    if problems:
        return Check("nodes_registered", False, problems[0], lines=tuple(problems[1:]))
    inputs = sorted({i for r in required for i in r.inputs})
    used = len({n.get("class_type") for n in graph.values()})
    return Check("nodes_registered", True,
                 f"{', '.join(r.name for r in required)} registered"
                 + (f" with {', '.join(inputs)}" if inputs else "")
                 + f"; the workflow's {used} classes too; {len(object_info)} node classes in all")


def image_agreement(agreements: Sequence[Agreement], note: str | None = None) -> Check:
    """Each kept image against its GPU class's reference; `note` says why none was compared."""
    if note is not None:
        return Check("image_agreement", True, note)
    compared = [a for a in agreements if a.reference is not None]
    failed = [a for a in compared if not a.passed]
    lines = tuple(f"{a.prompt!r} seed {a.seed}: {a.detail}" for a in agreements)
    if failed:
        first = failed[0]
        source = first.reference.host if first.reference else "?"
        return Check("image_agreement", False, f"{len(failed)}/{len(compared)} images disagree with the GPU "
                     f"class's reference (from {source}): {first.detail}", first.psnr_db, lines)
    if not compared:
        return Check("image_agreement", True, "not compared: no reference yet for this GPU class (a host "
                     "that passes every other check makes it)", None, lines)
    worst = min(compared, key=lambda a: a.psnr_db if a.psnr_db is not None else math.inf)
    count = f"{len(compared)} image{'s agree' if len(compared) != 1 else ' agrees'}"
    return Check("image_agreement", True, f"{count} with the GPU class's reference; lowest PSNR "
                 f"{worst.psnr_db:.1f} dB, SSIM {min(a.ssim or 0.0 for a in compared):.3f}", worst.psnr_db, lines)


def poisoned(exception_type: str, message: str) -> bool:
    """Whether a generation's error leaves ComfyUI's CUDA context unusable."""
    text = f"{exception_type} {message}"
    return "CUDA error" in text and any(sticky in text for sticky in STICKY_CUDA_ERRORS)


def over(name: str, what: str, value: float | None, limit: float | None, unit: str,
         note: str = "") -> Check:
    """A measured figure against an optional profile threshold (none: passes, figure shown)."""
    note = f" {note}" if note else ""
    if value is None:
        return Check(name, limit is None, f"{what}: not measured{note}")
    if limit is None:
        return Check(name, True, f"{what} {value:.2f} {unit}{note} (no threshold)", value)
    ok = value <= limit
    return Check(name, ok, f"{what} {value:.2f} {unit}{note} {'<=' if ok else '>'} {limit:g} {unit}", value)


def judge(runs: Sequence[RunResult], figures: Figures, thresholds: Thresholds, vram_source: str,
          cold_note: str = "") -> list[Check]:
    """The image, timing and VRAM checks over finished runs and their figures."""
    bad = [r for r in runs if r.image is None or not r.image.ok]
    if bad:
        first = bad[0]
        why = first.image.summary if first.image else "no image in the outputs"
        images = Check("images_ok", False, f"{len(bad)}/{len(runs)} images bad; "
                       f"{first.kind} run of {first.prompt!r}: {why}")
    else:
        sizes = sorted({f"{r.image.width}x{r.image.height}" for r in runs if r.image})
        images = Check("images_ok", True, f"{len(runs)} images, {', '.join(sizes)}, none black, "
                       "flat or with NaN blocks")
    warm = sum(r.kind == "warm" for r in runs)
    return [
        images,
        over("cold_time", "cold run", figures.cold_s, thresholds.cold_seconds, "s", cold_note),
        over("warm_time", "warm median", figures.warm_median_s, thresholds.warm_seconds, "s",
             f"({warm} runs)" if warm else ""),
        over("vram_peak", "VRAM peak", figures.vram_peak_gib, thresholds.vram_gib, "GiB", f"({vram_source})"),
    ]
