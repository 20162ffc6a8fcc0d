"""report.json: the fleet report as documented JSON (docs/report-schema.md, report.schema.json)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from provisioner.report.fleet import FleetFlag, Group
from provisioner.report.model import REPORT_VERSION, Extreme, Flag, FleetReport, HostReport

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")


def _extreme(value: Extreme | None) -> dict[str, Any] | None:
    return None if value is None else {"host": value.host, "value": value.value}


def _flag(flag: Flag) -> dict[str, Any]:
    return {"host": flag.host, "kind": flag.kind, "field": flag.field, "message": flag.message,
            "previous": flag.previous, "current": flag.current}


def _fleet_flag(flag: FleetFlag) -> dict[str, Any]:
    return {"host": flag.host, "kind": flag.kind, "group": flag.group, "field": flag.field,
            "message": flag.message, "expected": flag.expected, "actual": flag.actual}


def _group(group: Group) -> dict[str, Any]:
    return {"profile": group.profile, "gpu_class": group.gpu_class, "hosts": list(group.hosts),
            "values": dict(group.values), "warm_median_s": group.warm_median_s,
            "vram_peak_gib": group.vram_peak_gib}


def host_to_json(host: HostReport) -> dict[str, Any]:
    return {
        "host": host.host,
        "status": host.status,
        "error": host.error,
        "failures": list(host.failures),
        "facts": None if host.facts is None else asdict(host.facts),
        "versions": dict(host.versions),
        "checks": [c.to_json() for c in host.checks],
        "ladder": host.ladder.to_json(),
        "runs": [r.to_json(thumbnail=False) for r in host.runs],
        "figures": host.figures.to_json(),
        "fingerprint": None if host.fingerprint is None else host.fingerprint.to_json(classes=False),
        "agreement": [a.to_json(panels=False) for a in host.agreement],
        "rollout": None if host.rollout is None else dict(host.rollout),
    }


def report_to_json(report: FleetReport) -> dict[str, Any]:
    """The report.json document (thumbnails are left to report.html to keep this file small)."""
    summary = report.summary
    return {
        "version": REPORT_VERSION,
        "generated_at": report.generated_at,
        "profile": report.profile,
        "summary": {
            "hosts": summary.hosts, "passed": summary.passed, "failed": summary.failed,
            "unreachable": summary.unreachable,
            "fastest_warm_s": _extreme(summary.fastest_warm),
            "slowest_warm_s": _extreme(summary.slowest_warm),
            "max_vram_gib": _extreme(summary.max_vram),
            "regressions": len(report.regressions), "improvements": len(report.improvements),
            "changes": len(report.changes), "flagged": summary.flagged,
            "left": summary.left, "rolled_back": summary.rolled_back,
        },
        "comparison": {"baseline": report.baseline, "note": report.comparison_note},
        "regressions": [_flag(f) for f in report.regressions],
        "improvements": [_flag(f) for f in report.improvements],
        "changes": [_flag(f) for f in report.changes],
        "groups": [_group(g) for g in report.groups],
        "fleet": [_fleet_flag(f) for f in report.fleet],
        "node_sets": report.node_sets(),
        "hosts": [host_to_json(h) for h in report.hosts],
    }


def dumps(report: FleetReport) -> str:
    # allow_nan=False: a NaN figure must fail here, not produce a file strict parsers reject.
    return json.dumps(report_to_json(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
