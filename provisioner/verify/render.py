"""The console view of a verification: one table row per host, then each host's check lines
(failed hosts first, failed checks first). The figures are the verification's own (`figures`),
in the units and precision the checks print."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from provisioner.errors import ConnectError


def _fmt(value: float | None, unit: str) -> str:
    return "–" if value is None else f"{value:.2f} {unit}"


def render_verification(results: Mapping[str, Any], console: Console, rolled_back: frozenset[str] = frozenset()) -> bool:
    """Print the table and the check lines. `results` maps a host to (facts, HostVerification)
    or an exception; `rolled_back`: hosts a verify gate restored (their verification is the
    restored host's). Returns True when any host failed."""
    table = Table(title="verification", title_justify="left")
    for column in ("host", "result", "GPU", "cold", "warm (median)", "VRAM peak", "images"):
        table.add_column(column)
    failed_any = False
    order = sorted(results, key=lambda n: _passed(results[n]))  # failures first
    for name in order:
        result = results[name]
        if isinstance(result, BaseException):
            failed_any = True
            status = "unreachable" if isinstance(result, ConnectError) else "failed"
            table.add_row(escape(name), f"[red]{status}[/]", "", "", "", "", "")
            continue
        facts, verification = result
        passed = verification.passed
        failed_any |= not passed
        figures = verification.figures
        images = [r.image for r in verification.runs if r.image is not None]
        good = sum(1 for i in images if i.ok)
        gpu = facts.gpu.name.replace("NVIDIA ", "") if facts and facts.gpu else "–"
        stopped = verification.ladder.failed
        result_cell = ("[yellow]rolled back[/]" if name in rolled_back else
                       "[green]passed[/]" if passed else f"[red]failed at {stopped or 'verification'}[/]")
        table.add_row(escape(name), result_cell, escape(gpu),
                      _fmt(figures.cold_s, "s"), _fmt(figures.warm_median_s, "s"),
                      _fmt(figures.vram_peak_gib, "GiB"),
                      f"{good}/{len(images)} sane" if images else "–")
    console.print(table)
    for name in order:
        result = results[name]
        if isinstance(result, BaseException):
            console.print(f"[bold]{escape(name)}[/] [red]✗ {escape(str(result))}[/]")
            continue
        console.print(f"[bold]{escape(name)}[/] ladder: {escape(result[1].ladder.line)}")
        checks = sorted(result[1].checks, key=lambda c: c.passed)
        for check in checks:
            mark = {"PASS": "[green]PASS[/]", "WARN": "[yellow]WARN[/]", "FAIL": "[red]FAIL[/]"}[check.mark]
            console.print(f"[bold]{escape(name)}[/] {mark} {escape(check.name)}: {escape(check.detail)}")
            for line in check.lines:
                console.print(f"      {escape(line)}")
    return failed_any


def _passed(result: Any) -> bool:
    return not isinstance(result, BaseException) and bool(result[1].passed)
