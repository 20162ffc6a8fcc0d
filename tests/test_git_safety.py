"""Git never runs what a checkout configures: real checkouts planted with a `core.fsmonitor` that
touches a canary file, a post-checkout hook, an `ext::` origin, read by the real facts and snapshot
programs and changed by the steps' own git argv (remote.git_argv). The canary never appears.

A checkout of another user's (tests run as root: `nobody` owns it) is not read at all: the answer
says whose it is."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from provisioner import remote
from provisioner.config.model import build_profile
from provisioner.facts.gather import base_probe, build_request, facts_argv
from provisioner.facts.snapshots import parse_state

PYTHON = shutil.which("python3") or sys.executable
PLAIN_GIT = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def _git(where: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(where), *args],
                          env=PLAIN_GIT, check=True, capture_output=True, text=True).stdout


def trapped_checkout(path: Path, canary: Path) -> Path:
    """A checkout whose own configuration runs `touch CANARY` through every door git has."""
    path.mkdir(parents=True)
    _git(path, "init", "-q", "-b", "main")
    (path / "a.py").write_text("x = 1\n")
    _git(path, "add", "a.py")
    _git(path, "commit", "-qm", "one")
    _git(path, "tag", "v1.0.0")
    _git(path, "remote", "add", "origin", f"ext::sh -c touch% {canary}")
    touch = f"sh -c 'touch {canary}'"
    _git(path, "config", "core.fsmonitor", touch)
    _git(path, "config", "core.sshCommand", touch)
    hooks = path / ".git" / "hooks"
    for hook in ("post-checkout", "pre-auto-gc", "reference-transaction"):
        (hooks / hook).write_text(f"#!/bin/sh\ntouch {canary}\n")
        (hooks / hook).chmod(0o755)
    (path / "a.py").write_text("x = 2\n")           # dirty: `git status` has work to do
    return path


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    return tmp_path / "CANARY"


def test_the_trap_is_real_plain_git_status_fires_it(tmp_path: Path, canary: Path) -> None:
    """Without provision's argv, `git status` in the trapped checkout runs the fsmonitor command."""
    co = trapped_checkout(tmp_path / "node", canary)
    subprocess.run(["git", "-C", str(co), "status", "--porcelain"], env=PLAIN_GIT, capture_output=True)
    assert canary.exists()


def facts_for(root: Path, *paths: Path) -> dict:
    profile = build_profile({"comfyui": {"root": str(root)}}, name="t", file="/p/t.yaml")
    request = build_request(profile, base_probe(profile))
    request["git"] = [str(p) for p in paths]
    request["show"] = [[str(p), "refs/tags/v1.0.0:a.py"] for p in paths]
    request["remote_tags"] = [[str(p), "ext::sh -c touch% " + str(root / "CANARY2"), "v9"] for p in paths]
    out = subprocess.run(facts_argv(), input=json.dumps(request),
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)


def test_the_facts_program_reads_its_own_users_checkout_without_running_its_configuration(
        tmp_path: Path, canary: Path) -> None:
    co = trapped_checkout(tmp_path / "ComfyUI" / "custom_nodes" / "node", canary)
    answer = facts_for(tmp_path / "ComfyUI", co)
    got = answer["git"][str(co)]
    assert got["is_repo"] and got["tags"] == ["v1.0.0"] and got["dirty"] == ["a.py"], got
    assert got["remote"].startswith("ext::")
    assert answer["show"] == [[str(co), "refs/tags/v1.0.0:a.py", "x = 1\n"]]
    assert "error" in answer["remote_tags"][0][3]          # protocol.ext.allow=never: refused, not run
    assert not canary.exists() and not (tmp_path / "ComfyUI" / "CANARY2").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a checkout to another user")
def test_another_users_checkout_is_not_read_and_the_answer_says_whose(tmp_path: Path, canary: Path) -> None:
    co = trapped_checkout(tmp_path / "ComfyUI" / "custom_nodes" / "node", canary)
    subprocess.run(["chown", "-R", "nobody:", str(co)], check=True)
    answer = facts_for(tmp_path / "ComfyUI", co)
    got = answer["git"][str(co)]
    assert got["foreign"] and not got["is_repo"], got
    assert got["error"].startswith(f"{co} is owned by nobody (uid ") and "not by root (uid 0)" in got["error"]
    assert answer["show"] == [[str(co), "refs/tags/v1.0.0:a.py", None]]
    assert not canary.exists()

    # The snapshot program records whose it is, and reads nothing of it either.
    request = remote.snapshot_request(mode="read", folder=str(tmp_path / "snaps"), root=str(tmp_path / "ComfyUI"),
                                      python=str(tmp_path / "no-venv" / "python"), checksums="", workflow_dirs=[],
                                      now=True)
    proc = subprocess.run(remote.argv("snapshot", python=PYTHON), input=request, capture_output=True, timeout=120)
    state = parse_state(json.loads(proc.stdout)["now"])
    node = state.custom_nodes["node"]
    assert node is not None and not node.repo and node.owner == co.stat().st_uid != 0
    assert not canary.exists()


def test_the_snapshot_program_reads_its_own_users_checkout_without_running_its_configuration(
        tmp_path: Path, canary: Path) -> None:
    co = trapped_checkout(tmp_path / "ComfyUI" / "custom_nodes" / "node", canary)
    request = remote.snapshot_request(mode="take", folder=str(tmp_path / "ComfyUI" / ".provision" / "snapshots"),
                                      root=str(tmp_path / "ComfyUI"),
                                      python=str(tmp_path / "no-venv" / "python"), checksums="", workflow_dirs=[])
    proc = subprocess.run(remote.argv("snapshot", python=PYTHON), input=request, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (snap,) = (tmp_path / "ComfyUI" / ".provision" / "snapshots").glob("*.json")
    node = parse_state(json.loads(snap.read_text())["state"]).custom_nodes["node"]
    assert node is not None and node.repo and node.tags == ("v1.0.0",) and node.dirty == ("a.py",)
    assert not canary.exists()


def test_the_steps_git_checks_out_and_fetches_without_hooks_or_the_checkouts_ssh_command(
        tmp_path: Path, canary: Path) -> None:
    co = trapped_checkout(tmp_path / "node", canary)
    run = lambda *args: subprocess.run(remote.git_argv(str(co), *args), capture_output=True, text=True)  # noqa: E731
    stashed = run("-c", "user.name=provision", "-c", "user.email=provision@localhost", "stash", "--quiet")
    assert stashed.returncode == 0, stashed.stderr      # what a forced plan does to a dirty checkout
    assert run("checkout", "--quiet", "--detach", "v1.0.0").returncode == 0
    run("remote", "set-url", "origin", "ssh://example.invalid/x.git")
    fetched = run("fetch", "--quiet", "origin")
    assert fetched.returncode != 0                         # BatchMode ssh to nowhere, not the checkout's command
    assert not canary.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a checkout to another user")
def test_apply_history_and_rollback_never_fire_a_custom_nodes_fsmonitor(tmp_path: Path) -> None:
    """Through the real CLI over real sshd: two custom nodes planted with the trap, one of provision's
    login (root) and one of another user (nobody). apply, history and rollback read the host's
    checkouts again and again (facts, snapshots before and after); the canary never appears."""
    from lab import open_lab

    canary = tmp_path / "CANARY"
    with open_lab(tmp_path / "lab", model_bytes=1 << 20) as lab:
        (host,) = lab.add(1)
        nodes = host.comfy / "custom_nodes"
        trapped_checkout(nodes / "own-node", canary)
        foreign = trapped_checkout(nodes / "their-node", canary)
        subprocess.run(["chown", "-R", "nobody:", str(foreign)], check=True)
        code, out = lab.run("apply", "--limit", host.name, "--no-verify")
        assert code == 2, out
        assert not canary.exists(), "apply fired the trap"
        # The own node's origin is `ext::sh -c ...`: the snapshot check refuses to plan from a state
        # holding it (a one-line failure naming the field), and nothing of it runs either way.
        refused = "state/custom_nodes/own-node/remote: 'ext::sh -c touch"
        code, out = lab.run("history", "--limit", host.name)
        assert code == 1 and refused in out, out
        assert not canary.exists(), "history fired the trap"
        code, out = lab.run("rollback", "--limit", host.name, "--check")
        assert code == 1 and refused in out, out
        assert not canary.exists(), "rollback fired the trap"
        # With that origin made plain, history reads both nodes again (the snapshots that recorded the
        # ext:: origin stay refused, so a rollback to them is too); nothing fired at any point.
        subprocess.run(["git", "-C", str(nodes / "own-node"), "-c", "core.fsmonitor=false", "-c",
                        "core.hooksPath=/dev/null", "remote", "set-url", "origin", "https://example.invalid/x.git"],
                       check=True)
        code, out = lab.run("history", "--limit", host.name)
        assert code == 0, out
        code, out = lab.run("rollback", "--limit", host.name, "--check")
        assert code == 1 and "(edited on the host? it is not used)" in out, out
        assert not canary.exists(), "rollback fired the trap"
