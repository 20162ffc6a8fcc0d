"""The only place that draws a plan: text for people (rich), JSON for machines."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape

from provisioner.facts.model import Login
from provisioner.plan.build import HostPlan
from provisioner.resources.base import Change, Fetch, Push, Put, Run

SIGILS = {"create": ("+", "green"), "update": ("~", "yellow"), "replace": ("-/+", "magenta"),
          "remove": ("-", "red")}


def describe_step(step: Run | Put | Push | Fetch) -> str:
    """One line per step, as shown under a change with -v and logged."""
    if isinstance(step, Run):
        return step.what or " ".join(step.argv)
    if isinstance(step, Put):
        return step.what or f"write {step.dest} ({len(step.content)} bytes)"
    if isinstance(step, Push):
        return step.what or f"push {step.src} -> {step.dest}"
    size = f" ({_human(step.size)})" if step.size else ""
    return step.what or f"download {step.url} -> {step.dest}{size}"


def runs_as(change: Change, login: Login) -> str | None:
    """Whom a change's steps run as: for one with `system` steps (a unit, systemctl) the user the
    login becomes when it is not root; for any other, the root's owner when the login works there
    as that owner (sudo); else the login user. None: the host did not say."""
    system = any(getattr(step, "system", False) for step in change.steps)
    if system and login.uid not in (None, 0) and login.become:
        return f"{login.become} (sudo, as {login.user})"
    if not system and login.works_as:
        return f"{login.works_as} (sudo, as {login.user})"
    return login.user


def _human(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def diff_lines(change: Change, *, full: bool = True) -> list[str]:
    """before/after as lines: a unified diff for texts, `key: old -> new` for mappings.

    A text created from nothing, or removed whole (a rollback's workflow that the snapshot lacks),
    is one line unless `full` (its whole body says little in a plan).
    """
    before, after = change.before, change.after
    if not before and isinstance(after, str) and not full:
        return [f"new file, {len(after.splitlines())} lines (-v shows it)"]
    if after is None and isinstance(before, str) and before and not full:
        return [f"file removed, {len(before.splitlines())} lines (-v shows it)"]
    if isinstance(before, str) or isinstance(after, str):
        old = before.splitlines() if isinstance(before, str) else []
        new = after.splitlines() if isinstance(after, str) else []
        return list(difflib.unified_diff(old, new, f"host:{change.key}", f"profile:{change.key}",
                                         n=2, lineterm=""))
    old_map: Mapping[str, object] = before or {}
    new_map: Mapping[str, object] = after or {}
    lines = []
    for key in dict.fromkeys([*old_map, *new_map]):
        old_v, new_v = old_map.get(key), new_map.get(key)
        if old_v != new_v:
            lines.append(f"{key}: {_show(old_v)} -> {_show(new_v)}")
    return lines


def _show(value: object) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "(none)"
    return str(value)


def render_host(console: Console, plan: HostPlan, *, verbose: bool = False) -> None:
    if plan.errors:
        console.print(f"[bold red]✗ {escape(plan.host)}[/]: cannot be converged")
        for err in plan.errors:
            console.print(f"    [red]{escape(err)}[/]")
    elif plan.converged:
        console.print(f"[bold green]✓ {escape(plan.host)}[/]: up to date")
    else:
        console.print(f"[bold yellow]● {escape(plan.host)}[/]: {_pending(plan)}")
    for item in plan.owed.values():
        console.print(f"  [yellow]![/] [bold]handler[/] {escape(item.describe())}")
    for change in plan.changes:
        sigil, colour = SIGILS[change.action]
        whom = runs_as(change, plan.facts.login)
        as_other = f" [dim](as {escape(whom)})[/]" if whom and whom != plan.facts.login.user else ""
        console.print(f"  [{colour}]{sigil}[/] [bold]{change.resource}[/] {escape(change.summary)}{as_other}")
        for line in diff_lines(change, full=verbose):
            style = "green" if line.startswith("+") else "red" if line.startswith("-") else "dim"
            console.print(f"      [{style}]{escape(line)}[/]", highlight=False)
        for warning in change.warnings:
            console.print(f"      [yellow]! {escape(warning)}[/]")
        if verbose:
            for step in change.steps:
                console.print(f"      [dim]$ {escape(describe_step(step))}[/]", highlight=False)
    for note in plan.notes:
        colour = "yellow" if note.level == "warning" else "cyan"
        console.print(f"  [{colour}]{note.level}[/] {note.resource}: {escape(note.message)}")


def _pending(plan: HostPlan) -> str:
    """`3 changes`, `1 change, 1 owed handler`, `1 owed handler`."""
    count, owed = len(plan.changes), len(plan.owed)
    parts = [f"{count} change{'s' * (count != 1)}"] if count or not owed else []
    return ", ".join(parts + ([f"{owed} owed handler{'s' * (owed != 1)}"] if owed else []))


def summary_line(results: Mapping[str, HostPlan | BaseException]) -> str:
    """`3 hosts: 1 to change (4 changes), 2 up to date, 0 failed`; owed handlers count as work."""
    plans = [r for r in results.values() if isinstance(r, HostPlan)]
    to_change = [p for p in plans if not p.converged and not p.errors]
    n_changes = sum(len(p.changes) for p in to_change)
    n_owed = sum(len(p.owed) for p in to_change)
    up_to_date = sum(1 for p in plans if p.converged)
    failed = len(results) - len(to_change) - up_to_date
    hosts = len(results)
    owed = f", {n_owed} owed handler{'s' * (n_owed != 1)}" if n_owed else ""
    return (f"{hosts} host{'s' * (hosts != 1)}: {len(to_change)} to change "
            f"({n_changes} change{'s' * (n_changes != 1)}{owed}), {up_to_date} up to date, {failed} failed")


def render_failure(console: Console, host: str, error: BaseException) -> None:
    from provisioner.errors import ProvisionError

    text = str(error)
    if not isinstance(error, ProvisionError):
        # Not an error a user can cause: a bug. Say so rather than pass it off as the host's fault.
        text = f"internal error {type(error).__name__}: {error} (a bug in provision)"
    console.print(f"[bold red]✗ {escape(host)}[/]: {escape(text)}")


def plan_to_json(plan: HostPlan) -> dict[str, Any]:
    return {
        "host": plan.host,
        "status": "failed" if plan.errors else "ok" if plan.converged else "changes",
        "errors": list(plan.errors),
        "owed": [{"handler": o.handler, "since": o.since or None, "change": o.change or None}
                 for o in plan.owed.values()],
        "changes": [
            {
                "resource": c.resource, "key": c.key, "action": c.action, "summary": c.summary,
                "before": c.before, "after": c.after, "diff": diff_lines(c),
                "steps": [describe_step(s) for s in c.steps], "as": runs_as(c, plan.facts.login),
                "notify": sorted(c.notify), "warnings": list(c.warnings), **({"data": c.data} if c.data else {}),
            }
            for c in plan.changes
        ],
        "notes": [{"resource": n.resource, "level": n.level, "message": n.message} for n in plan.notes],
    }


def results_to_json(results: Mapping[str, HostPlan | BaseException]) -> str:
    hosts = []
    for name, result in results.items():
        if isinstance(result, HostPlan):
            hosts.append(plan_to_json(result))
        else:
            hosts.append({"host": name, "status": "unreachable" if _is_connect(result) else "failed",
                          "errors": [str(result)], "owed": [], "changes": [], "notes": []})
    return json.dumps({"summary": summary_line(results), "hosts": hosts}, indent=2, default=str)


def _is_connect(error: BaseException) -> bool:
    from provisioner.errors import ConnectError

    return isinstance(error, ConnectError)
