"""Plan rendering: the diff a person reads and the JSON a machine reads."""

from __future__ import annotations

import json

from rich.console import Console

from provisioner.errors import ConnectError
from provisioner.facts.model import Facts, PythonEnv
from provisioner.plan.build import HostPlan
from provisioner.plan.render import diff_lines, render_host, results_to_json, summary_line
from provisioner.resources.base import Change, Note, Run


def facts(host: str) -> Facts:
    return Facts(host=host, os="Ubuntu", arch="x86_64", kernel="6", system_python="/usr/bin/python3",
                 env=PythonEnv(python="/opt/ComfyUI/venv/bin/python", exists=True), gpus=(),
                 gpu_error=None, nvcc=None, disk_path="/opt", disk_free=10**12, comfyui_version="0.3.64")


PIP = Change("packages", "diffusers", "update", "install 'diffusers>=0.35' (have 0.34.0)",
             {"diffusers": "0.34.0"}, {"diffusers": ">=0.35"},
             (Run(("/v/bin/python", "-m", "pip", "install", "diffusers>=0.35")),))
WORKFLOW = Change("workflow", "/opt/ComfyUI/workflows/x.json", "update", "write x.json",
                  '{\n  "cpu_offload": "disable"\n}\n', '{\n  "cpu_offload": "enable"\n}\n', ())


def text_of(plan: HostPlan, verbose: bool = False) -> str:
    console = Console(record=True, no_color=True, width=120)
    render_host(console, plan, verbose=verbose)
    return console.export_text()


def test_mapping_diff_shows_only_changed_fields():
    assert diff_lines(PIP) == ["diffusers: 0.34.0 -> >=0.35"]


def test_text_diff_is_unified():
    lines = diff_lines(WORKFLOW)
    assert '-  "cpu_offload": "disable"' in lines
    assert '+  "cpu_offload": "enable"' in lines
    assert lines[0].startswith("--- host:")


def test_render_host_changes_notes_and_steps():
    plan = HostPlan("gpu-01", facts("gpu-01"), (PIP, WORKFLOW), (Note("model", "offload on"),))
    out = text_of(plan, verbose=True)
    assert "gpu-01: 2 changes" in out
    assert "~ packages install 'diffusers>=0.35' (have 0.34.0)" in out
    assert "$ /v/bin/python -m pip install diffusers>=0.35" in out
    assert "warning model: offload on" in out


def test_render_errors_and_up_to_date():
    assert "up to date" in text_of(HostPlan("a", facts("a")))
    failed = text_of(HostPlan("b", facts("b"), errors=("backend: no wheel",)))
    assert "cannot be converged" in failed and "backend: no wheel" in failed


def test_summary_line_counts_hosts_and_changes():
    results = {
        "a": HostPlan("a", facts("a"), (PIP, WORKFLOW)),
        "b": HostPlan("b", facts("b")),
        "c": ConnectError("c: connection refused"),
        "d": HostPlan("d", facts("d"), errors=("x",)),
    }
    assert summary_line(results) == "4 hosts: 1 to change (2 changes), 1 up to date, 2 failed"
    doc = json.loads(results_to_json(results))
    assert [h["status"] for h in doc["hosts"]] == ["changes", "ok", "unreachable", "failed"]
    assert doc["hosts"][0]["changes"][0]["steps"] == ["/v/bin/python -m pip install diffusers>=0.35"]


def test_created_text_is_one_line_unless_verbose():
    created = Change("workflow", "/w.json", "create", "create /w.json", None, '{\n  "a": 1\n}\n', ())
    assert diff_lines(created, full=False) == ["new file, 3 lines (-v shows it)"]
    assert '+  "a": 1' in diff_lines(created)
    plan = HostPlan("h", facts("h"), (created,))
    assert "new file, 3 lines" in text_of(plan) and '"a": 1' in text_of(plan, verbose=True)


def test_removed_text_is_one_line_unless_verbose():
    """`rollback --check` removing a workflow the snapshot lacks is as brief as `plan` creating one."""
    removed = Change("workflow", "/w.json", "remove", "remove /w.json (not in the snapshot)",
                     '{\n  "a": 1\n}\n', None, ())
    assert diff_lines(removed, full=False) == ["file removed, 3 lines (-v shows it)"]
    assert '-  "a": 1' in diff_lines(removed)
    plan = HostPlan("h", facts("h"), (removed,))
    assert "file removed, 3 lines" in text_of(plan) and '"a": 1' not in text_of(plan)
    assert '"a": 1' in text_of(plan, verbose=True)
