"""Hosts that should be identical, judged together: groups of one profile and one GPU class, every
fingerprint field in which a host differs from its group's majority (`drift`), and each host's
warm time and VRAM against the other hosts of its class (`class_slower`, `class_more_vram`)."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from provisioner.config.model import ClassSpeedSpec
from provisioner.verify.checks import Figures
from provisioner.verify.fingerprint import FIELDS, Fingerprint

Member = tuple[str, Fingerprint | None, Figures]     # host, its fingerprint, its figures
SHOWN_CLASSES = 6                                     # node classes named in one message, at most


@dataclass(frozen=True)
class FleetFlag:
    """A host that differs from the other hosts of its group in this run: a fingerprint field
    (`drift`), or its speed or VRAM against its GPU class (`class_slower`, `class_more_vram`)."""

    host: str
    kind: str                   # drift | class_slower | class_more_vram
    group: str                  # the GPU class
    message: str
    field: str | None = None    # drift: the fingerprint field
    expected: float | str | None = None   # the group's value (its majority, or its class's median)
    actual: float | str | None = None     # the host's

    @property
    def line(self) -> str:
        return f"{self.host}: FLAG {self.message}"


@dataclass(frozen=True)
class Group:
    """Hosts that should be identical: one profile, one GPU class."""

    profile: str | None
    gpu_class: str
    hosts: tuple[str, ...]
    values: Mapping[str, str | None]          # each field's majority value (None: unknown or split)
    warm_median_s: float | None               # the median of the hosts' warm medians
    vram_peak_gib: float | None


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:SHOWN_CLASSES])
    return shown + (f" and {len(names) - SHOWN_CLASSES} more" if len(names) > SHOWN_CLASSES else "")


def node_difference(mine: Mapping[str, str], theirs: Mapping[str, str]) -> str:
    """Which node classes one set has beyond another, lacks, or declares otherwise."""
    added = sorted(set(mine) - set(theirs))
    removed = sorted(set(theirs) - set(mine))
    changed = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
    parts = ([f"+ {_names(added)}"] if added else []) + ([f"- {_names(removed)}"] if removed else []) + \
        ([f"inputs or outputs differ: {_names(changed)}"] if changed else [])
    return "; ".join(parts) or "same classes"


def _short(field: str, value: str | None) -> str:
    if value is None:
        return "unknown"
    return value[:12] if field in ("object_info", "workflow") or field.startswith("model ") else value


def _drift(group: str, members: Sequence[tuple[str, Fingerprint]]) -> tuple[dict[str, str | None], list[FleetFlag]]:
    values: dict[str, str | None] = {}
    flags: list[FleetFlag] = []
    flat = {host: fp.flat() for host, fp in members}
    fields = list(FIELDS) + sorted({k for f in flat.values() for k in f if k not in FIELDS})
    for name in fields:
        known = {host: f[name] for host, f in flat.items() if f.get(name) is not None}
        ranked = Counter(known.values()).most_common()
        if not ranked:
            values[name] = None
            continue
        split = len(ranked) > 1 and ranked[0][1] == ranked[1][1]
        values[name] = None if split else ranked[0][0]
        if len(ranked) == 1:
            continue
        for host, value in known.items():
            if not split and value == values[name]:
                continue
            if split:
                others = "; ".join(f"{_short(name, v)} on {n} host{'s' * (n != 1)}" for v, n in ranked)
                message = f"{name} {_short(name, value)}: its group is split ({others})"
            else:
                message = f"{name} {_short(name, value)}, its group has {_short(name, values[name])} " \
                          f"({ranked[0][1]} of {len(known)} hosts)"
            if name == "object_info" and not split:
                mine = dict(members)[host].node_classes
                theirs = next(fp.node_classes for h, fp in members if flat[h][name] == values[name])
                message = f"node set differs from its group's ({ranked[0][1]} of {len(known)} hosts): " \
                          f"{node_difference(mine, theirs)}"
            flags.append(FleetFlag(host, "drift", group, message, name, values[name], value))
    return values, flags


def _speed(group: str, members: Sequence[Member], spec: ClassSpeedSpec) -> list[FleetFlag]:
    flags = []
    for host, _, figures in members:
        others = [f for h, _, f in members if h != host]
        flags += class_flags(host, group, figures, [f.warm_median_s for f in others],
                             [f.vram_peak_gib for f in others], spec, "its class")
    return flags


def class_flags(host: str, group: str, figures: Figures, warm: Sequence[float | None],
                vram: Sequence[float | None], spec: ClassSpeedSpec, what: str) -> list[FleetFlag]:
    """The host's warm median and VRAM peak against the medians of `warm` and `vram` (its class's
    other hosts, now or in the previous report, as `what` says)."""
    flags = []
    base, now = _median(warm), figures.warm_median_s
    count = sum(v is not None for v in warm)
    if base is not None and now is not None and now > base * spec.slower_factor and now - base > spec.slower_min_s:
        more = f", {now / base - 1:+.0%}" if base > 0 else ""
        flags.append(FleetFlag(host, "class_slower", group, f"warm median {now:.2f} s, {what} {base:.2f} s "
                               f"(median of {count} hosts{more})", None, base, now))
    base, now = _median(vram), figures.vram_peak_gib
    count = sum(v is not None for v in vram)
    if base is not None and now is not None and now > base * spec.vram_factor and now - base > spec.vram_min_gib:
        flags.append(FleetFlag(host, "class_more_vram", group, f"VRAM peak {now:.2f} GiB, {what} {base:.2f} GiB "
                               f"(median of {count} hosts)", None, base, now))
    return flags


def judge(members: Sequence[Member], profile: str | None, spec: ClassSpeedSpec
          ) -> tuple[tuple[Group, ...], tuple[FleetFlag, ...]]:
    """Groups of the hosts that have a fingerprint, and every flag within them, host by host."""
    by_class: dict[str, list[Member]] = {}
    for member in members:
        if member[1] is not None:
            by_class.setdefault(member[1].gpu_class, []).append(member)
    groups, flags = [], []
    for gpu_class, group in sorted(by_class.items()):
        values, drift = _drift(gpu_class, [(h, fp) for h, fp, _ in group if fp is not None])
        groups.append(Group(profile, gpu_class, tuple(sorted(h for h, _, _ in group)), values,
                            _median([f.warm_median_s for _, _, f in group]),
                            _median([f.vram_peak_gib for _, _, f in group])))
        flags += drift + _speed(gpu_class, group, spec)
    flags.sort(key=lambda f: (f.host, f.kind != "drift", f.field or ""))
    return tuple(groups), tuple(flags)
