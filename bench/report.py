"""The machine the bench ran on, and the results as Markdown tables (pasted into docs/performance.md)."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from typing import Any

from bench.cases import CaseResult
from bench.measure import median
from bench.venvs import tool_version

CASE_TITLES = {"converge": "first converge", "noop": "no-op re-run", "plan": "plan after a change"}


def machine(tools: Sequence[str]) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    info: dict[str, Any] = {
        "nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(), "openssh": ssh, "kernel": platform.release(),
        "load_before": os.getloadavg(),
    }
    for tool in tools:
        if tool != "provision":
            info[tool] = tool_version(tool)
    return info


def _fmt(values: Sequence[float], unit: str = "") -> str:
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return f"{median(values):.1f}{unit}" if lo == hi else f"{median(values):.1f}{unit} ({lo:.0f}–{hi:.0f})"


def table(results: Sequence[CaseResult]) -> str:
    """One row per (hosts, case, tool): median seconds, provision's ratio, connections, execs, memory."""
    lines = ["| hosts | case | tool | median s (runs) | × provision | SSH conn / host | exec / host "
             "| peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    by_key = {(r.hosts, r.case, r.tool): r for r in results}
    for r in results:
        if r.case == "floor":
            lines.append(f"| {r.hosts} | floor (`ssh host true`, parallel) | OpenSSH | "
                         f"{r.median_s:.3f} ({len(r.seconds)}) | | 1 | 1 | |")
            continue
        base = by_key.get((r.hosts, r.case, "provision"))
        ratio = "1.0" if r.tool == "provision" else (
            f"{r.median_s / base.median_s:.1f}×" if base and base.median_s else "–")
        failed = f" **{len(r.failures)} failed**" if r.failures else ""
        lines.append(f"| {r.hosts} | {CASE_TITLES[r.case]} | {r.tool} | {r.median_s:.2f} ({len(r.seconds)})"
                     f"{failed} | {ratio} | {_fmt(r.connections)} | {_fmt(r.sessions)} "
                     f"| {max(r.peak_mb):.0f} |")
    return "\n".join(lines)


def throughput_table(t: dict[str, Any]) -> str:
    size = f"{t['mib']} MiB"
    rows = [("push " + size, "provision `SshConnection.put_file` (SFTP, pipelined)", "push_provision"),
            ("push " + size, "`scp`", "push_scp"),
            ("sha256 " + size, "provision fetch script, mode verify (python3 " + t["python3"] + ")",
             "hash_fetch_script"),
            ("sha256 " + size, "`sha256sum`", "hash_sha256sum")]
    lines = [f"| what | how | median s ({t['runs']} runs) | MB/s |", "|---|---|---|---|"]
    for what, how, key in rows:
        lines.append(f"| {what} | {how} | {t[key]['median_s']:.2f} | {t[key]['mb_per_s']:.0f} |")
    lines.append(f"\npush: provision at {t['push_ratio'] * 100:.0f}% of scp's throughput; "
                 f"hash: fetch script at {t['hash_ratio'] * 100:.0f}% of sha256sum's.")
    return "\n".join(lines)
