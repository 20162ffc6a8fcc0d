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

CASE_TITLES = {"converge": "first converge", "noop": "no-op re-run", "plan": "plan after a change",
               "change": "apply of one change (plugin tag)"}


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


def snapshot_table(results: Sequence[CaseResult]) -> str:
    """provision's snapshots (before and after) as a share of each apply, from its JSON-lines logs."""
    lines = ["| hosts | case | snapshots' share of the apply, median (runs) | goal |", "|---|---|---|---|"]
    goals = {"converge": 0.10, "change": 0.05}
    for r in results:
        if r.tool == "provision" and r.snapshot_share:
            lines.append(f"| {r.hosts} | {CASE_TITLES[r.case]} | {median(r.snapshot_share) * 100:.1f} % "
                         f"({len(r.snapshot_share)}) | < {goals.get(r.case, 0) * 100:.0f} % |")
    return "\n".join(lines)


def throughput_table(t: dict[str, Any]) -> str:
    size = f"{t['mib']} MiB"
    rows = [("push " + size, "provision `SshConnection.put_file` (system scp, pinned host key)", "push_provision"),
            ("push " + size, "paramiko SFTP, pipelined (put_file before)", "push_sftp"),
            ("push " + size, "`scp` with the fleet's ssh_config", "push_scp"),
            ("sha256 " + size, "provision fetch script, mode verify (python3 " + t["python3"] + ")",
             "hash_fetch_script"),
            ("sha256 " + size, "`sha256sum`", "hash_sha256sum")]
    lines = [f"| what | how | median s ({t['runs']} runs) | MB/s |", "|---|---|---|---|"]
    for what, how, key in rows:
        lines.append(f"| {what} | {how} | {t[key]['median_s']:.2f} | {t[key]['mb_per_s']:.0f} |")
    lines.append(f"\npush: provision at {t['push_ratio'] * 100:.0f}% of scp's throughput (paramiko SFTP "
                 f"{t['sftp_ratio'] * 100:.0f}%); "
                 f"hash: fetch script at {t['hash_ratio'] * 100:.0f}% of sha256sum's.")
    return "\n".join(lines)


def download_table(d: dict[str, Any]) -> str:
    size = f"{d['mib']} MiB"
    rows = [("fetch_script", "provision fetch program (sha256 while receiving, fsync, rename)"),
            ("curl", "`curl -sSfL -o` (no hash, no fsync)"),
            ("curl_sync", "`curl` then `sync FILE` (the same durability)"),
            ("hf_hub_download", f"huggingface_hub {d['versions'].get('huggingface_hub')} `hf_hub_download` "
                                f"(hf_xet {d['versions'].get('hf_xet')} installed; the stand-in speaks no Xet)")]
    lines = [f"| download {size} (Hub stand-in, 302 to its CDN) | median s ({d['runs']} runs) | MB/s |",
             "|---|---|---|"]
    for key, how in rows:
        if key in d:
            lines.append(f"| {how} | {d[key]['median_s']:.2f} | {d[key]['mb_per_s']:.0f} |")
    lines.append(f"\ndownload: fetch program at {d['fetch_vs_curl'] * 100:.0f}% of curl's throughput, "
                 f"{d['fetch_vs_curl_sync'] * 100:.0f}% of curl + sync.")
    return "\n".join(lines)


def verify_table(v: dict[str, Any]) -> str:
    lines = [f"| `provision verify`, one converged host over SSH | median s ({v['runs']} runs) |", "|---|---|",
             f"| wall | {v['median_wall_s']:.2f} |",
             f"| generations, ComfyUI's own time (cold + 2 warm) | {v['median_comfy_s']:.2f} |",
             f"| generations, queued to done as the controller saw them | {v['median_generation_wall_s']:.2f} |",
             f"| overhead: wall minus ComfyUI's time | {v['median_overhead_s']:.2f} |"]
    return "\n".join(lines)


def wave_table(w: dict[str, Any]) -> str:
    """The upgrade wave: one plugin tag move on N hosts, each verified by a generation."""
    lines = [f"| upgrade wave: plugin tag move on {w['hosts']} hosts, verified | median s (runs) | × provision |",
             "|---|---|---|"]
    how = {"provision": "provision `apply --verify-gate` (verify: one generation; rollback on failure)",
           "ansible": "Ansible: git, restart when moved, one generation through ComfyUI's API",
           "pyinfra": "pyinfra: git, restart when moved, one generation through ComfyUI's API"}
    base = w["median_s"].get("provision")
    for tool, seconds in w["median_s"].items():
        failed = f" **{len(w['failures'][tool])} failed**" if w["failures"][tool] else ""
        ratio = "1.0" if tool == "provision" else (f"{seconds / base:.1f}×" if base else "–")
        lines.append(f"| {how[tool]} | {seconds:.2f} ({len(w['seconds'][tool])}){failed} | {ratio} |")
    return "\n".join(lines)


def goals_table(results: Sequence[CaseResult], throughput: dict[str, Any] | None,
                download: dict[str, Any] | None, verify: dict[str, Any] | None = None) -> str:
    """The goals (issue 18's, as issue 27 tightened them), each with its figure from this run."""
    by_key = {(r.hosts, r.case, r.tool): r for r in results}
    lines = ["| goal | measured | |", "|---|---|---|"]

    def goal(text: str, measured: str, met: bool) -> None:
        lines.append(f"| {text} | {measured} | {'met' if met else '**missed**'} |")

    for n, allowance in ((1, 0.25), (10, 0.3)):
        for case in ("noop", "plan"):
            floor, mine = by_key.get((n, "floor", "ssh true")), by_key.get((n, case, "provision"))
            if floor and mine:
                gap = mine.median_s - floor.median_s
                goal(f"{CASE_TITLES[case]}, {n} host{'s' * (n != 1)}: within {allowance:g} s of the `ssh true` floor",
                     f"{mine.median_s:.2f} s vs {floor.median_s:.2f} s: +{gap:.2f} s", gap <= allowance)
    for r in results:
        if r.case == "converge" and r.tool == "provision":
            peers = [p for p in results if p.hosts == r.hosts and p.case == "converge" and p.tool != "provision"]
            if peers:
                best = min(peers, key=lambda p: p.median_s)
                ratio = best.median_s / r.median_s
                goal(f"first converge, {r.hosts} host{'s' * (r.hosts != 1)}: ≥ 1.5× faster than the best peer",
                     f"{r.median_s:.2f} s vs {best.tool} {best.median_s:.2f} s: {ratio:.2f}×", ratio >= 1.5)
        if r.tool == "provision" and r.snapshot_share and r.case in ("converge", "change"):
            share, limit = median(r.snapshot_share), 0.10 if r.case == "converge" else 0.05
            goal(f"snapshots under {limit * 100:.0f} % of the {CASE_TITLES[r.case]}, {r.hosts} host{'s' * (r.hosts != 1)}",
                 f"{share * 100:.1f} %", share < limit)
    for r in results:
        if r.hosts >= 50 and r.case in ("noop", "plan") and r.tool == "provision":
            peak = max(r.peak_mb)
            goal(f"{CASE_TITLES[r.case]}, {r.hosts} hosts: under 3 s, peak RSS under 150 MB",
                 f"{r.median_s:.2f} s, {peak:.0f} MB (floor {by_key[(r.hosts, 'floor', 'ssh true')].median_s:.2f} s)",
                 r.median_s < 3 and peak < 150)
    if throughput:
        ratio = throughput["push_ratio"]
        goal(f"push {throughput['mib']} MiB at ≥ 90 % of scp", f"{ratio * 100:.0f} %", ratio >= 0.9)
    if download:
        # against curl with the same durability: the fetch program fsyncs before its rename
        ratio = download["fetch_vs_curl_sync"]
        goal(f"download {download['mib']} MiB within 10 % of curl + sync",
             f"{ratio * 100:.0f} % of curl + sync's throughput ({download['fetch_vs_curl'] * 100:.0f} % of curl's)",
             ratio >= 1 / 1.1)
    if verify:
        over = verify["median_overhead_s"]
        goal("`provision verify` overhead beyond the generations under 0.5 s per host", f"{over:.2f} s", over < 0.5)
    return "\n".join(lines)
