"""Regressions and improvements against the previous report.json of the same directory."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from provisioner.config import bounded
from provisioner.report.fleet import FleetFlag, class_flags, node_difference
from provisioner.report.model import CHANGED, READABLE_VERSIONS, REPORT_VERSION, Flag, FleetReport, HostReport
from provisioner.verify.fingerprint import Fingerprint

# A warm median is "slower" only past both bars: 20 % catches a real loss (offload turned on,
# a slower kernel) while +0.5 s keeps a 1.0 s -> 1.3 s jitter on a fast GPU from crying wolf.
SLOWER_FACTOR = 1.2
SLOWER_MIN_S = 0.5
VRAM_FACTOR = 1.05          # +5 % VRAM peak: a second model copy, offload off, a leak


# What the comparison reads of a previous report.json, of any version it reads (1 to 4): a report
# that passes this cannot make the comparison fail halfway; fields it does not read are not looked at.
_NUMBER = {"type": ["number", "null"]}
_TEXT = {"type": ["string", "null"]}
PREVIOUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["version", "hosts"],
    "properties": {
        "version": {"type": "integer"},
        "generated_at": _TEXT,
        "hosts": {"type": "array", "maxItems": 100_000, "items": {
            "type": "object", "required": ["host"],
            "properties": {
                "host": {"type": "string", "maxLength": 1000},
                "status": _TEXT,
                "figures": {"type": ["object", "null"], "additionalProperties": _NUMBER},
                "checks": {"type": ["array", "null"], "items": {
                    "type": "object", "properties": {"name": _TEXT, "passed": {"type": ["boolean", "null"]}}}},
                "fingerprint": {"type": ["object", "null"], "properties": {
                    "gpu_class": _TEXT, "object_info": _TEXT,
                    "models": {"type": ["object", "null"], "additionalProperties": _TEXT}},
                    "additionalProperties": {"type": ["string", "number", "boolean", "null", "object"]}},
            }}},
        "node_sets": {"type": ["object", "null"], "additionalProperties": {
            "type": "object", "additionalProperties": _TEXT}},
    },
}


def read_previous(data: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The previous report, or None and why it cannot be compared with (never raises). Read as
    untrusted: nested 64 deep at most, finite numbers only, and the shape the comparison reads."""
    import jsonschema

    try:
        previous = bounded.loads(data)
    except ValueError as err:
        return None, f"previous report.json is unreadable ({err}): not compared"
    if not isinstance(previous, dict) or not isinstance(previous.get("hosts"), list):
        return None, "previous report.json has no hosts list: not compared"
    if previous.get("version") not in READABLE_VERSIONS:
        return None, (f"previous report.json is version {previous.get('version')!r}, this is "
                      f"{REPORT_VERSION}: not compared")
    problem = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(PREVIOUS_SCHEMA).iter_errors(previous))
    if problem is not None:
        where = "/".join(str(p) for p in problem.absolute_path) or "the top level"
        return None, f"previous report.json at {where}: {problem.message[:200]}: not compared"
    return previous, None


def read_previous_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, str | None]:
    """A report.json on disk through `read_previous`, read within bounds (a regular file, 64 MiB at
    most: a FIFO or a device is refused, never waited on or read forever). ValueError when it
    cannot be read at all."""
    return read_previous(bounded.read_regular(path, bounded.REPORT_CAP))


def _number(mapping: Any, key: str) -> float | None:
    value = mapping.get(key) if isinstance(mapping, Mapping) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _timing(host: HostReport, before: Mapping[str, Any]) -> list[Flag]:
    was, now = _number(before.get("figures"), "warm_median_s"), host.figures.warm_median_s
    if was is None or now is None or was <= 0:
        return []
    change = f"warm median {now:.2f} s, was {was:.2f} s ({now / was - 1:+.0%})"
    if now > was * SLOWER_FACTOR and now - was > SLOWER_MIN_S:
        return [Flag(host.host, "slower", True, change, was, now)]
    if now * SLOWER_FACTOR < was and was - now > SLOWER_MIN_S:
        return [Flag(host.host, "faster", False, change, was, now)]
    return []


def _vram(host: HostReport, before: Mapping[str, Any]) -> list[Flag]:
    figures = before.get("figures")
    # Version 1 called it vram_peak_gb; it held GiB all the same.
    was = _number(figures, "vram_peak_gib") if _number(figures, "vram_peak_gib") is not None \
        else _number(figures, "vram_peak_gb")
    now = host.figures.vram_peak_gib
    if was is None or now is None or was <= 0:
        return []
    change = f"VRAM peak {now:.2f} GiB, was {was:.2f} GiB ({now / was - 1:+.0%})"
    if now > was * VRAM_FACTOR:
        return [Flag(host.host, "more_vram", True, change, was, now)]
    if now * VRAM_FACTOR < was:
        return [Flag(host.host, "less_vram", False, change, was, now)]
    return []


def _checks(host: HostReport, before: Mapping[str, Any]) -> list[Flag]:
    passed_before = {c.get("name"): c.get("passed") for c in before.get("checks") or ()
                     if isinstance(c, Mapping)}
    flags = []
    for check in host.checks:
        was = passed_before.get(check.name)
        if was is True and not check.passed:
            flags.append(Flag(host.host, "new_failure", True, f"{check.name} now fails: {check.detail}",
                              "passed", "failed"))
        elif was is False and check.passed:
            flags.append(Flag(host.host, "fixed", False, f"{check.name} passes again", "failed", "passed"))
    return flags


def fingerprint_of(before: Mapping[str, Any], node_sets: Mapping[str, Any]) -> Fingerprint | None:
    """A host's fingerprint in a report.json (version 3 on), its node classes from `node_sets`."""
    raw = before.get("fingerprint")
    if not isinstance(raw, Mapping):
        return None
    classes = node_sets.get(str(raw.get("object_info")))
    return Fingerprint.from_json(raw, classes if isinstance(classes, Mapping) else {})


def _changes(host: HostReport, was: Fingerprint | None) -> list[Flag]:
    """Every fingerprint field whose value changed since the previous report (unknown on either
    side: not compared)."""
    if host.fingerprint is None or was is None:
        return []
    flags = []
    now, then = host.fingerprint.flat(), was.flat()
    for field in dict.fromkeys([*now, *then]):
        old, new = then.get(field), now.get(field)
        if old is None or new is None or old == new:
            continue
        if field == "object_info":
            what = f"node set changed: {node_difference(host.fingerprint.node_classes, was.node_classes)}"
        else:
            what = f"{field}: {old} -> {new}"
        flags.append(Flag(host.host, CHANGED, False, what, old, new, field))
    return flags


def _host(host: HostReport, before: Mapping[str, Any]) -> list[Flag]:
    was = before.get("status")
    if host.status == "unreachable":
        if was == "unreachable":
            return []
        return [Flag(host.host, "unreachable", True, f"now unreachable (was {was}): {host.failures[0]}",
                     was, "unreachable")]
    flags = []
    if was == "unreachable":
        flags.append(Flag(host.host, "reachable", False, f"reachable again ({host.status})",
                          "unreachable", host.status))
    checks = _checks(host, before)
    if was == "passed" and host.status == "failed" and not any(f.regression for f in checks):
        flags.append(Flag(host.host, "failed", True, f"now fails: {host.failures[0]}", "passed", "failed"))
    if was == "failed" and host.status == "passed" and not checks:
        flags.append(Flag(host.host, "passing", False, "passes again", "failed", "passed"))
    return flags + checks + _timing(host, before) + _vram(host, before)


def _hosts(previous: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {h["host"]: h for h in previous.get("hosts") or () if isinstance(h, Mapping) and "host" in h}


def _node_sets(previous: Mapping[str, Any]) -> Mapping[str, Any]:
    sets = previous.get("node_sets")
    return sets if isinstance(sets, Mapping) else {}


def compare(previous: Mapping[str, Any], current: FleetReport) -> tuple[Flag, ...]:
    """Every flag of `current` against the `previous` report.json; hosts new or gone are not flagged."""
    before, sets = _hosts(previous), _node_sets(previous)
    flags: list[Flag] = []
    for host in current.hosts:
        if host.host in before:
            flags.extend(_host(host, before[host.host]))
            flags.extend(_changes(host, fingerprint_of(before[host.host], sets)))
    return tuple(flags)


def class_fallback(previous: Mapping[str, Any], current: FleetReport) -> tuple[FleetFlag, ...]:
    """A host alone in its GPU class in this run is held against its class in the previous report:
    the other hosts of that class there."""
    before, sets = _hosts(previous), _node_sets(previous)
    classes = {name: fp.gpu_class for name, raw in before.items() if (fp := fingerprint_of(raw, sets))}
    flags: list[FleetFlag] = []
    by_name = {h.host: h for h in current.hosts}
    for group in current.groups:
        for name in group.hosts:
            others = [by_name[h].figures for h in group.hosts if h != name and h in by_name]
            if any(f.warm_median_s is not None for f in others):
                continue                              # judged against its class in this run
            then = [before[h].get("figures") or {} for h, c in classes.items() if c == group.gpu_class and h != name]
            flags += class_flags(name, group.gpu_class, by_name[name].figures,
                                 [_number(f, "warm_median_s") for f in then],
                                 [_number(f, "vram_peak_gib") for f in then], current.class_speed,
                                 f"its class in the previous report ({previous.get('generated_at')})")
    return tuple(flags)


def with_comparison(report: FleetReport, previous: Mapping[str, Any] | None,
                    note: str | None = None) -> FleetReport:
    """`report` carrying its flags against `previous` (None: no previous, `note` says why)."""
    if previous is None:
        return replace(report, flags=(), baseline=None, comparison_note=note or "no previous report")
    return replace(report, flags=compare(previous, report), baseline=previous.get("generated_at"),
                   comparison_note=None, fleet=report.fleet + class_fallback(previous, report))
