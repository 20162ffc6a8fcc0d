"""Owed handlers as data: the markers the host keeps, what the plan makes of them, how it shows them.
The kill points that leave them are in test_e2e_apply.py and tests/reliability/test_kill_points.py."""

from __future__ import annotations

import io
import json
from dataclasses import replace

from rich.console import Console

from provisioner.config.model import build_profile
from provisioner.facts.model import Facts, PythonEnv
from provisioner.plan import owed
from provisioner.plan.build import HostPlan
from provisioner.plan.render import plan_to_json, render_host, summary_line
from provisioner.resources.base import RESTART, Change, Handler, Run

PROFILE = build_profile({"comfyui": {"root": "/srv/ComfyUI"}}, name="t", file="/p/t.yaml")
FOLDER = "/srv/ComfyUI/.provision/owed"
RESTART_HANDLER = Handler("restart-comfyui", "restarted ComfyUI", (Run(("systemctl", "restart", "comfyui")),))
FACTS = Facts(host="h", os="Ubuntu", arch="x86_64", kernel="6.8", system_python="3.12",
              env=PythonEnv("/srv/ComfyUI/venv/bin/python", True), gpus=(), gpu_error="none",
              nvcc=None, disk_path="/srv", disk_free=10**12, comfyui_version="0.3.64")


def test_the_marker_written_before_a_change_reads_back() -> None:
    change = Change("plugin", "/x", "create", "clone ComfyUI-nunchaku v1.1.0 into /x", None, {}, (), RESTART)
    put = owed.record(PROFILE, "restart-comfyui", change)
    assert put.dest == f"{FOLDER}/restart-comfyui"
    facts = replace(FACTS, markers={FOLDER: {"restart-comfyui": put.content.decode()}})
    (found,) = owed.read(PROFILE, facts).values()
    assert found.change == "plugin: clone ComfyUI-nunchaku v1.1.0 into /x"
    assert found.describe().startswith("restart-comfyui owed since 20")
    assert found.describe().endswith("UTC by an interrupted run: plugin: clone ComfyUI-nunchaku v1.1.0 into /x")
    assert owed.clear(PROFILE, "restart-comfyui").argv == ("rm", "-f", f"{FOLDER}/restart-comfyui")
    assert owed.probe(PROFILE).markers == (FOLDER,)


def test_a_provision_folder_that_is_a_link_is_a_plan_error_before_any_change() -> None:
    from provisioner.facts.model import Entry
    from provisioner.plan.build import engine_plan

    assert "/srv/ComfyUI" in owed.probe(PROFILE).listing
    linked = replace(FACTS, listings={"/srv/ComfyUI": (Entry(".provision", "link"), Entry("main.py", "file"))})
    plan = engine_plan(PROFILE, linked, [])
    assert plan.errors == ("state: /srv/ComfyUI/.provision is a link: provision keeps its lock, snapshots and "
                           "records there and will not write through one (make it a folder)",)
    folder = replace(FACTS, listings={"/srv/ComfyUI": (Entry(".provision", "dir"),)})
    assert engine_plan(PROFILE, folder, []).errors == ()
    inside = replace(FACTS, listings={"/srv/ComfyUI": (Entry(".provision", "dir"),),
                                      "/srv/ComfyUI/.provision": (Entry("lock", "file"), Entry("wheels", "link"))})
    assert engine_plan(PROFILE, inside, []).errors == (
        "state: /srv/ComfyUI/.provision/wheels is a link: provision did not make it and will not write through "
        "one (remove it)",)


def test_a_damaged_marker_still_says_its_handler_is_owed() -> None:
    facts = replace(FACTS, markers={FOLDER: {"restart-comfyui": "\x00not json"}})
    assert owed.read(PROFILE, facts)["restart-comfyui"].describe() == \
        "restart-comfyui owed since an unknown time by an interrupted run: a change"


def test_a_marker_nested_thousands_deep_or_holding_nan_is_damaged_not_a_crash() -> None:
    for text in ("[" * 4000, "[" * 2000 + "]" * 2000, '{"since": NaN}'):
        facts = replace(FACTS, markers={FOLDER: {"restart-comfyui": text}})
        assert owed.read(PROFILE, facts)["restart-comfyui"].since == ""


def test_a_handler_the_profile_cannot_run_is_a_note_for_a_person() -> None:
    items = {"restart-comfyui": owed.Owed("restart-comfyui", "2026-01-02T03:04:05Z", "plugin: x"),
             "reload-other": owed.Owed("reload-other", "", "")}
    missing = Handler("restart-comfyui", "restart ComfyUI", missing="no comfyui.restart in the profile")
    runnable, cannot = owed.split(items, {"restart-comfyui": missing}, PROFILE)
    assert runnable == {}
    assert "no comfyui.restart in the profile" in cannot[1] and f"remove {FOLDER}/restart-comfyui" in cannot[1]
    assert "this profile has no such handler" in cannot[0]
    runnable, cannot = owed.split(items, {"restart-comfyui": RESTART_HANDLER}, PROFILE)
    assert list(runnable) == ["restart-comfyui"] and len(cannot) == 1


def test_an_owed_handler_is_work_pending_in_the_plan() -> None:
    item = owed.Owed("restart-comfyui", "2026-01-02T03:04:05Z", "plugin: clone ComfyUI-nunchaku v1.1.0")
    plan = HostPlan("gpu-01", FACTS, handlers={"restart-comfyui": RESTART_HANDLER}, owed={"restart-comfyui": item})
    assert not plan.converged and plan.notify == {"restart-comfyui"}
    out = io.StringIO()
    render_host(Console(file=out, no_color=True, width=300), plan)
    text = out.getvalue()
    assert "● gpu-01: 1 owed handler" in text
    assert "restart-comfyui owed since 2026-01-02 03:04:05 UTC by an interrupted run: plugin: clone" in text
    assert summary_line({"gpu-01": plan}) == "1 host: 1 to change (0 changes, 1 owed handler), 0 up to date, 0 failed"
    assert plan_to_json(plan)["owed"] == [{"handler": "restart-comfyui", "since": "2026-01-02T03:04:05Z",
                                            "change": "plugin: clone ComfyUI-nunchaku v1.1.0"}]
    assert json.dumps(plan_to_json(HostPlan("gpu-02", FACTS)))           # converged: owed is []
