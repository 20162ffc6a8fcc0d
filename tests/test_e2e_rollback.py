"""Snapshots, rollback and the verification-gated rollout over real sshd hosts.

"Exactly the snapshot's state" is checked three ways on the host itself: the file tree of the
ComfyUI root byte for byte (outside the venv, whose `pip freeze --all` is compared instead, the
git internals of checkouts, whose HEAD is compared instead, and provision's own `.provision/`), the
venv's `pip freeze --all`, and the plugin checkout's commit.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab import Lab, LabHost, mtimes, open_lab, tree_state
from test_e2e_apply import log_events, wait_for

from provisioner.sandbox.wheels import build_nunchaku_wheel_named, build_wheel, current_python_tag

pytestmark = pytest.mark.slow

UNDEFINED = "undefined symbol: _ZN3c104cuda20getCurrentCUDAStreamEa"   # a wheel built for another torch
FOOLED = "\n# use_additional_t_cond: Qwen-Image-Layered's, not in this release's signature (see #11408)\n"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-rollback"), model_bytes=1 << 20) as lab:
        add_upgrade_wheels(lab)
        yield lab


def add_upgrade_wheels(lab: Lab) -> None:
    """What UPGRADE's packages need beyond the lab's wheelhouse."""
    build_wheel(lab.world.wheelhouse, "sandbox-extra", "1.0", {"sandbox_extra/__init__.py": ""},
                summary="a package an upgrade adds")


@pytest.fixture(autouse=True)
def _profile_back(lab: Lab) -> Iterator[None]:
    """Each test starts from the lab's own profile."""
    lab.profile_extra.clear()
    lab.write()
    yield
    lab.profile_extra.clear()
    lab.write()


def freeze(host: LabHost) -> str:
    return subprocess.run([str(host.sandbox.python), "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
                          check=True, capture_output=True, text=True).stdout


def files(host: LabHost) -> dict[str, str]:
    return tree_state(host.comfy, skip=(".provision-sandbox", "output", "__pycache__", ".provision", "venv", ".git"))


def state(host: LabHost) -> tuple[dict[str, str], str, str]:
    """What "the snapshot's state exactly" compares: the tree, pip freeze, the plugin's commit."""
    return files(host), freeze(host), host.git("rev-parse", "HEAD")


def history(lab: Lab, host: LabHost) -> list[dict[str, Any]]:
    code, out = lab.run("history", "--limit", host.name, "--json")
    assert code == 0, out
    doc = json.loads(out[out.index("{"):])
    return doc[host.name]["snapshots"]


def report(directory: Path) -> dict[str, dict[str, Any]]:
    doc = json.loads((directory / "report.json").read_text())
    assert doc["version"] == 4
    return {h["host"]: h for h in doc["hosts"]}


def converge(lab: Lab, *hosts: LabHost) -> None:
    names = ":".join(h.name for h in hosts)
    code, out = lab.run("apply", "--limit", names)
    assert code == 2, out


def broken_backend(lab: Lab, version: str, torch_label: str) -> Path:
    """A wheelhouse holding the release's wheel for this host, built for another torch: it
    installs, and `import nunchaku` fails with an undefined symbol."""
    house = lab.root / f"broken-{version}"
    tag = current_python_tag()
    build_nunchaku_wheel_named(house, f"nunchaku-{version}+{torch_label}-{tag}-{tag}-linux_x86_64.whl",
                               import_error=UNDEFINED)
    return house


def test_a_backend_that_does_not_import_is_rolled_back_exactly(lab: Lab, tmp_path: Path) -> None:
    """nunchaku 1.0.1 -> 1.2.1 (with diffusers raised to 1.2.1's floor and a package added); the
    1.2.1 wheel does not import, so the loader never registers and the restart's readiness wait
    fails. The gate verifies, rolls the host back to the snapshot the apply took, and verifies again."""
    (host,) = lab.add(1, torch="2.8.0+cu128")
    host.pip("--find-links", str(lab.world.wheelhouse), "diffusers==0.35.2")
    converge(lab, host)
    before = state(host)
    assert "nunchaku @ file://" in before[1] and "diffusers==0.35.2" in before[1]

    lab.profile_extra.update(backend={"version": "1.2.1",
                                      "sources": [{"wheelhouse": str(broken_backend(lab, "1.2.1", "cu12.8torch2.8"))}]},
                             packages=["diffusers>=0.35", "peft>=0.17", "sandbox-extra>=1.0"])
    lab.write()
    code, out = lab.run("apply", "--limit", host.name, "--verify-gate", "--report", str(tmp_path))
    assert code == 1, out
    assert "verify gate: rolling back to snapshot" in out and UNDEFINED in out
    assert "1 host: 0 changed, 0 unchanged, 0 failed, 1 rolled back, 0 left" in out

    assert state(host) == before                                   # tree, pip freeze, plugin commit
    entry = report(tmp_path)[host.name]
    rollout = entry["rollout"]
    assert rollout["result"] == "rolled_back" and rollout["restored"] == rollout["snapshot_before"]
    assert rollout["snapshot_after"] not in (None, rollout["snapshot_before"])
    failed = {c["name"]: c for c in rollout["failed_checks"]}
    assert "nodes_registered" in failed and UNDEFINED in json.dumps(failed["nodes_registered"])
    assert all(c["passed"] for c in entry["checks"]) and entry["checks"]   # verified again: it works
    snaps = history(lab, host)
    # The failed apply took no "after apply" snapshot: the one before the rollback records what it left.
    assert [s["taken"] for s in snaps[-4:]] == ["after apply", "before apply", "before rollback", "after rollback"]
    assert snaps[-3]["changes"] == [] and snaps[-3]["id"] == rollout["snapshot_before"]
    assert snaps[-1]["id"] == rollout["snapshot_after"]
    assert any(line.startswith("~ nunchaku 1.2.1+cu12.8torch2.8") for line in snaps[-1]["changes"])
    assert "- sandbox-extra 1.0" in snaps[-1]["changes"]
    print(out)

    lab.profile_extra.clear()
    lab.write()
    code, out = lab.run("plan", "--limit", host.name)          # the old profile: nothing to do
    assert code == 0, out


def test_a_gated_torch_move_that_fails_is_rolled_back_to_exactly_the_snapshot_s_venv(lab: Lab, tmp_path: Path) -> None:
    """torch 2.6.0+cu126 -> 2.8.0+cu128 (an RTX 5090 host), and the backend wheel that follows it
    does not import. The snapshot before the move kept torch 2.6.0+cu126's and torchvision's wheels,
    fetched from the torch index (the package wheelhouse has no torch, as the real index has no
    `+cu126` build): the rollback stages them and the kept nunchaku wheel, installs them, and only
    then uninstalls what the move added."""
    (host,) = lab.add(1, gpu="rtx5090", torch="2.6.0+cu126")
    try:
        converge(lab, host)
        before = state(host)
        assert "torch==2.6.0+cu126" in before[1] and "torchaudio" not in before[1]
        lab.overlays[host.name] = {"comfyui": {**host.provision_vars()["comfyui"], "torch": {
            "version": "2.8.0", "cuda": "12.8", "index_url": None,
            "find_links": [f"{lab.world.torch_wheelhouse}/{{flavour}}"]}}}
        lab.profile_extra.update(backend={"sources": [{"wheelhouse": str(broken_backend(lab, "1.0.1", "torch2.8"))}]})
        lab.write()
        code, out = lab.run("apply", "--limit", host.name, "--verify-gate")
        assert code == 1, out
        assert "~ venv torch 2.6.0+cu126 -> 2.8.0+cu128" in out and "verify gate: rolling back to snapshot" in out
        assert ("venv: distributions as in the snapshot: nunchaku 1.0.1+torch2.8 -> 1.0.1+torch2.6, torch 2.8.0+cu128 "
                "-> 2.6.0+cu126, torchvision 0.23.0+cu128 -> 0.21.0+cu126, uninstall torchaudio 2.8.0+cu128") in out
        # torch and torchvision were kept (from the torch index) before the move: the rollback asks no index.
        assert "fetch and check 3 distribution(s) of the snapshot's venv (3 from the wheels the snapshot kept)" in out
        assert "1 rolled back" in out
        assert state(host) == before                                # tree, pip freeze --all, plugin commit
        assert not (host.comfy / ".provision" / "rollback-stage.provision-tmp").exists()
        print(out)
    finally:
        lab.overlays.pop(host.name, None)
        lab.write()


def test_after_a_failed_apply_and_a_re_run_the_default_rollback_restores_the_last_confirmed_state(lab: Lab) -> None:
    """The apply checks out v1.0.2 and then fails (a package no source has yet); the re-run's
    `before apply` snapshot records that half-applied host, which no run confirmed. The default
    rollback skips it, says so, and restores the state before the first attempt."""
    (host,) = lab.add(1)
    converge(lab, host)
    first = state(host)
    lab.profile_extra.update(plugin={"tag": "v1.0.2"}, packages=["diffusers>=0.35", "peft>=0.17", "sandbox-late>=1.0"])
    lab.write()
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 1 and "sandbox-late" in out, out
    build_wheel(lab.world.wheelhouse, "sandbox-late", "1.0", {"sandbox_late/__init__.py": ""})
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    snaps = history(lab, host)
    assert [(s["taken"], s["confirmed"]) for s in snaps[-3:]] == [
        ("before apply", True), ("before apply", False), ("after apply", True)]
    code, out = lab.run("history", "--limit", host.name)
    assert f"{snaps[-2]['id']}" in out and "not confirmed" in out

    code, out = lab.run("rollback", "--limit", host.name, "--check")
    assert code == 2, out
    assert (f"restores snapshot {snaps[-3]['id']} (before apply" in out and
            f"skipped {snaps[-2]['id']}: what a run that did not finish left, never confirmed" in out), out
    code, out = lab.run("rollback", "--limit", host.name, "--no-verify")
    assert code == 2, out
    assert state(host) == first


def test_a_gated_unit_change_comfyui_rejects_is_rolled_back_and_comfyui_runs_again(lab: Lab) -> None:
    """Under `comfyui.service: systemd` the unit is part of every snapshot: a launch argument
    ComfyUI rejects (it exits 2, `unrecognized arguments`) kills it at the restart; the gate
    rewrites the unit as the snapshot recorded it, restarts it, and ComfyUI runs and generates again."""
    (host,) = lab.add_bare(1)
    lab.overlays[host.name] = {"comfyui": {**host.provision_vars()["comfyui"], **lab.world.core_overrides()}}
    lab.write()
    try:
        assert lab.run("apply", "--limit", host.name, "--no-verify")[0] == 2
        unit = host.unit_dir / "comfyui.service"
        good, installed = unit.read_text(), freeze(host)
        lab.overlays[host.name]["comfyui"]["args"] = ["--no-such-flag"]
        lab.write()
        code, out = lab.run("apply", "--limit", host.name, "--verify-gate")
        assert code == 1, out
        assert "~ service rewrite unit comfyui" in out and "verify gate: rolling back to snapshot" in out
        assert "unrecognized arguments: --no-such-flag" in out                      # ComfyUI's own words, logged
        assert "~ service rewrite unit comfyui.service as in the snapshot" in out
        assert "1 rolled back" in out and f"{host.name} PASS generation" in out
        assert unit.read_text() == good and freeze(host) == installed
        assert host.systemctl("is-active", "comfyui").stdout.strip() == "active"
        snaps = history(lab, host)
        assert f"unit {unit} changed" in snaps[-1]["changes"]
    finally:
        lab.overlays.pop(host.name, None)
        lab.write()
        host.stop()


def test_a_kept_wheel_that_is_gone_is_fetched_again_and_checked_or_the_plan_names_it(lab: Lab) -> None:
    """The backend moves 1.0.1 -> 1.2.1 (its old wheel file removed, as an apply does), then the
    kept copy goes too (disk cleaned). `rollback --check` finds it gone when the rollback is
    planned: with no backend source offering that file, a plan error naming it and nothing
    changed; with the release source back in the profile, the file is downloaded again, checked
    against the sha256 pip recorded, and the host ends exactly as before."""
    (host,) = lab.add(1, torch="2.8.0+cu128")
    converge(lab, host)
    before = state(host)
    house, tag = lab.root / "good-1.2.1", current_python_tag()
    build_nunchaku_wheel_named(house, f"nunchaku-1.2.1+cu12.8torch2.8-{tag}-{tag}-linux_x86_64.whl")
    lab.profile_extra.update(backend={"version": "1.2.1", "sources": [{"wheelhouse": str(house)}]})
    lab.write()
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    upgraded = state(host)
    (kept,) = (host.comfy / ".provision" / "snapshots" / "wheels").glob("*/nunchaku-1.0.1+torch2.8-*.whl")
    kept.unlink()
    code, out = lab.run("rollback", "--limit", host.name, "--check")
    assert code == 1, out
    assert f"its kept wheel {kept} is gone or changed, and no backend source offers that file again" in out, out
    assert state(host) == upgraded

    lab.profile_extra.clear()
    lab.write()
    code, out = lab.run("rollback", "--limit", host.name, "--no-verify")
    assert code == 2, out
    assert "download nunchaku-1.0.1+torch2.8" in out or "nunchaku 1.2.1+cu12.8torch2.8 -> 1.0.1+torch2.8" in out, out
    assert state(host) == before


def test_a_pin_that_moves_a_second_distribution_is_undone_after_the_package_sources_dropped_what_it_replaced(
        lab: Lab, tmp_path: Path) -> None:
    """Pinning tokenizers 0.22.2 makes pip move huggingface-hub 0.35.3 -> 0.34.4 too: the plan shows
    both and says the snapshot keeps the replaced wheel; the apply keeps it before the first change.
    Then the package sources drop huggingface-hub 0.35.3, and the rollback still restores the venv
    exactly, from the kept wheel. Under the verify gate, a change whose replaced wheel no source
    serves any more is refused before anything changes."""
    (host,) = lab.add(1)
    converge(lab, host)
    before = state(host)
    assert "huggingface-hub==0.35.3" in before[1] and "tokenizers" not in before[1]
    lab.profile_extra.update(packages=["diffusers>=0.35", "peft>=0.17", "tokenizers==0.22.2"])
    lab.write()
    code, out = lab.run("plan", "--limit", host.name)
    assert code == 2, out
    assert "pip also moves huggingface-hub 0.35.3 -> 0.34.4" in out, out
    assert "before the changes, the snapshot keeps the wheels of huggingface-hub 0.35.3, which they replace" in out
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    assert "cannot reinstall" not in out
    pinned = freeze(host)
    assert "huggingface-hub==0.34.4" in pinned and "tokenizers==0.22.2" in pinned
    (kept,) = (host.comfy / ".provision" / "snapshots" / "wheels").glob("*/huggingface_hub-0.35.3-*.whl")
    print(out)

    dropped = tmp_path / "dropped"                     # the package sources no longer serve the replaced version
    dropped.mkdir()
    for wheel in lab.world.wheelhouse.glob("huggingface_hub-0.35.3-*.whl"):
        wheel.rename(dropped / wheel.name)
    try:
        lab.profile_extra.clear()
        lab.write()
        code, out = lab.run("rollback", "--limit", host.name, "--check")
        assert code == 2, out
        assert "fetch and check 1 distribution(s) of the snapshot's venv (1 from the wheels the snapshot kept)" in out
        assert "venv distributions as in the snapshot: huggingface-hub 0.34.4 -> 0.35.3, uninstall tokenizers 0.22.2" in out
        code, out = lab.run("rollback", "--limit", host.name)
        assert code == 2, out
        assert "1 host: 1 changed, 0 unchanged, 0 failed" in out, out
        assert state(host) == before                               # tree, pip freeze --all, plugin commit
        assert kept.exists()
        print(out)

        # The gate needs every replaced wheel kept: diffusers 0.36.0 is neither kept nor served any more.
        for wheel in lab.world.wheelhouse.glob("diffusers-0.36.0-*.whl"):
            wheel.rename(dropped / wheel.name)
        assert "diffusers==0.36.0" in before[1]
        lab.profile_extra.update(packages=["diffusers==0.35.2", "peft>=0.17"])
        lab.write()
        code, out = lab.run("apply", "--limit", host.name, "--verify-gate")
        assert code == 1, out
        assert "this change could not be undone exactly: the wheel of diffusers 0.36.0" in out, out
        assert "1 host: 0 changed, 0 unchanged, 1 failed" in out, out
        assert state(host) == before
        print(out)
        code, out = lab.run("apply", "--limit", host.name, "--no-verify")     # without the gate: said, then done
        assert code == 2, out
        warned = out.index("! a rollback of this run cannot reinstall diffusers 0.36.0 (")
        assert warned < out.index("packages: pip install diffusers==0.35.2") and "diffusers==0.35.2" in freeze(host)
    finally:
        for wheel in dropped.iterdir():
            wheel.rename(lab.world.wheelhouse / wheel.name)


def test_a_restored_host_is_verified_with_the_snapshot_s_own_profile(lab: Lab, tmp_path: Path) -> None:
    """The new profile requires a node the host's plugin does not have (and another sampler): the
    restart's wait fails, the gate rolls back, and the restored host is verified with what its
    snapshot's run required, so it passes instead of failing on the node it never had."""
    (host,) = lab.add(1)
    converge(lab, host)
    before = state(host)
    lab.profile_extra.update(verify={"required_nodes": ["NunchakuNewNode"]}, workflow={"sampler": "dpmpp_2m"})
    lab.write()
    code, out = lab.run("apply", "--limit", host.name, "--verify-gate", "--report", str(tmp_path))
    assert code == 1, out
    assert "verify gate: rolling back to snapshot" in out and "NunchakuNewNode" in out
    assert "verifying the restored host: verified with the profile of the run that made snapshot " in out, out
    entry = report(tmp_path)[host.name]
    assert entry["rollout"]["result"] == "rolled_back"
    assert entry["checks"] and all(c["passed"] for c in entry["checks"]), [c for c in entry["checks"] if not c["passed"]]
    assert state(host) == before


def test_canary_fails_verification_is_rolled_back_and_the_rest_are_never_contacted(lab: Lab, tmp_path: Path) -> None:
    """ComfyUI-nunchaku v1.2.0 on a 0.3.64 core whose model.py mentions use_additional_t_cond in a
    comment: the compatibility guard (a grep) lets it through, ComfyUI loads it, and its DiT loader
    fails when the first generation runs it. With --canary 1 the first host is rolled back and the
    other two are not even connected to. v1.2.0 needs backend >= 1.2.0 (ComfyUI-nunchaku#777), whose
    wheels start at torch 2.7: the hosts run torch 2.8."""
    hosts = lab.add(3, torch="2.8.0+cu128")
    for host in hosts:
        with (host.comfy / "comfy" / "ldm" / "qwen_image" / "model.py").open("a") as fh:
            fh.write(FOOLED)
    names = ":".join(h.name for h in hosts)
    converge(lab, *hosts)
    canary, *rest = hosts
    before = state(canary)
    untouched = {h.name: (tree_state(h.comfy), mtimes(h.comfy), freeze(h)) for h in rest}

    lab.profile_extra.update(plugin={"tag": "v1.2.0"}, backend={"version": "1.2.0"})
    lab.write()
    code, out = lab.run("plan", "--limit", names)
    assert code == 2 and "v1.1.0 -> v1.2.0" in out, out            # the guard cannot see through the comment
    since = {h.name: h.sshd.log_size() for h in rest}
    code, out = lab.run("apply", "--limit", names, "--verify-gate", "--canary", "1", "--report", str(tmp_path))
    assert code == 1, out
    assert "3 hosts: 0 changed, 0 unchanged, 0 failed, 1 rolled back, 2 left" in out
    for host in rest:
        assert f"{host.name}: left: {host.name}: not attempted: the verify gate stopped the rollout after " \
               f"{canary.name} was rolled back" in out

    assert state(canary) == before
    for host in rest:
        assert (tree_state(host.comfy), mtimes(host.comfy), freeze(host)) == untouched[host.name]
        assert host.sshd.count_connections(since[host.name]) == 0
    entries = report(tmp_path)
    rollout = entries[canary.name]["rollout"]
    assert rollout["result"] == "rolled_back"
    # console, report.json and report.html agree: a status of its own, the reason once, in words
    assert entries[canary.name]["status"] == "rolled_back"
    assert rollout["reason"].startswith(f"rolled back to {rollout['restored']}, restored host verified: ")
    assert entries[canary.name]["failures"] == [rollout["reason"]]
    assert re.search(rf"│ {canary.name} │ rolled\b", out), out          # the verification table, not "passed"
    assert f"{canary.name}: rolled back to {rollout['restored']}, restored host verified: " in out
    failed = {c["name"]: c for c in rollout["failed_checks"]}
    assert "unexpected keyword argument 'use_additional_t_cond'" in failed["comfyui_ready"]["detail"]
    assert all(c["passed"] for c in entries[canary.name]["checks"])
    for host in rest:
        assert entries[host.name]["status"] == "left" and entries[host.name]["rollout"]["result"] == "left"
        assert f"after {canary.name} was rolled back" in entries[host.name]["rollout"]["reason"]
    junit = (tmp_path / "junit.xml").read_text()
    assert 'type="rolled_back"' in junit and junit.count("<skipped") == 2


def test_the_canary_batch_is_made_of_hosts_the_change_reaches(lab: Lab) -> None:
    """The first host already runs v1.2.0 (applied alone, without the gate): it would test nothing.
    The canary is the first host whose plan changes something; it fails, is rolled back, and the
    rollout stops before the rest."""
    hosts = lab.add(3, torch="2.8.0+cu128")      # backend 1.2.0, which v1.2.0 needs, starts at torch 2.7
    for host in hosts:
        with (host.comfy / "comfy" / "ldm" / "qwen_image" / "model.py").open("a") as fh:
            fh.write(FOOLED)
    converge(lab, *hosts)
    done, canary, last = hosts
    lab.profile_extra.update(plugin={"tag": "v1.2.0"}, backend={"version": "1.2.0"})
    lab.write()
    assert lab.run("apply", "--limit", done.name, "--no-verify")[0] == 2
    after = state(done)
    names = ":".join(h.name for h in hosts)
    code, out = lab.run("apply", "--limit", names, "--verify-gate", "--canary", "1")
    assert code == 1, out
    assert "3 hosts: 0 changed, 0 unchanged, 0 failed, 1 rolled back, 2 left" in out, out
    assert f"{canary.name} verify gate: rolling back to snapshot" in out
    for host in (done, last):
        assert f"{host.name}: left: {host.name}: not attempted: the verify gate stopped the rollout after " \
               f"{canary.name} was rolled back" in out
    assert state(done) == after


UPGRADE = {"plugin": {"tag": "v1.0.2"}, "workflow": {"sampler": "dpmpp_2m"},
           "packages": ["diffusers>=0.35", "peft>=0.17", "sandbox-extra>=1.0"]}


def test_rollback_restores_the_last_apply_or_an_older_snapshot(lab: Lab, tmp_path: Path) -> None:
    (host,) = lab.add(1)
    converge(lab, host)
    first = state(host)
    lab.profile_extra.update(UPGRADE)
    lab.write()
    assert lab.run("apply", "--limit", host.name, "--no-verify")[0] == 2
    second = state(host)
    lab.profile_extra.update(workflow={"sampler": "dpmpp_2m", "steps": 6}, plugin={"tag": "v1.1.0"})
    lab.write()
    assert lab.run("apply", "--limit", host.name, "--no-verify")[0] == 2
    third = state(host)
    assert len({json.dumps(s, sort_keys=True) for s in (first, second, third)}) == 3
    snaps = history(lab, host)
    assert [s["taken"] for s in snaps] == ["before apply", "after apply"] * 3
    older = snaps[1]["id"]                      # after the first apply: two applies ago
    ids = [s["id"] for s in snaps]
    short = next(older[:n] for n in range(8, len(older)) if sum(i.startswith(older[:n]) for i in ids) == 1)

    code, out = lab.run("rollback", "--limit", host.name, "--to", short, "--check")
    assert code == 2 and "uninstall sandbox-extra 1.0" in out and '-      "sampler_name": "dpmpp_2m",' in out, out
    assert '+      "sampler_name": "euler",' in out and "checkout ComfyUI-nunchaku" not in out   # v1.1.0 both
    assert state(host) == third                                    # --check changes nothing
    code, out = lab.run("rollback", "--limit", host.name, "--to", short, "--report", str(tmp_path))
    assert code == 2, out
    assert state(host) == first
    rollout = report(tmp_path)[host.name]["rollout"]
    assert rollout["result"] == "changed" and report(tmp_path)[host.name]["status"] == "passed"
    assert lab.run("rollback", "--limit", host.name, "--to", older, "--check")[0] == 0

    # Without --to: the state the last apply started from (the second), and again: nothing more.
    code, out = lab.run("rollback", "--limit", host.name, "--no-verify")
    assert code == 2 and f"restores snapshot {snaps[4]['id']} (before apply" in out, out
    assert state(host) == second
    code, out = lab.run("rollback", "--limit", host.name, "--no-verify")
    assert code == 0 and "up to date" in out, out

    since = host.sshd.log_size()
    code, out = lab.run("history", "--limit", host.name)
    assert code == 0 and "now: as the newest snapshot" in out, out
    assert host.sshd.wait_counts(1, 1, since=since) == (1, 1), host.sshd.log_since(since)   # one connection, one exec
    assert "custom node ComfyUI-nunchaku: v1.1.0 -> v1.0.2" in out and "+ sandbox-extra 1.0" in out
    code, out = lab.run("rollback", "--limit", host.name, "--to", "2001", "--check")
    assert code == 1 and "no snapshot 2001 on this host" in out, out


@pytest.mark.parametrize("point", ["prelude", "custom_nodes", "venv", "workflow"])
def test_killed_rollback_converges_when_run_again(lab: Lab, tmp_path: Path, point: str) -> None:
    (host,) = lab.add(1)
    converge(lab, host)
    before = state(host)
    lab.profile_extra.update(UPGRADE)
    lab.write()
    assert lab.run("apply", "--limit", host.name, "--no-verify")[0] == 2
    target = history(lab, host)[-2]["id"]                        # taken before that apply
    proc = lab.spawn("rollback", "--limit", host.name, "--to", target, "--no-verify", log_dir=tmp_path)
    try:
        wait_for(lambda: any(e["event"] == point if point == "prelude" else
                             e["event"] == "change" and e["resource"] == point for e in log_events(tmp_path, host)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # What a workflow upload killed halfway leaves (connection/ssh.py's temporary sibling).
    (host.comfy / "workflows" / ".qwen-image-lightning.json.1a2b3c4d.provision-tmp").write_text('{"1": ')
    code, out = lab.run("rollback", "--limit", host.name, "--to", target, "--lock-timeout", "20", "--no-verify")
    assert code == 2, out
    assert state(host) == before
    assert lab.run("rollback", "--limit", host.name, "--to", target, "--check")[0] == 0
    # The restart the killed rollback owed was performed, even when its changes were all done
    # (killed at the workflows, the last of them: the re-run had nothing left to change).
    assert not list((host.comfy / ".provision" / "owed").glob("*"))
    code, out = lab.run("verify", "--limit", host.name)
    assert code == 0, out


def test_no_snapshot_no_change(lab: Lab) -> None:
    """A host where the snapshot cannot be written is not changed at all: the prelude runs before
    the first change, and an apply whose prelude failed stops there."""
    (host,) = lab.add(1)
    converge(lab, host)
    before = state(host)
    folder = host.comfy / ".provision" / "snapshots"
    moved = folder.with_name("snapshots.moved")
    folder.rename(moved)
    folder.write_text("not a folder")
    lab.profile_extra.update(UPGRADE)
    lab.write()
    try:
        code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    finally:
        folder.unlink()
        moved.rename(folder)
    assert code == 1 and "before the changes: " in out and "snapshot what the host runs (before apply)" in out, out
    assert "1 host: 0 changed, 0 unchanged, 1 failed" in out
    assert state(host) == before
