"""The fleet report's shapes, built from plain JSON-able host entries (`build_report`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from provisioner.errors import ProvisionError

REPORT_VERSION = 1
Status = Literal["passed", "failed", "unreachable"]
STATUSES: tuple[str, ...] = ("failed", "unreachable", "passed")   # also the display order
VERSION_KEYS = ("plugin", "backend", "diffusers", "peft", "model_variant", "precision", "comfyui")


@dataclass(frozen=True)
class HostEntry:
    """What the caller knows about one host; every field is plain data (see `adapt.py` for helpers)."""

    host: str
    status: Status
    error: str | None = None                          # why it failed or could not be reached
    facts: Mapping[str, Any] | None = None            # `facts_to_json(facts)`
    versions: Mapping[str, str | None] = field(default_factory=dict)   # VERSION_KEYS
    verification: Mapping[str, Any] | None = None     # `HostVerification.to_json()`
    thumbnails: Sequence[tuple[str, bytes]] = ()      # (label, PNG bytes)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ProvisionError(f"report: host {self.host!r} has status {self.status!r}; "
                                 "use passed, failed or unreachable")


@dataclass(frozen=True)
class FactsSummary:
    gpu: str | None
    vram_total_mib: int | None
    compute_capability: str | None                    # "8.6"
    driver: str | None
    torch: str | None
    cuda: str | None                                  # the CUDA torch was built for
    python: str | None
    python_tag: str | None
    os: str | None


@dataclass(frozen=True)
class CheckRow:
    name: str
    passed: bool
    detail: str
    value: float | None = None
    lines: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageRow:
    width: int
    height: int
    mean: float | None
    std: float | None
    passed: bool
    reason: str | None


@dataclass(frozen=True)
class RunRow:
    prompt: str
    kind: Literal["cold", "warm"]
    seconds_comfy: float | None
    seconds_wall: float
    vram_peak_mib: int | None
    image: ImageRow | None

    @property
    def seconds(self) -> float:
        """The figure thresholds use (verify's rule): ComfyUI's own timing when it gave one."""
        return self.seconds_comfy if self.seconds_comfy is not None else self.seconds_wall


@dataclass(frozen=True)
class Figures:
    cold_s: float | None = None
    warm_median_s: float | None = None
    warm_max_s: float | None = None
    vram_peak_gb: float | None = None                 # GiB (2**30 bytes), like nvidia-smi's MiB / 1024


@dataclass(frozen=True)
class Flag:
    """One difference from the previous report: a regression, or an improvement."""

    host: str
    kind: str                   # slower, more_vram, new_failure, unreachable, failed | faster, ...
    regression: bool
    message: str
    previous: float | str | None = None
    current: float | str | None = None

    @property
    def line(self) -> str:
        """What the CLI prints: `host: REGRESSION message`."""
        return f"{self.host}: {'REGRESSION' if self.regression else 'improved'} {self.message}"


@dataclass(frozen=True)
class HostReport:
    host: str
    status: Status
    error: str | None
    failures: tuple[str, ...]
    facts: FactsSummary | None
    versions: Mapping[str, str | None]
    checks: tuple[CheckRow, ...]
    runs: tuple[RunRow, ...]
    figures: Figures
    thumbnails: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Extreme:
    host: str
    value: float


@dataclass(frozen=True)
class Summary:
    hosts: int
    passed: int
    failed: int
    unreachable: int
    fastest_warm: Extreme | None
    slowest_warm: Extreme | None
    max_vram: Extreme | None


@dataclass(frozen=True)
class FleetReport:
    generated_at: str                                 # ISO 8601 UTC, "2026-11-24T10:00:00Z"
    profile: str | None
    hosts: tuple[HostReport, ...]                     # failures first, then by name
    flags: tuple[Flag, ...] = ()                      # set by compare.with_comparison
    baseline: str | None = None                       # generated_at of the report compared with
    comparison_note: str | None = None                # why no comparison was made, when none was

    @property
    def regressions(self) -> tuple[Flag, ...]:
        return tuple(f for f in self.flags if f.regression)

    @property
    def improvements(self) -> tuple[Flag, ...]:
        return tuple(f for f in self.flags if not f.regression)

    def flags_for(self, host: str) -> tuple[Flag, ...]:
        return tuple(f for f in self.flags if f.host == host)

    @property
    def summary(self) -> Summary:
        def pick(values: list[tuple[float, str]], best: Any) -> Extreme | None:
            if not values:
                return None
            value, host = best(values, key=lambda v: (v[0], v[1]))
            return Extreme(host, value)

        warm = [(h.figures.warm_median_s, h.host) for h in self.hosts if h.figures.warm_median_s is not None]
        vram = [(h.figures.vram_peak_gb, h.host) for h in self.hosts if h.figures.vram_peak_gb is not None]
        count = {s: sum(h.status == s for h in self.hosts) for s in STATUSES}
        return Summary(len(self.hosts), count["passed"], count["failed"], count["unreachable"],
                       pick(warm, min), pick(warm, max), pick(vram, max))


def _facts_summary(facts: Mapping[str, Any] | None) -> FactsSummary | None:
    if not facts:
        return None
    gpu = (facts.get("gpus") or [None])[0] or {}
    env = facts.get("env") or {}
    cap = gpu.get("compute_capability")
    return FactsSummary(
        gpu=gpu.get("name") or (f"none: {facts.get('gpu_error')}" if facts.get("gpu_error") else None),
        vram_total_mib=gpu.get("vram_total_mib"),
        compute_capability=f"{cap[0]}.{cap[1]}" if cap else None,
        driver=gpu.get("driver"), torch=env.get("torch"), cuda=env.get("torch_cuda"),
        python=env.get("version"), python_tag=env.get("tag"), os=facts.get("os"),
    )


def _finite(value: Any) -> float | None:
    """A number for JSON: NaN/inf (a broken measurement) or a non-number become None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _image(raw: Mapping[str, Any] | None) -> ImageRow | None:
    if raw is None:
        return None
    reasons = list(raw.get("reasons") or ())
    return ImageRow(int(raw.get("width") or 0), int(raw.get("height") or 0), _finite(raw.get("mean")),
                    _finite(raw.get("std")), bool(raw.get("ok")), "; ".join(reasons) or None)


def _run(raw: Mapping[str, Any]) -> RunRow:
    peak = raw.get("vram_peak_mib")
    return RunRow(str(raw.get("prompt", "")), "cold" if raw.get("kind") == "cold" else "warm",
                  _finite(raw.get("seconds_comfy")), _finite(raw.get("seconds_wall")) or 0.0,
                  peak if isinstance(peak, int) and not isinstance(peak, bool) else None,
                  _image(raw.get("image")))


def _figures(runs: Sequence[RunRow], checks: Sequence[CheckRow]) -> Figures:
    cold = [r.seconds for r in runs if r.kind == "cold"]
    warm = [r.seconds for r in runs if r.kind == "warm"]
    # verify's vram_peak check also counts /system_stats readings between runs: take the larger.
    peaks = [r.vram_peak_mib / 1024 for r in runs if r.vram_peak_mib is not None]
    peaks += [c.value for c in checks if c.name == "vram_peak" and c.value is not None]
    return Figures(
        cold_s=round(cold[0], 3) if cold else None,
        warm_median_s=round(statistics.median(warm), 3) if warm else None,
        warm_max_s=round(max(warm), 3) if warm else None,
        vram_peak_gb=round(max(peaks), 2) if peaks else None,
    )


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def host_report(entry: HostEntry) -> HostReport:
    verification = entry.verification or {}
    checks = tuple(CheckRow(str(c["name"]), bool(c["passed"]), _one_line(c.get("detail", "")),
                            _finite(c.get("value")),
                            tuple(map(_one_line, c.get("lines") or ())))
                   for c in verification.get("checks") or ())
    runs = tuple(_run(r) for r in verification.get("runs") or ())
    failures = ([_one_line(entry.error)] if entry.error else []) + \
        [f"{c.name}: {c.detail}" for c in checks if not c.passed]
    status = entry.status
    if status == "passed" and failures:
        status = "failed"          # never show a host as passed beside a failed check
    if status != "passed" and not failures:
        failures = [f"{status} (no reason was given)"]
    versions = {k: entry.versions.get(k) for k in VERSION_KEYS}
    versions.update({k: v for k, v in entry.versions.items() if k not in versions})
    return HostReport(entry.host, status, entry.error, tuple(failures), _facts_summary(entry.facts),
                      versions, checks, runs, _figures(runs, checks), tuple(entry.thumbnails))


def order_key(host: HostReport) -> tuple[int, str]:
    return STATUSES.index(host.status), host.host


def build_report(hosts: Sequence[HostEntry], *, profile: str | None = None,
                 generated_at: datetime | None = None) -> FleetReport:
    """The fleet report of `hosts`, failures first; no comparison yet (`write_report` adds it)."""
    names = [h.host for h in hosts]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ProvisionError(f"report: host {twice[0]!r} is listed twice; give each host one entry")
    when = (generated_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    reports = sorted((host_report(h) for h in hosts), key=order_key)
    return FleetReport(when.strftime("%Y-%m-%dT%H:%M:%SZ"), profile, tuple(reports))
