"""Rollback planning, pure: a snapshot and the host's state now (in the snapshot program's own
JSON shape) in, the changes that restore it out; the default snapshot; history's lines."""

from __future__ import annotations

import copy
import json
import posixpath
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from provisioner.config.model import Profile, build_profile
from provisioner.errors import PlanError
from provisioner.remote import clone_argv, git_argv
from provisioner.facts.snapshots import HostSnapshots, HostState, Snapshot, parse_snapshot, parse_state
from provisioner import remote
from provisioner.remote import snapshot as snapshot_program
from provisioner.plan.rollback import producer, verification_profile
from provisioner.resources import plugin, snapshot, units, workflow
from provisioner.resources.base import Fetch, Put, Run
from provisioner.resources.releases import Asset, Listing

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


KEPT = f"{ROOT}/.provision/snapshots/wheels/{'d' * 64}/n.whl"
STAGE = f"{ROOT}/.provision/rollback-stage.provision-tmp"
TORCH_INDEX = "https://torch-mirror.example/whl/{flavour}"


def no_release(source: Any, version: str, filename: str, **_: Any) -> Listing:
    return Listing(source, "nowhere", ())


def moved() -> dict[str, Any]:
    """The venv after an apply that moved torch's CUDA build, the backend and diffusers, and added a package."""
    dists = copy.deepcopy(STATE["distributions"])
    dists["diffusers"]["version"] = "0.36.0"
    dists["torch"]["version"] = "2.8.0+cu128"                         # a custom node swapped CUDA torch
    dists["nunchaku"].update(version="1.2.1+cu12.4torch2.6", sha256="f" * 64,
                             url=dists["nunchaku"]["url"].replace("1.0.1", "1.2.1"))
    dists["sandbox-extra"] = {"name": "sandbox_extra", "version": "1.0", "kind": "index"}
    return dists


def test_distributions_exactly_everything_fetched_and_checked_before_anything_changes() -> None:
    """torch comes back from its own index (the venv resource's source arguments for its flavour),
    the rest from the profile's; the kept wheel is put back and checked; pip installs the staged
    set --no-index; only then is what the apply added uninstalled."""
    p = profile(pip={"no_index": True, "find_links": ["/srv/wheelhouse"]},
                comfyui={"root": ROOT, "restart": {"systemd": "comfyui"},
                         "torch": {"version": "2.6.0", "cuda": "12.4", "index_url": TORCH_INDEX}})
    fetch, change = snapshot.restore(p, snap(STATE), now(distributions=moved()), lister=no_release, at=NOW).changes
    assert change.resource == "venv" and change.notify == frozenset({"restart-comfyui"})
    assert (fetch.resource, fetch.key, fetch.notify) == ("venv", STAGE, frozenset())
    clear, mkdir, get_index, get_torch, stage = fetch.steps
    install, uninstall, done = change.steps
    assert argv_of(clear) == ("rm", "-rf", STAGE) and argv_of(mkdir) == ("mkdir", "-p", STAGE)
    assert argv_of(get_index) == (PY, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                                  "--dest", STAGE, "--no-index", "--find-links", "/srv/wheelhouse", "diffusers==0.35.2")
    assert argv_of(get_torch) == (PY, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                                  "--dest", STAGE, "--index-url", "https://torch-mirror.example/whl/cu124",
                                  "torch==2.6.0+cu124")
    request = json.loads(stage.stdin or b"")
    assert request == {"mode": "stage", "dir": f"{ROOT}/.provision/snapshots",
                       "wheels": [{"kept": KEPT, "dest": WHEEL, "sha256": "d" * 64,
                                   "within": f"{ROOT}/.provision/wheels"}]}
    assert argv_of(install) == (PY, "-m", "pip", "install", "--disable-pip-version-check", "--no-warn-conflicts",
                                "--no-deps", "--force-reinstall", "--no-index", "--find-links", STAGE,
                                "diffusers==0.35.2", WHEEL, "torch==2.6.0+cu124")
    assert argv_of(uninstall) == (PY, "-m", "pip", "uninstall", "--yes", "--disable-pip-version-check", "sandbox_extra")
    assert argv_of(done) == ("rm", "-rf", STAGE)
    assert change.before == {"diffusers": "0.36.0", "nunchaku": "1.2.1+cu12.4torch2.6 (file "
                             "nunchaku-1.2.1+torch2.6-cp312-cp312-linux_x86_64.whl)", "torch": "2.8.0+cu128",
                             "sandbox-extra": "1.0"}
    assert change.after["sandbox-extra"] is None and change.after["torch"] == "2.6.0+cu124"   # type: ignore[index]


def test_the_sources_a_snapshot_recorded_win_over_the_profile_s() -> None:
    recorded = {"torch": ["--index-url", "https://old-mirror.example/whl/cu124"], "diffusers": ["--no-index"]}
    target = replace(snap(STATE), sources={k: tuple(v) for k, v in recorded.items()})
    fetch, _ = snapshot.restore(profile(), target, now(distributions=moved()), lister=no_release, at=NOW).changes
    downloads = [argv_of(s) for s in fetch.steps if isinstance(s, Run) and "download" in s.argv]
    assert [d[8:] for d in downloads] == [("--no-index", "diffusers==0.35.2"),
                                          ("--index-url", "https://old-mirror.example/whl/cu124", "torch==2.6.0+cu124")]


def test_an_index_distribution_whose_wheel_was_kept_comes_back_from_the_kept_wheel() -> None:
    """The snapshot kept diffusers 0.35.2's wheel before the apply replaced it: the rollback stages
    that wheel (checked against the sha256 it is stored by) instead of asking the index, which may
    no longer serve it; one whose kept copy is gone or changed is asked of the index again. The
    rollback's own snapshot keeps the wheels of what it replaces and removes."""
    sha = "a" * 64
    kept = {"nunchaku": "wheels/" + "d" * 64 + "/n.whl", "diffusers": f"wheels/{sha}/diffusers-0.35.2-py3-none-any.whl"}
    store = f"{ROOT}/.provision/snapshots/wheels/{sha}/diffusers-0.35.2-py3-none-any.whl"
    for kept_now, from_store in (({store: sha, KEPT: "d" * 64}, True), ({KEPT: "d" * 64}, False)):
        plan = snapshot.restore(profile(), snap(STATE, wheels=kept), now(distributions=moved()), kept=kept_now,
                                lister=no_release, at=NOW)
        fetch, change = plan.changes
        downloads = [a for s in fetch.steps if isinstance(s, Run) and "download" in s.argv for a in argv_of(s)]
        (stage,) = [json.loads(s.stdin or b"") for s in fetch.steps if isinstance(s, Run) and b'"stage"' in (s.stdin or b"")]
        staged = {"kept": store, "dest": f"{STAGE}/diffusers-0.35.2-py3-none-any.whl", "sha256": sha, "within": STAGE}
        assert (staged in stage["wheels"]) is from_store
        assert ("diffusers==0.35.2" in downloads) is not from_store and "torch==2.6.0+cu124" in downloads
        assert "diffusers==0.35.2" in argv_of(change.steps[0])               # installed --no-index from the stage
        assert change.replaces == {"diffusers", "nunchaku", "torch", "sandbox-extra"}
        (pre,) = plan.prelude
        assert json.loads(pre.stdin or b"")["replaced"] == ["diffusers", "nunchaku", "sandbox-extra", "torch"]


def test_the_snapshot_program_records_each_index_distribution_s_source() -> None:
    p = profile(pip={"index_url": "https://pkgs.example/simple"},
                comfyui={"root": ROOT, "restart": {"systemd": "comfyui"},
                         "torch": {"version": "2.6.0", "cuda": "12.4", "index_url": TORCH_INDEX}})
    dists = {**copy.deepcopy(STATE["distributions"]),
             "nvidia-cublas-cu12": {"name": "nvidia-cublas-cu12", "version": "12.4.5.8", "kind": "index"}}
    assert snapshot_program.index_sources(dists, snapshot.index_sources(p)) == {
        "diffusers": ["--index-url", "https://pkgs.example/simple"],
        "nvidia-cublas-cu12": ["--index-url", "https://torch-mirror.example/whl/cu124"],   # torch's flavour
        "torch": ["--index-url", "https://torch-mirror.example/whl/cu124"]}


@pytest.mark.parametrize("kept_now", [{}, {KEPT: "0" * 64}], ids=["gone", "changed"])
def test_a_kept_wheel_gone_or_changed_is_fetched_again_and_checked_or_the_plan_fails(kept_now: dict[str, str]) -> None:
    dists = moved()
    wheel = posixpath.basename(WHEEL)

    def offers(source: Any, version: str, filename: str, **_: Any) -> Listing:
        assert (version, filename) == ("1.0.1", wheel)
        return Listing(source, "release", (Asset(wheel, "https://releases.example/" + wheel, 1234, "d" * 64),))

    get, change = snapshot.restore(profile(), snap(STATE), now(distributions=dists), kept=kept_now, lister=offers,
                                   at=NOW).changes
    (fetch,) = [s for s in get.steps if isinstance(s, Fetch)]
    assert (fetch.url, fetch.dest, fetch.sha256) == ("https://releases.example/" + wheel, WHEEL, "d" * 64)
    assert not any(isinstance(s, Run) and s.argv == remote.argv("snapshot") for s in get.steps)
    assert [s.argv[3] for s in change.steps if isinstance(s, Run) and "pip" in s.argv] == ["install", "uninstall"]

    with pytest.raises(PlanError) as err:
        snapshot.restore(profile(), snap(STATE), now(distributions=dists), kept=kept_now, lister=no_release, at=NOW)
    assert (f"nunchaku 1.0.1+torch2.6 was installed from {WHEEL}: its kept wheel {KEPT} is gone or changed, "
            "and no backend source offers that file again") in str(err.value)


@pytest.mark.parametrize(("kind", "unkept", "message"), [
    ("file", {"nunchaku": "/x.whl is gone"}, "was installed from /srv/ComfyUI/.provision/wheels/nunchaku-1.0.1"
                                             "+torch2.6-cp312-cp312-linux_x86_64.whl: the snapshot could not keep it "
                                             "(/x.whl is gone), and no backend source offers that file again"),
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
        snapshot.restore(profile(), snap(state, wheels={}, unkept=unkept), now(distributions=dists),
                         lister=no_release, at=NOW)
    assert message in str(err.value)


def test_the_venv_s_fetch_and_the_commits_come_before_any_other_change_of_the_rollback() -> None:
    """A package source that no longer serves a version, or a commit gone from its origin, must fail
    the rollback before the plugin (or anything else) moved: the venv's fetch is the first change,
    the commits' the second, the install after the checkouts."""
    nodes = {"ComfyUI-nunchaku": {**STATE["custom_nodes"]["ComfyUI-nunchaku"], "commit": V120, "tags": ["v1.2.0"]}}
    changes = snapshot.restore(profile(), snap(STATE), now(custom_nodes=nodes, distributions=moved()),
                               lister=no_release, at=NOW).changes
    assert [(c.resource, c.key) for c in changes] == [
        ("venv", STAGE), ("custom_nodes", "commits"), ("custom_nodes", NODE), ("venv", f"{ROOT}/venv")]


def test_plugin_back_to_its_commit_fetched_first_only_when_missing() -> None:
    nodes = {"ComfyUI-nunchaku": {**STATE["custom_nodes"]["ComfyUI-nunchaku"], "commit": V120, "tags": ["v1.2.0"]}}
    commits, change = snapshot.restore(profile(), snap(STATE), now(custom_nodes=nodes), at=NOW).changes
    assert change.summary == "checkout ComfyUI-nunchaku v1.2.0 -> v1.1.0" and change.action == "update"
    (fetch,) = commits.steps
    assert argv_of(fetch)[:2] == ("sh", "-c") and argv_of(fetch)[3:] == ("sh", V110, *git_argv(NODE))
    assert commits.after == {"commits": [f"{NODE} {V110[:12]}"]}
    (checkout,) = change.steps
    assert argv_of(checkout)[-4:] == ("checkout", "--quiet", "--detach", V110)


def test_the_commit_step_fetches_only_what_is_missing_and_fails_on_a_commit_its_origin_lost(tmp_path: Path) -> None:
    """Real git: a commit the checkout has is found offline (the origin is unreachable); one it lacks
    is fetched from its origin; one the origin no longer has (force-pushed away) fails the step with
    the reason, before any checkout of the rollback has moved."""
    import subprocess

    def run(*argv: str, cwd: Path = tmp_path) -> str:
        return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()

    origin, clone = tmp_path / "origin", tmp_path / "clone"
    run("git", "init", "-q", "-b", "main", str(origin))
    commits = []
    for n in (1, 2, 3):
        (origin / "f").write_text(str(n))
        run("git", "add", "f", cwd=origin)
        run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", f"c{n}", cwd=origin)
        commits.append(run("git", "rev-parse", "HEAD", cwd=origin))
        if n == 2:
            run("git", "clone", "-q", str(origin), str(clone))
    first, second, third = commits

    def step(commit: str) -> subprocess.CompletedProcess[str]:
        change = plugin.fetch_commits([(str(clone), commit)])
        assert change is not None
        (fetch,) = change.steps
        return subprocess.run(argv_of(fetch), capture_output=True, text=True, timeout=60)

    run("git", "remote", "set-url", "origin", str(tmp_path / "unreachable"), cwd=clone)
    assert step(first).returncode == 0                              # there: no fetch (it would fail)
    run("git", "remote", "set-url", "origin", str(origin), cwd=clone)
    assert step(third).returncode == 0 and run("git", "cat-file", "-t", third, cwd=clone) == "commit"
    lost = "f" * 40                                                 # force-pushed away: on neither
    failed = step(lost)
    assert failed.returncode == 1 and f"commit {lost} is neither in the checkout nor on its origin" in failed.stderr
    assert run("git", "rev-parse", "HEAD", cwd=clone) == second     # nothing moved


def test_another_users_custom_node_is_left_as_it_is_with_a_note() -> None:
    """The snapshot program never reads another user's checkout; a rollback never changes it."""
    nodes = {"ComfyUI-nunchaku": {"repo": False, "owner": 1001}}
    result = snapshot.restore(profile(), snap(STATE), now(custom_nodes=nodes), at=NOW)
    assert not [c for c in result.changes if c.key == NODE]
    assert any("ComfyUI-nunchaku is another user's checkout (uid 1001)" in n.message for n in result.notes)


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
    assert clone.action == "create" and [argv_of(s) for s in clone.steps] == [
        clone_argv("https://github.com/nunchaku-ai/ComfyUI-nunchaku.git", f"{NODE}.provision-tmp.disabled",
                   V110, NODE)]


def test_comfyui_core_goes_back_to_its_commit_but_is_never_reset() -> None:
    core = {**STATE["comfyui"], "commit": "1" * 40}
    commits, change = snapshot.restore(profile(), snap(STATE), now(comfyui=core), at=NOW).changes
    assert commits.after == {"commits": [f"{ROOT} {'c' * 12}"]}
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
    assert snapshot.choose(found, None)[0].id == "20260301-120000-000"
    assert snapshot.choose(found, "20260301-11")[0].id == "20260301-110000-000"
    with pytest.raises(PlanError, match="20260301-1 is the start of 6 snapshot ids .*: give more of it"):
        snapshot.choose(found, "20260301-1")                            # not unique: not a guess either
    with pytest.raises(PlanError, match="no snapshot 2025 on this host .its newest: 20260301-110000-000"):
        snapshot.choose(found, "2025")
    with pytest.raises(PlanError, match="nothing to roll back to"):
        snapshot.choose(HostSnapshots("h", ()), None)


def test_the_default_skips_what_a_failed_apply_left_and_says_so() -> None:
    """before apply (confirmed), the apply fails; the re-run's `before apply` records the broken
    intermediate (not confirmed), and it succeeds. The default restores the state before the first."""
    docs = [(snapshot.BEFORE_APPLY, True), (snapshot.BEFORE_APPLY, False), (snapshot.AFTER_APPLY, True)]
    found = HostSnapshots("h", tuple(replace(snap(STATE, f"20260301-1{i}0000-000", t), confirmed=c)
                                     for i, (t, c) in enumerate(docs)))
    chosen, why = snapshot.choose(found, None)
    assert chosen.id == "20260301-100000-000"
    assert why == ("the newest confirmed state an apply started from; skipped 20260301-110000-000: what a run "
                   "that did not finish left, never confirmed (--to ID restores one anyway)")
    assert snapshot.choose(found, "20260301-11")[0].id == "20260301-110000-000"     # --to: the way past
    plan = snapshot.restore(profile(), replace(chosen, verified=True), now(), why=why, at=NOW)
    assert plan.notes[0].message.startswith("restores snapshot 20260301-100000-000 (before apply, "
                                            "2026-03-01T11:00:00.000Z, profile rtx3090, confirmed, verified): the "
                                            "newest confirmed state an apply started from; skipped")
    with pytest.raises(PlanError, match="no confirmed snapshot was taken before an apply"):
        snapshot.choose(HostSnapshots("h", found.snapshots[1:2]), None)


@pytest.mark.parametrize("error", ["20260301-130000-000.json: Expecting value: line 1 column 1 (char 0)",
                                   "20260301-130000-000.json: not a snapshot of format 1"])
def test_a_default_whose_target_may_be_unreadable_stops_and_changes_nothing(error: str) -> None:
    """The newest snapshot is damaged (truncated, edited): it may be the state the rollback should
    restore, so the default does not quietly fall back to an older one; --to names one."""
    found = HostSnapshots("h", (snap(STATE, "20260301-100000-000"), snap(STATE, "20260301-110000-000",
                                                                        snapshot.AFTER_APPLY)), errors=(error,))
    with pytest.raises(PlanError) as err:
        snapshot.choose(found, None)
    assert str(err.value).startswith(f"snapshot {error} (unreadable) is newer than any this rollback could restore")
    assert "--to ID" in str(err.value)
    assert snapshot.choose(found, "20260301-10")[0].id == "20260301-100000-000"
    older = HostSnapshots("h", found.snapshots, errors=("20260228-100000-000.json: not a snapshot of format 1",))
    assert snapshot.choose(older, None)[0].id == "20260301-100000-000"        # an older damaged one is no candidate


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


def test_a_restored_host_is_verified_with_the_profile_of_the_run_that_made_its_state() -> None:
    """The failed profile requires a node the restored plugin lacks, and another workflow. The
    `before apply` snapshot restored records that failed profile (its run was about to change the
    host); the state's own profile is the one the `after apply` snapshot of the earlier run
    recorded. How ComfyUI is reached stays the profile given."""
    given = profile(verify={"required_nodes": ["NunchakuNewNode"]}, workflow={"steps": 8})
    old = {"comfyui": {"root": "/elsewhere", "port": 9999}, "verify": {"required_nodes": ["NunchakuOldNode"]},
           "workflow": {"sampler": "dpmpp_2m"}}
    made = replace(snap(STATE, "20260301-100000-000", snapshot.AFTER_APPLY), profile_data=old)
    target = replace(snap(STATE, "20260301-110000-000"), profile_data=dict(given.raw))
    later = replace(snap(STATE, "20260301-120000-000", snapshot.AFTER_APPLY), profile_data=dict(given.raw))
    moved = snap({**STATE, "comfyui_version": "0.3.65"}, "20260301-105000-000", snapshot.AFTER_APPLY)
    found = HostSnapshots("h", (made, moved, target, later))
    assert producer(found, target) == made                 # not `moved` (another state), not `later` (newer)
    checked, line = verification_profile(given, target, made)
    assert checked.verify.required_nodes == ("NunchakuOldNode",) and checked.workflow.sampler == "dpmpp_2m"
    assert checked.workflow.steps == profile().workflow.steps                 # that run's: the default
    assert (checked.comfyui.root, checked.comfyui.port) == (given.comfyui.root, given.comfyui.port)
    assert line == ("verified with the profile of the run that made snapshot 20260301-110000-000's state (rtx3090, "
                    "recorded in 20260301-100000-000: its workflow, required nodes and thresholds)")
    same, line = verification_profile(given, target, None)
    assert same is given and line == ("no snapshot records the run that made snapshot 20260301-110000-000's state: "
                                      "the restored host is verified with the profile given (rtx3090)")
    same, line = verification_profile(given, target, replace(made, profile_data=None))
    assert same is given and line.startswith("snapshot 20260301-100000-000 records no profile")
    same, line = verification_profile(given, target, replace(made, profile_data={"verify": {"warm_runs": "many"}}))
    assert same is given and line.startswith("snapshot 20260301-100000-000's profile is not valid (verify.warm_runs")


def test_the_restored_host_s_templates_are_read_from_the_given_profile_s_folder_never_a_snapshot_s(
        tmp_path: Path) -> None:
    """A snapshot is untrusted: its recorded profile once named the control machine's template
    folder, so an edited one chose which of the controller's files was rendered and sent to the
    host's ComfyUI. The templates it names are read from the folder of the profile given."""
    mine, elsewhere = tmp_path / "templates", tmp_path / "home" / ".docker"
    for folder in (mine, elsewhere):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"1": {"class_type": "X", "inputs": {}}}\n')
    (elsewhere / "only-here.json").write_text("{}\n")
    given = profile(workflow={"template_dir": str(mine)})
    target = snap(STATE, "20260301-110000-000")
    edited = {"workflow": {"template_dir": str(elsewhere), "templates": ["config.json"], "sampler": "dpmpp_2m"}}
    made = replace(snap(STATE, "20260301-100000-000", snapshot.AFTER_APPLY), profile_data=edited)
    checked, line = verification_profile(given, target, made)
    assert checked.workflow.templates == ("config.json",) and checked.workflow.sampler == "dpmpp_2m", line
    assert workflow.template_dir(checked) == mine
    only = {"workflow": {"template_dir": str(elsewhere), "templates": ["only-here.json"]}}
    same, line = verification_profile(given, target, replace(made, profile_data=only))
    assert same is given and "template 'only-here.json' not found in " in line, line


def test_the_units_provision_writes_go_back_as_the_snapshot_recorded_them() -> None:
    """A gated change added a launch argument ComfyUI rejects: the unit is rewritten as it was,
    systemd reloaded, and ComfyUI restarted; a unit added since is stopped and removed."""
    p = profile(comfyui={"root": ROOT, "service": "systemd", "unit_dir": "/etc/systemd/system"})
    good = units.render(p, units.Instance(None, "comfyui", 8188, None), units.RunAs("comfy"))
    bad = good.replace("--port 8188", "--port 8188 --no-such-flag")
    assert bad != good
    unit, extra = "/etc/systemd/system/comfyui.service", "/etc/systemd/system/comfyui-gpu1.service"
    plan = snapshot.restore(p, snap({**STATE, "units": {unit: good}}), now(units={unit: bad, extra: good}), at=NOW)
    remove, rewrite = plan.changes
    assert (rewrite.resource, rewrite.key, rewrite.before, rewrite.after) == ("service", unit, bad, good)
    assert rewrite.notify == frozenset({"restart-comfyui"})
    put, reload, enable = rewrite.steps
    assert isinstance(put, Put) and put.dest == unit and put.content == good.encode()
    assert argv_of(reload) == ("systemctl", "daemon-reload") and argv_of(enable) == ("systemctl", "enable", "comfyui.service")
    assert [argv_of(s) for s in remove.steps] == [("systemctl", "disable", "--now", "comfyui-gpu1.service"),
                                                  ("rm", "-f", extra), ("systemctl", "daemon-reload")]
    with pytest.raises(PlanError, match="names unit file '/etc/cron.d/comfyui.service', which is not one of"):
        snapshot.restore(p, snap({**STATE, "units": {"/etc/cron.d/comfyui.service": good}}), now(units={}), at=NOW)
    old = snapshot.restore(p, snap(STATE), now(units={unit: bad}), at=NOW)      # a snapshot from before units
    assert old.changes == () and "the snapshot recorded no systemd units" in old.notes[-1].message


def _edits_of(good: str) -> dict[str, str]:
    """A unit provision writes, edited so that systemd would run something as root or another user."""
    joined = good.replace("User=comfy\n", "")
    joined = joined.replace("[Service]\n", "[Service]\nEnvironment=X=1 \\\nUser=comfy\n")   # swallowed
    return {
        "no User=": good.replace("User=comfy\n", ""),
        "User=root": good.replace("User=comfy", "User=root"),
        "another user": good.replace("User=comfy", "User=deploy"),
        "a second User=": good.replace("NoNewPrivileges=yes", "NoNewPrivileges=yes\nUser=root"),
        "ExecStart with +": good.replace("ExecStart=/", "ExecStart=+/"),
        "ExecStartPre": good.replace("Restart=on-failure", "ExecStartPre=/bin/sh -c id\nRestart=on-failure"),
        "a User= line joined to the one above": joined,
        "another program's cache": good.replace("CacheDirectory=comfyui", "CacheDirectory=apt"),
        "no hardening": good.replace("NoNewPrivileges=yes\n", ""),
        "another section": good + "[Socket]\nListenStream=80\n",
        "no header": good.split("\n", 1)[1],
    }


def test_a_unit_a_snapshot_records_is_restored_only_as_provision_writes_it() -> None:
    """A rollback writes a recorded unit back as root, and systemd runs it: an edited one could run
    anything as root (or as a user who can become root). Each edit below is refused naming the unit;
    the unit as provision renders it, with other launch arguments, is restored."""
    p = profile(comfyui={"root": ROOT, "service": "systemd", "unit_dir": "/etc/systemd/system"})
    good = units.render(p, units.Instance(None, "comfyui", 8188, None), units.RunAs("comfy"))
    unit = "/etc/systemd/system/comfyui.service"
    assert units.recorded_problem(good, "comfyui.service", units.RunAs("comfy"), False) is None
    assert units.recorded_problem(good.replace("--port 8188", "--port 8188 --lowvram"), "comfyui.service",
                                  units.RunAs("comfy"), False) is None
    for what, text in _edits_of(good).items():
        assert units.recorded_problem(text, "comfyui.service", units.RunAs("comfy"), False) is not None, what
        if what == "another user":
            continue                    # whom the unit runs ComfyUI as here is known from the facts
        with pytest.raises(PlanError, match=f"unit file {unit} is not one provision writes"):
            snapshot.restore(p, snap({**STATE, "units": {unit: text}}), now(units={unit: good + "#\n"}), at=NOW)
    # With the facts: the unit must run ComfyUI as the unit does here (the owner of the root).
    from provisioner.facts.model import Facts, Login, PythonEnv

    facts = Facts(host="gpu-01", os="Ubuntu", arch="x86_64", kernel="6", system_python="/usr/bin/python3",
                  env=PythonEnv(python=PY, exists=True), gpus=(), gpu_error=None, nvcc=None, disk_path=ROOT,
                  disk_free=10**12, comfyui_version="0.3.64", login=Login(user="comfy", root_owner="comfy"))
    other = {**STATE, "units": {unit: _edits_of(good)["another user"]}}
    with pytest.raises(PlanError, match="it runs ComfyUI as deploy, not as comfy"):
        snapshot.restore(p, snap(other), now(units={unit: good + "#\n"}), facts=facts, at=NOW)
    restored = snapshot.restore(p, snap({**STATE, "units": {unit: good}}), now(units={unit: good + "#\n"}),
                                facts=facts, at=NOW)
    assert [c.key for c in restored.changes if c.resource == "service"] == [unit]
    root = units.render(p, units.Instance(None, "comfyui", 8188, None), units.RunAs("root"))
    assert units.recorded_problem(root, "comfyui.service", None, False) is not None
    assert units.recorded_problem(root, "comfyui.service", None, True) is None


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
