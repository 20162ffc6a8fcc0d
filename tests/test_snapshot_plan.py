"""Rollback planning, pure: a snapshot and the host's state now (in the snapshot program's own
JSON shape) in, the changes that restore it out; the default snapshot; history's lines."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

import pytest

from provisioner.config.model import Profile, build_profile
from provisioner.errors import PlanError
from provisioner.facts.snapshots import HostSnapshots, HostState, Snapshot, parse_snapshot, parse_state
from provisioner.resources import snapshot
from provisioner.resources.base import Put, Run

ROOT = "/srv/ComfyUI"
NODE = f"{ROOT}/custom_nodes/ComfyUI-nunchaku"
PY = f"{ROOT}/venv/bin/python"
WHEEL = f"{ROOT}/.provision/wheels/nunchaku-1.0.1+torch2.6-cp312-cp312-linux_x86_64.whl"
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
V110, V120 = "a" * 40, "b" * 40

STATE: dict[str, Any] = {
    "comfyui": {"repo": True, "commit": "c" * 40, "tags": ["v0.3.64"], "remote": "https://github.com/x/ComfyUI",
                "dirty": []},
    "comfyui_version": "0.3.64",
    "custom_nodes": {"ComfyUI-nunchaku": {"repo": True, "commit": V110, "tags": ["v1.1.0"],
                                          "remote": "https://github.com/nunchaku-ai/ComfyUI-nunchaku.git",
                                          "dirty": []}},
    "distributions": {
        "diffusers": {"name": "diffusers", "version": "0.35.2", "kind": "index"},
        "nunchaku": {"name": "nunchaku", "version": "1.0.1+torch2.6", "kind": "file",
                     "url": "file://" + WHEEL.replace("+", "%2B"), "sha256": "d" * 64},
        "torch": {"name": "torch", "version": "2.6.0+cu124", "kind": "index"},
    },
    "venv_error": None,
    "models": {f"{ROOT}/models/diffusion_models/dit.safetensors": {"size": 100, "sha256": "e" * 64}},
    "workflows": {f"{ROOT}/workflows": {"edit.json": {"text": '{"1": {}}\n'}}},
}


def profile(**extra: Any) -> Profile:
    return build_profile({"comfyui": {"root": ROOT, "restart": {"systemd": "comfyui"}}, **extra},
                         name="rtx3090", file="/p/profiles/rtx3090.yaml")


def snap(state: dict[str, Any], ident: str = "20260301-110000-000", taken: str = snapshot.BEFORE_APPLY,
         wheels: dict[str, str] | None = None, unkept: dict[str, str] | None = None) -> Snapshot:
    return parse_snapshot({"format": 1, "id": ident, "time": "2026-03-01T11:00:00.000Z", "taken": taken,
                           "profile": {"name": "rtx3090", "file": "/p/profiles/rtx3090.yaml", "data": {}},
                           "state": state, "wheels": {"nunchaku": "wheels/" + "d" * 64 + "/n.whl"} if wheels is None
                           else wheels, "unkept": unkept or {}}, f"{ROOT}/.provision/snapshots")


def now(**changes: Any) -> HostState:
    state = copy.deepcopy(STATE)
    for key, value in changes.items():
        state[key] = value
    return parse_state(state)


def argv_of(step: Any) -> tuple[str, ...]:
    assert isinstance(step, Run)
    return step.argv


def test_the_same_state_plans_nothing_but_says_which_snapshot() -> None:
    plan = snapshot.restore(profile(), snap(STATE), now(), at=NOW)
    assert plan.changes == ()
    assert [n.message for n in plan.notes] == [
        "restores snapshot 20260301-110000-000 (before apply, 2026-03-01T11:00:00.000Z, profile rtx3090)"]
    assert plan.handlers[0].name == "restart-comfyui"
    (pre,), (post,) = plan.prelude, plan.postlude
    assert pre.answer == snapshot.BEFORE and b'"protect": ["20260301-110000-000"]' in (pre.stdin or b"")
    assert b'"taken": "before rollback"' in (pre.stdin or b"") and b'"reuse": true' in (pre.stdin or b"")
    assert post.answer == snapshot.AFTER and b'"taken": "after rollback"' in (post.stdin or b"")


def test_distributions_exactly_torch_included_wheels_from_the_kept_file() -> None:
    dists = copy.deepcopy(STATE["distributions"])
    dists["diffusers"]["version"] = "0.36.0"
    dists["torch"]["version"] = "2.8.0+cu128"                         # a custom node swapped CUDA torch
    dists["nunchaku"].update(version="1.2.1+cu12.4torch2.6", sha256="f" * 64,
                             url=dists["nunchaku"]["url"].replace("1.0.1", "1.2.1"))
    dists["sandbox-extra"] = {"name": "sandbox_extra", "version": "1.0", "kind": "index"}
    p = profile(pip={"no_index": True, "find_links": ["/srv/wheelhouse"]})
    (change,) = snapshot.restore(p, snap(STATE), now(distributions=dists), at=NOW).changes
    assert change.resource == "venv" and change.notify == frozenset({"restart-comfyui"})
    uninstall, mkdir, copy_kept, move, install = change.steps
    assert argv_of(uninstall) == (PY, "-m", "pip", "uninstall", "--yes", "--disable-pip-version-check", "sandbox_extra")
    kept = f"{ROOT}/.provision/snapshots/wheels/{'d' * 64}/n.whl"
    assert argv_of(copy_kept) == ("cp", kept, WHEEL + ".provision-tmp")
    assert argv_of(move) == ("mv", WHEEL + ".provision-tmp", WHEEL)         # pip records the same URL again
    assert argv_of(mkdir) == ("mkdir", "-p", f"{ROOT}/.provision/wheels")
    assert argv_of(install) == (PY, "-m", "pip", "install", "--no-deps", "--force-reinstall",
                                "--disable-pip-version-check", "--no-index", "--find-links", "/srv/wheelhouse",
                                "diffusers==0.35.2", WHEEL, "torch==2.6.0+cu124")
    assert change.before == {"diffusers": "0.36.0", "nunchaku": "1.2.1+cu12.4torch2.6 (file "
                             "nunchaku-1.2.1+torch2.6-cp312-cp312-linux_x86_64.whl)", "torch": "2.8.0+cu128",
                             "sandbox-extra": "1.0"}
    assert change.after["sandbox-extra"] is None and change.after["torch"] == "2.6.0+cu124"   # type: ignore[index]


@pytest.mark.parametrize(("kind", "unkept", "message"), [
    ("file", {"nunchaku": "/x.whl is gone"}, "was installed from /srv/ComfyUI/.provision/wheels/nunchaku-1.0.1"
                                             "+torch2.6-cp312-cp312-linux_x86_64.whl, which the snapshot could not keep (/x.whl is gone)"),
    ("dir", {}, "was installed from a folder (file:///src/nunchaku): a rollback cannot reinstall it"),
    ("vcs", {}, "was installed from a VCS (file:///src/nunchaku): a rollback cannot reinstall it"),
])
def test_a_distribution_that_cannot_be_reinstalled_is_a_plan_error(kind: str, unkept: dict[str, str],
                                                                   message: str) -> None:
    state = copy.deepcopy(STATE)
    if kind != "file":
        state["distributions"]["nunchaku"].update(kind=kind, url="file:///src/nunchaku")
    dists = copy.deepcopy(STATE["distributions"])
    dists["nunchaku"]["version"] = "1.2.0+torch2.6"
    with pytest.raises(PlanError, match="nunchaku 1.0.1") as err:
        snapshot.restore(profile(), snap(state, wheels={}, unkept=unkept), now(distributions=dists), at=NOW)
    assert message in str(err.value)


def test_plugin_back_to_its_commit_fetching_only_when_missing() -> None:
    nodes = {"ComfyUI-nunchaku": {**STATE["custom_nodes"]["ComfyUI-nunchaku"], "commit": V120, "tags": ["v1.2.0"]}}
    (change,) = snapshot.restore(profile(), snap(STATE), now(custom_nodes=nodes), at=NOW).changes
    assert change.summary == "checkout ComfyUI-nunchaku v1.2.0 -> v1.1.0" and change.action == "update"
    fetch, checkout = change.steps
    assert argv_of(fetch)[:2] == ("sh", "-c") and argv_of(fetch)[-2:] == (NODE, V110)
    assert "cat-file -e" in argv_of(fetch)[2] and "|| exec" in argv_of(fetch)[2]
    assert argv_of(checkout)[-4:] == ("checkout", "--quiet", "--detach", V110)


def test_a_modified_plugin_is_backed_up_before_it_is_reset_and_its_origin_put_back() -> None:
    nodes = {"ComfyUI-nunchaku": {**STATE["custom_nodes"]["ComfyUI-nunchaku"], "dirty": ["nodes/x.py"],
                                  "remote": "https://example.com/fork.git"}}
    (change,) = snapshot.restore(profile(), snap(STATE), now(custom_nodes=nodes), at=NOW).changes
    backup = f"{NODE}.provision-backup-20260301-120000.disabled"
    assert argv_of(change.steps[0]) == ("cp", "-a", NODE, backup)
    assert [argv_of(s)[-3:] for s in change.steps[1:4]] == [
        ("reset", "--quiet", "--hard"), ("clean", "-fd", "--quiet"),
        ("set-url", "origin", "https://github.com/nunchaku-ai/ComfyUI-nunchaku.git")]
    assert "backed up to" in change.warnings[0]


def test_custom_nodes_added_since_are_moved_aside_and_missing_ones_cloned() -> None:
    extra = {"repo": True, "commit": "9" * 40, "tags": [], "remote": "https://example.com/pack.git", "dirty": []}
    changes = snapshot.restore(profile(), snap(STATE), now(custom_nodes={"ExtraPack": extra}), at=NOW).changes
    by_key = {c.key: c for c in changes}
    aside = by_key[f"{ROOT}/custom_nodes/ExtraPack"]
    assert aside.action == "remove" and argv_of(aside.steps[0]) == (
        "mv", f"{ROOT}/custom_nodes/ExtraPack", f"{ROOT}/custom_nodes/ExtraPack.provision-rollback-20260301-120000.disabled")
    clone = by_key[NODE]
    assert clone.action == "create" and [argv_of(s)[0] for s in clone.steps] == ["mkdir", "rm", "git", "git", "mv"]
    assert argv_of(clone.steps[2])[-2:] == ("https://github.com/nunchaku-ai/ComfyUI-nunchaku.git",
                                            f"{NODE}.provision-tmp.disabled")


def test_comfyui_core_goes_back_to_its_commit_but_is_never_reset() -> None:
    core = {**STATE["comfyui"], "commit": "1" * 40}
    (change,) = snapshot.restore(profile(), snap(STATE), now(comfyui=core), at=NOW).changes
    assert change.resource == "core" and argv_of(change.steps[-1])[-1] == "c" * 40
    with pytest.raises(PlanError, match="never discards changes to ComfyUI's own checkout"):
        snapshot.restore(profile(), snap(STATE), now(comfyui={**core, "dirty": ["comfy/sd.py"]}), at=NOW)


def test_workflows_rewritten_added_ones_removed() -> None:
    folder = f"{ROOT}/workflows"
    changes = snapshot.restore(profile(), snap(STATE), now(workflows={folder: {
        "edit.json": {"text": '{"1": {"x": 1}}\n'}, "new.json": {"text": "{}\n"}}}), at=NOW).changes
    put, rm = changes
    assert isinstance(put.steps[0], Put) and put.steps[0].content == b'{"1": {}}\n' and put.notify == frozenset()
    assert put.before == '{"1": {"x": 1}}\n' and put.after == '{"1": {}}\n'
    assert argv_of(rm.steps[0]) == ("rm", "-f", f"{folder}/new.json")


def test_model_files_are_kept_unless_the_profile_asks_and_never_downloaded() -> None:
    dit = f"{ROOT}/models/diffusion_models/dit.safetensors"
    other = f"{ROOT}/models/loras/new.safetensors"
    models = {other: {"size": 5, "sha256": None}}                      # the DiT is gone, a LoRA came
    plan = snapshot.restore(profile(), snap(STATE), now(models=models), at=NOW)
    assert plan.changes == ()
    notes = " | ".join(n.message for n in plan.notes)
    assert f"{dit} was there at the snapshot and is gone: a rollback never downloads" in notes
    assert "kept 1 model file(s) the snapshot lacks (new.safetensors)" in notes
    (remove,) = snapshot.restore(profile(snapshots={"remove_models": True}), snap(STATE), now(models=models),
                                 at=NOW).changes
    assert argv_of(remove.steps[0]) == ("rm", "-f", other)


def test_an_unreadable_venv_is_a_plan_error_not_a_guess() -> None:
    with pytest.raises(PlanError, match="cannot be read"):
        snapshot.restore(profile(), snap(STATE), now(distributions=None, venv_error="python is gone"), at=NOW)


def test_choose_default_is_the_last_apply_s_snapshot_and_ids_may_be_shortened() -> None:
    taken = [snapshot.BEFORE_APPLY, snapshot.AFTER_APPLY, snapshot.BEFORE_APPLY, snapshot.AFTER_APPLY,
             snapshot.BEFORE_ROLLBACK, snapshot.AFTER_ROLLBACK]
    found = HostSnapshots("h", tuple(snap(STATE, f"20260301-1{i}0000-000", t) for i, t in enumerate(taken)))
    assert snapshot.choose(found, None).id == "20260301-120000-000"
    assert snapshot.choose(found, "20260301-11").id == "20260301-110000-000"
    with pytest.raises(PlanError, match="20260301-1 is the start of 6 snapshot ids .*: give more of it"):
        snapshot.choose(found, "20260301-1")                            # not unique: not a guess either
    with pytest.raises(PlanError, match="no snapshot 2025 on this host .its newest: 20260301-110000-000"):
        snapshot.choose(found, "2025")
    with pytest.raises(PlanError, match="nothing to roll back to"):
        snapshot.choose(HostSnapshots("h", ()), None)


def test_differences_name_what_changed() -> None:
    dists = copy.deepcopy(STATE["distributions"])
    dists["diffusers"]["version"] = "0.36.0"
    dists.pop("torch")
    nodes = {"ComfyUI-nunchaku": {**STATE["custom_nodes"]["ComfyUI-nunchaku"], "commit": V120, "tags": ["v1.2.0"]}}
    lines = snapshot.differences(parse_state(STATE), now(distributions=dists, custom_nodes=nodes))
    assert lines == ["custom node ComfyUI-nunchaku: v1.1.0 -> v1.2.0", "~ diffusers 0.35.2 -> 0.36.0",
                     "- torch 2.6.0+cu124"]
    assert snapshot.differences(parse_state(STATE), now()) == []
    hashed = {p: {"size": m["size"], "sha256": None} for p, m in STATE["models"].items()}
    assert snapshot.differences(now(models=hashed), now()) == []          # only hashed since: the same file


def test_backend_wheels_the_restored_venv_does_not_use_go_with_the_rollback() -> None:
    """The undone apply left its 1.2.1 wheel (and a .part) in provision's wheel folder; the wheel the
    snapshot's nunchaku came from stays, and so does a file that is no nunchaku wheel."""
    from provisioner.facts.model import Entry, Facts, PythonEnv

    folder = f"{ROOT}/.provision/wheels"
    newer = "nunchaku-1.2.1+cu12.8torch2.8-cp312-cp312-linux_x86_64.whl"
    listed = tuple(Entry(n, "file", 10, 1) for n in (WHEEL.rsplit("/", 1)[1], newer, newer + ".part", "notes.txt"))
    facts = Facts(host="gpu-01", os="Ubuntu", arch="x86_64", kernel="6", system_python="/usr/bin/python3",
                  env=PythonEnv(python=PY, exists=True), gpus=(), gpu_error=None, nvcc=None, disk_path=ROOT,
                  disk_free=10**12, comfyui_version="0.3.64", listings={folder: listed})
    plan = snapshot.restore(profile(), snap(STATE), now(), facts=facts, at=NOW)
    (change,) = plan.changes
    assert (change.resource, change.action, change.key) == ("backend", "remove", folder)
    assert argv_of(change.steps[0]) == ("rm", "-rf", f"{folder}/{newer}", f"{folder}/{newer}.part")
    assert snapshot.restore(profile(), snap(STATE), now(), at=NOW).changes == ()      # no listing: nothing


def test_a_venv_made_by_the_apply_is_one_line_not_every_distribution() -> None:
    """History of a bare host's first apply: `venv created: N distributions, torch X`, not
    "venv: unreadable -> readable" and a line per package; a venv that broke says why."""
    fresh = now(distributions=None, venv_error="/opt/ComfyUI/venv/bin/python does not exist")
    assert snapshot.differences(fresh, now()) == [
        f"venv created: {len(STATE['distributions'])} distributions, torch 2.6.0+cu124"]
    broken = now(distributions=None, venv_error="ImportError: libpython3.12.so.1.0")
    assert snapshot.differences(now(), broken) == [
        f"venv unreadable (ImportError: libpython3.12.so.1.0): {len(STATE['distributions'])} distributions, "
        "torch 2.6.0+cu124"]
