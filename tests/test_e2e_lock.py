"""`provision lock` and lock-driven plans over real sshd hosts: what the lock holds, two control
machines with empty caches planning the same bytes, upstream's `main` moving on the Hub stand-in,
`lock --update`, a profile edited after locking, a malformed lock, and pip's whole answer in a plan."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from lab import Lab, LabHost, open_lab

from provisioner.config import lock as lockfile
from provisioner.config.records import CACHE_ENV
from provisioner.sandbox.world import safetensors_standin

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-lock")) as lab:
        yield lab


@pytest.fixture(scope="module")
def host(lab: Lab) -> LabHost:
    (made,) = lab.add(1)
    code, out = lab.run("apply", "--no-verify")
    assert code == 2, out
    return made


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A control machine of its own: an empty cache folder (the Hub's answers, venv records)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    from provisioner.resources import hub

    hub.clear_cache()
    yield tmp_path / "cache"
    hub.clear_cache()


def lock_path(lab: Lab) -> Path:
    return lockfile.path_for(lab.profile)


def plan_json(lab: Lab, *args: str) -> tuple[int, str]:
    code, out = lab.run("plan", "--json", *args)
    start = out.index("{\n")
    _, end = json.JSONDecoder().raw_decode(out[start:])
    return code, out[start:start + end]


def test_lock_is_written_beside_the_profile_with_every_pin(lab: Lab, host: LabHost, cache: Path) -> None:
    lock_path(lab).unlink(missing_ok=True)
    code, out = lab.run("lock")
    assert code == 2, out
    assert f"wrote {lock_path(lab)}" in out
    lock = lockfile.load(lock_path(lab))
    tag = yaml.safe_load(Path(REPO_BASE).read_text())["plugin"]["tag"]
    assert lock.plugin is not None and lock.plugin.ref == tag
    assert lock.plugin.commit == subprocess.run(["git", "-C", str(host.plugin), "rev-parse", "HEAD"],
                                                capture_output=True, text=True, check=True).stdout.strip()
    assert lock.models and all(len(m.commit) == 40 and m.size > 0 for m in lock.models)
    for m in lock.models:                      # what the Hub stand-in serves at that commit
        _, files = lab.world.hub.snapshot(m.repo, m.commit)
        blob = files[m.path]
        assert len(blob.data) == m.size and m.sha256 == (blob.sha256 if blob.lfs else None)
    (env,) = lock.environments.values()
    assert env.key.startswith("sm_86 torch 2.6+cu124 cp")
    assert env.torch_family is not None and env.torch_family.versions["torch"] == "2.6.0+cu124"
    assert env.backend is not None and env.backend.name.startswith("nunchaku-1.0.1+torch2.6")
    assert env.backend.sha256 and len(env.backend.sha256) == 64
    installed = json.loads(subprocess.run([str(host.sandbox.python), "-m", "pip", "list", "--format", "json"],
                                          capture_output=True, text=True, check=True).stdout)
    versions = {d["name"].lower().replace("_", "-"): d["version"] for d in installed}
    assert env.packages["diffusers"] == versions["diffusers"]
    assert env.packages["huggingface-hub"] == versions["huggingface-hub"]
    # The plan now names the lock and has nothing to do, in one connection and one exec.
    since = host.sshd.log_size()
    code, out = lab.run("plan")
    assert code == 0, out
    assert out.strip().splitlines()[-1] == f"lock: {lock_path(lab)}"
    assert host.sshd.wait_counts(1, 1, since=since) == (1, 1)


def test_two_control_machines_with_empty_caches_plan_the_same_bytes(
        lab: Lab, host: LabHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from provisioner.resources import hub

    assert lock_path(lab).is_file()
    # A host that needs every model file again: the plan must name them from the lock alone.
    for dit in (host.comfy / "models" / "diffusion_models").iterdir():
        dit.rename(dit.with_name(dit.name + ".away"))
    try:
        plans = []
        for machine in ("one", "two"):
            monkeypatch.setenv(CACHE_ENV, str(tmp_path / machine))
            hub.clear_cache()
            code, doc = plan_json(lab)
            assert code == 2, doc
            plans.append(doc)
            assert not (tmp_path / machine / "hub.json").exists()     # the Hub was never asked
        assert plans[0] == plans[1]
        assert "download diffusion_models/" in plans[0]
    finally:
        for dit in (host.comfy / "models" / "diffusion_models").iterdir():
            dit.rename(dit.with_name(dit.name.removesuffix(".away")))
        hub.clear_cache()


def test_upstream_main_moving_changes_nothing_until_the_lock_is_updated(lab: Lab, host: LabHost, cache: Path) -> None:
    lock = lockfile.load(lock_path(lab))
    moving = [m for m in lock.models if m.revision == "main"]
    assert moving
    uploads = {m.key: reupload(m.path) for m in moving}
    for m in moving:
        lab.world.hub.reupload(m.repo, m.path, uploads[m.key])
    try:
        code, out = lab.run("plan")
        assert code == 0, out                                 # under the lock: nothing moved
        code, out = lab.run("lock", "--update", "models")
        assert code == 2, out
        for m in moving:
            new = lab.world.hub.commit_of(m.repo)
            size = len(uploads[m.key])
            assert (f"~ model {m.repo}/{m.path}@main: commit {m.commit[:12]} -> {new[:12]}, "
                    f"size {m.size} -> {size}, sha256 {m.sha256[:12]} -> ") in out
        moved = lockfile.load(lock_path(lab))
        assert moved.environments == lock.environments and moved.plugin == lock.plugin   # only models moved
        code, out = lab.run("plan")
        assert code == 2 and "replace diffusion_models/" in out, out
        code, out = lab.run("apply", "--no-verify")          # apply converges to the moved lock
        assert code == 2, out
        for m in moved.models:
            dest = host.comfy / "models" / "diffusion_models" / Path(m.path).name
            if m.revision == "main" and dest.exists():
                assert hashlib.sha256(dest.read_bytes()).hexdigest() == m.sha256
    finally:
        lockfile.write(lock)                                  # back to the lock the host had
    code, out = lab.run("apply", "--no-verify")              # the old commit still serves the old file
    assert code == 2 and lab.run("plan")[0] == 0, out


def reupload(path: str) -> bytes:
    """A new upload of a DiT file: valid, of the precision and rank its name says, other bytes."""
    precision = "fp4" if "fp4" in path else "int4"
    return safetensors_standin(4096, "re-uploaded", precision=precision, rank=128)


def test_an_explicit_lock_file_is_used_and_a_missing_one_is_bad_input(lab: Lab, host: LabHost, cache: Path,
                                                                      tmp_path: Path) -> None:
    elsewhere = tmp_path / "fleet.lock.yaml"
    elsewhere.write_bytes(lock_path(lab).read_bytes())
    code, out = lab.run("plan", "--lock", str(elsewhere))
    assert code == 0 and out.strip().splitlines()[-1] == f"lock: {elsewhere}", out
    code, out = lab.run("plan", "--lock", str(tmp_path / "none.lock.yaml"))
    assert code == 3 and "none.lock.yaml: no such lock file" in out, out


def test_locking_again_keeps_the_pins_and_a_bad_update_key_is_bad_input(lab: Lab, host: LabHost, cache: Path) -> None:
    before = lock_path(lab).read_bytes()
    code, out = lab.run("lock")                    # upstream's main moved above: the pins stay
    assert code == 0 and "up to date" in out, out
    assert lock_path(lab).read_bytes() == before
    code, out = lab.run("lock", "--update", "modles")
    assert code == 3, out
    (line,) = out.strip().splitlines()
    assert "--update modles" in line and "core, plugin, models, torch, backend, packages" in line


def test_a_profile_edited_after_locking_is_a_plan_error_naming_the_lock(lab: Lab, host: LabHost, cache: Path) -> None:
    text = lab.profile.read_text()
    try:
        lab.profile.write_text(text + "verify: {warm_runs: 3}\n")
        for verb in ("plan", "apply"):
            code, out = lab.run(verb, "--no-verify") if verb == "apply" else lab.run(verb)
            assert code == 3, out
            (line,) = out.strip().splitlines()
            assert str(lock_path(lab)) in line and f"provision lock {lab.profile}" in line
    finally:
        lab.profile.write_text(text)
    assert lab.run("plan")[0] == 0


@pytest.mark.parametrize("edit, where", [
    (lambda t: t.replace("format: 1", "format: one"), ":3:1: format:"),
    (lambda t: t.replace("size: ", "size: -", 1), "models[0].size:"),
    (lambda t: t + "extra: {}\n", "extra: unknown key"),
])
def test_a_malformed_lock_is_exit_3_located(lab: Lab, host: LabHost, cache: Path, edit, where: str) -> None:
    good = lock_path(lab).read_text()
    try:
        lock_path(lab).write_text(edit(good))
        code, out = lab.run("plan")
        assert code == 3, out
        assert f"{lock_path(lab)}{where}" in out if where.startswith(":") else where in out
        assert "Traceback" not in out
    finally:
        lock_path(lab).write_text(good)


def test_a_pin_that_moves_a_second_distribution_shows_both(lab: Lab, host: LabHost, cache: Path) -> None:
    """tokenizers 0.22.2 requires huggingface-hub <0.35: pip moves it down, and the plan says so."""
    text = lab.profile.read_text()
    saved = lock_path(lab).read_text()
    lock_path(lab).unlink()
    try:
        data = yaml.safe_load(text)
        data["packages"] = ["diffusers>=0.35", "peft>=0.17", "tokenizers==0.22.2"]
        lab.profile.write_text(yaml.safe_dump(data))
        code, doc = plan_json(lab)
        assert code == 2, doc
        (change,) = [c for c in json.loads(doc)["hosts"][0]["changes"] if c["resource"] == "packages"]
        assert change["data"]["pip"] == {"huggingface-hub": ["0.35.3", "0.34.4"], "tokenizers": [None, "0.22.2"]}
        assert change["before"]["huggingface-hub"] == "0.35.3" and change["after"]["huggingface-hub"] == "0.34.4"
        assert "pip also moves huggingface-hub 0.35.3 -> 0.34.4" in change["summary"]
        since = host.sshd.log_size()
        lab.run("plan")                            # facts, then pip's dry run of the packages change
        assert host.sshd.wait_counts(1, 2, since=since) == (1, 2)
        assert any("huggingface-hub" in line and "0.34.4" in line for line in change["diff"])
        code, out = lab.run("plan")
        assert "no lock: upstream's names" in out
    finally:
        lab.profile.write_text(text)
        lock_path(lab).write_text(saved)


REPO_BASE = str(Path(__file__).resolve().parents[1] / "profiles" / "base.yaml")
