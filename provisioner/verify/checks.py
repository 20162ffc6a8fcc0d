"""Verification results (Check, RunResult, HostVerification) and the pure checks that judge them."""

from __future__ import annotations

import base64
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from provisioner.config.model import Thresholds
from provisioner.verify.images import ImageCheck

DIT_LOADER = "NunchakuQwenImageDiTLoader"
REQUIRED_NODES = (DIT_LOADER,)
REQUIRED_INPUTS = {DIT_LOADER: ("cpu_offload",)}   # ComfyUI-nunchaku >= v1.0 needs it set
PLUGIN_MODULE = "custom_nodes.ComfyUI-nunchaku"


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    value: float | None = None
    lines: tuple[str, ...] = ()     # further detail, one line each (per-node errors)

    @property
    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.detail}"


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


@dataclass(frozen=True)
class HostVerification:
    host: str
    checks: tuple[Check, ...]
    runs: tuple[RunResult, ...] = ()
    comfyui_version: str | None = None
    device: str | None = None

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping (thumbnails base64) for the fleet report."""
        return {
            "host": self.host, "passed": self.passed,
            "comfyui_version": self.comfyui_version, "device": self.device,
            "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail, "value": c.value,
                        "lines": list(c.lines)} for c in self.checks],
            "runs": [{
                "prompt": r.prompt, "kind": r.kind, "seed": r.seed, "prompt_id": r.prompt_id,
                "seconds_comfy": r.seconds_comfy, "seconds_wall": round(r.seconds_wall, 3),
                "vram_peak_mib": r.vram_peak_mib,
                "image": None if r.image is None else {
                    "ok": r.image.ok, "width": r.image.width, "height": r.image.height,
                    "mean": r.image.mean, "std": r.image.std, "black_fraction": r.image.black_fraction,
                    "saturated_fraction": r.image.saturated_fraction, "reasons": list(r.image.reasons)},
                "thumbnail_png_base64": base64.b64encode(r.thumbnail).decode() if r.thumbnail else None,
            } for r in self.runs],
        }


def device_of(stats: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """The first device's name and total VRAM in GiB, from /system_stats."""
    devices = stats.get("devices") or [{}]
    total = devices[0].get("vram_total")
    return devices[0].get("name"), (total / 2**30 if isinstance(total, (int, float)) else None)


def vram_used_mib(stats: Mapping[str, Any]) -> int | None:
    devices = stats.get("devices") or [{}]
    total, free = devices[0].get("vram_total"), devices[0].get("vram_free")
    if devices[0].get("type") != "cuda" or not isinstance(total, int) or not isinstance(free, int):
        return None                  # a CPU device reports RAM, not VRAM
    return (total - free) // 2**20


def reachable(stats: Mapping[str, Any], where: str) -> Check:
    system = stats.get("system") or {}
    name, gib = device_of(stats)
    size = f" ({gib:.1f} GiB)" if gib else ""
    return Check("comfyui_reachable", True,
                 f"ComfyUI {system.get('comfyui_version', '?')} at {where}, {name or 'no device'}{size}")


def nodes(object_info: Mapping[str, Any], graph: Mapping[str, Any]) -> Check:
    """Required classes registered with the inputs we set; the graph's other classes present."""
    problems: list[str] = []
    plugin_nodes = sorted(k for k, v in object_info.items() if v.get("python_module") == PLUGIN_MODULE)
    for node in REQUIRED_NODES:
        entry = object_info.get(node)
        if not entry:
            if plugin_nodes:
                problems.append(f"{node} is not registered: ComfyUI-nunchaku loaded without its "
                                f"nunchaku backend (it registered only {', '.join(plugin_nodes)}); "
                                "install the backend wheel into ComfyUI's venv and restart")
            else:
                problems.append(f"{node} is not registered: ComfyUI-nunchaku is not loaded "
                                "(no Nunchaku node at all; is it in custom_nodes/?)")
            continue
        declared = {k for part in (entry.get("input") or {}).values() if isinstance(part, dict) for k in part}
        missing = [i for i in REQUIRED_INPUTS.get(node, ()) if i not in declared]
        if missing:
            problems.append(f"{node} has no input {', '.join(missing)} (a ComfyUI-nunchaku older "
                            "than v1.0?)")
    unknown = sorted({n.get("class_type") for n in graph.values()} - set(object_info) - set(REQUIRED_NODES))
    if unknown:
        problems.append(f"the workflow uses unregistered node classes: {', '.join(map(str, unknown))}")
    if problems:
        return Check("nodes_registered", False, problems[0], lines=tuple(problems[1:]))
    return Check("nodes_registered", True,
                 f"{', '.join(REQUIRED_NODES)} registered with cpu_offload; "
                 f"{len(object_info)} node classes in all")


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


def judge(runs: Sequence[RunResult], thresholds: Thresholds, vram_peak_mib: int | None,
          vram_source: str) -> list[Check]:
    """The image, timing and VRAM checks over finished runs."""
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
    cold = [r.seconds for r in runs if r.kind == "cold"]
    warm = [r.seconds for r in runs if r.kind == "warm"]
    return [
        images,
        over("cold_time", "cold run", cold[0] if cold else None, thresholds.cold_seconds, "s"),
        over("warm_time", "warm median", statistics.median(warm) if warm else None,
             thresholds.warm_seconds, "s", f"({len(warm)} runs)" if warm else ""),
        over("vram_peak", "VRAM peak", None if vram_peak_mib is None else vram_peak_mib / 1024,
             thresholds.vram_gib, "GiB", f"({vram_source})"),
    ]
