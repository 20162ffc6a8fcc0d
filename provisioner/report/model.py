"""The fleet report's shapes, built from plain JSON-able host entries (`build_report`).

A host's checks, runs and figures are verify's own types (`verify.checks`), read back from the
verification's JSON: the report computes no figure of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Literal

from provisioner.config.model import ClassSpeedSpec
from provisioner.errors import ProvisionError
from provisioner.report.fleet import FleetFlag, Group, judge
from provisioner.verify.kept import Agreement
from provisioner.verify.checks import Check, Figures, HostVerification, Ladder, RunResult, ladder
from provisioner.verify.fingerprint import Fingerprint

# 4: each host's rollout (snapshots before and after, rolled back and why), hosts `left` by a rollout
# 3: fingerprints, groups and fleet flags, image agreement, changes since the previous report
# 2: GiB keys (vram_peak_gib, max_vram_gib), runs carry seed and prompt_id
REPORT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)   # previous reports compared with (1: its vram_*_gb figures were GiB too)
Status = Literal["passed", "failed", "rolled_back", "unreachable", "left"]
STATUSES: tuple[str, ...] = ("failed", "rolled_back", "unreachable", "left", "passed")   # also the display order
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
    rollout: Mapping[str, Any] | None = None          # `HostRollout.to_json()`: what an apply did to it

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ProvisionError(f"report: host {self.host!r} has status {self.status!r}; "
                                 "use passed, failed, unreachable or left")


@dataclass(frozen=True)
class FactsSummary:
    gpu: str | None                                   # ComfyUI's GPU (comfyui.gpu, else the first)
    gpu_uuid: str | None
    vram_total_mib: int | None
    compute_capability: str | None                    # "8.6"
    driver: str | None
    torch: str | None
    cuda: str | None                                  # the CUDA torch was built for
    python: str | None
    python_tag: str | None
    os: str | None


@dataclass(frozen=True)
class Flag:
    """One difference from the previous report: a regression, an improvement, or a fingerprint
    field that changed (kind `changed`, neither better nor worse)."""

    host: str
    kind: str                   # slower, more_vram, new_failure, unreachable, failed | faster, ... | changed
    regression: bool
    message: str
    previous: float | str | None = None
    current: float | str | None = None
    field: str | None = None    # the fingerprint field, for `changed`

    @property
    def line(self) -> str:
        """What the CLI prints: `host: REGRESSION message`."""
        word = "changed" if self.kind == CHANGED else "REGRESSION" if self.regression else "improved"
        return f"{self.host}: {word} {self.message}"


CHANGED = "changed"


@dataclass(frozen=True)
class HostReport:
    host: str
    status: Status
    error: str | None
    failures: tuple[str, ...]
    facts: FactsSummary | None
    versions: Mapping[str, str | None]
    checks: tuple[Check, ...]
    runs: tuple[RunResult, ...]
    figures: Figures
    thumbnails: tuple[tuple[str, bytes], ...] = ()
    fingerprint: Fingerprint | None = None
    agreement: tuple[Agreement, ...] = ()
    rollout: Mapping[str, Any] | None = None          # an apply's: result, snapshots, the checks that failed it

    @property
    def ladder(self) -> Ladder:
        """verify's ladder; a host never reached fails its first rung."""
        return ladder(self.checks, unreachable=self.status == "unreachable")


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
    flagged: int = 0                # hosts with a fleet flag (drift, class speed)
    left: int = 0                   # hosts a stopped rollout did not reach
    rolled_back: int = 0            # hosts a verify gate rolled back


@dataclass(frozen=True)
class FleetReport:
    generated_at: str                                 # ISO 8601 UTC, "2026-11-24T10:00:00Z"
    profile: str | None
    hosts: tuple[HostReport, ...]                     # failures first, then by name
    flags: tuple[Flag, ...] = ()                      # set by compare.with_comparison
    baseline: str | None = None                       # generated_at of the report compared with
    comparison_note: str | None = None                # why no comparison was made, when none was
    groups: tuple[Group, ...] = ()                    # set by fleet.judge (build_report)
    fleet: tuple[FleetFlag, ...] = ()                 # idem, plus compare's class fallbacks
    class_speed: ClassSpeedSpec = ClassSpeedSpec()

    @property
    def regressions(self) -> tuple[Flag, ...]:
        return tuple(f for f in self.flags if f.regression)

    @property
    def improvements(self) -> tuple[Flag, ...]:
        return tuple(f for f in self.flags if not f.regression and f.kind != CHANGED)

    @property
    def changes(self) -> tuple[Flag, ...]:
        return tuple(f for f in self.flags if f.kind == CHANGED)

    def flags_for(self, host: str) -> tuple[Flag, ...]:
        return tuple(f for f in self.flags if f.host == host)

    def fleet_for(self, host: str) -> tuple[FleetFlag, ...]:
        return tuple(f for f in self.fleet if f.host == host)

    def node_sets(self) -> dict[str, dict[str, str]]:
        """Each distinct node set (/object_info) of the fleet: its hash -> class -> interface hash."""
        return {str(h.fingerprint.fields["object_info"]): dict(h.fingerprint.node_classes) for h in self.hosts
                if h.fingerprint is not None and h.fingerprint.fields.get("object_info")}

    @property
    def summary(self) -> Summary:
        def pick(values: list[tuple[float, str]], best: Any) -> Extreme | None:
            if not values:
                return None
            value, host = best(values, key=lambda v: (v[0], v[1]))
            return Extreme(host, value)

        warm = [(h.figures.warm_median_s, h.host) for h in self.hosts if h.figures.warm_median_s is not None]
        vram = [(h.figures.vram_peak_gib, h.host) for h in self.hosts if h.figures.vram_peak_gib is not None]
        count = {s: sum(h.status == s for h in self.hosts) for s in STATUSES}
        return Summary(len(self.hosts), count["passed"], count["failed"], count["unreachable"],
                       pick(warm, min), pick(warm, max), pick(vram, max),
                       len({f.host for f in self.fleet}), count["left"],
                       sum(bool(h.rollout and h.rollout.get("result") == "rolled_back") for h in self.hosts))


def _facts_summary(facts: Mapping[str, Any] | None) -> FactsSummary | None:
    if not facts:
        return None
    gpu = facts.get("gpu") or {}                     # facts_to_json's pick: the GPU ComfyUI uses
    env = facts.get("env") or {}
    cap = gpu.get("compute_capability")
    return FactsSummary(
        gpu=gpu.get("name") or (f"none: {facts.get('gpu_error')}" if facts.get("gpu_error") else None),
        gpu_uuid=gpu.get("uuid") or None,
        vram_total_mib=gpu.get("vram_total_mib"),
        compute_capability=f"{cap[0]}.{cap[1]}" if cap else None,
        driver=gpu.get("driver"), torch=env.get("torch"), cuda=env.get("torch_cuda"),
        python=env.get("version"), python_tag=env.get("tag"), os=facts.get("os"),
    )


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def host_report(entry: HostEntry) -> HostReport:
    verification = HostVerification.from_json(entry.verification or {})
    checks = tuple(replace(c, detail=_one_line(c.detail), lines=tuple(map(_one_line, c.lines)))
                   for c in verification.checks)
    runs = verification.runs
    failures = ([_one_line(entry.error)] if entry.error else []) + \
        [f"{c.name}: {c.detail}" for c in checks if not c.passed]
    status = entry.status
    if status == "passed" and failures:
        status = "failed"          # never show a host as passed beside a failed check
    if status != "passed" and not failures:
        failures = [f"{status} (no reason was given)"]
    versions = {k: entry.versions.get(k) for k in VERSION_KEYS}
    versions.update({k: v for k, v in entry.versions.items() if k not in versions})
    if entry.rollout and entry.rollout.get("result") == "rolled_back":
        # A status of its own, as the console says it; the reason once (it names the checks that failed it).
        reason = _one_line(entry.rollout.get("reason") or "rolled back")
        failures = [reason, *(f for f in failures if f != reason and f != f"{status} (no reason was given)")]
        status = "rolled_back"
    return HostReport(entry.host, status, entry.error, tuple(failures), _facts_summary(entry.facts),
                      versions, checks, runs, verification.figures, tuple(entry.thumbnails),
                      verification.fingerprint, verification.agreement, entry.rollout)


def order_key(host: HostReport) -> tuple[int, str]:
    return STATUSES.index(host.status), host.host


def build_report(hosts: Sequence[HostEntry], *, profile: str | None = None,
                 generated_at: datetime | None = None, class_speed: ClassSpeedSpec = ClassSpeedSpec()) -> FleetReport:
    """The fleet report of `hosts`, failures first, its groups judged (`fleet.judge`); no comparison
    yet (`write_report` adds it)."""

    names = [h.host for h in hosts]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ProvisionError(f"report: host {twice[0]!r} is listed twice; give each host one entry")
    when = (generated_at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    reports = tuple(sorted((host_report(h) for h in hosts), key=order_key))
    groups, flags = judge([(h.host, h.fingerprint, h.figures) for h in reports if h.status not in ("unreachable", "left")],
                          profile, class_speed)
    return FleetReport(when.strftime("%Y-%m-%dT%H:%M:%SZ"), profile, reports, groups=groups, fleet=flags,
                       class_speed=class_speed)
