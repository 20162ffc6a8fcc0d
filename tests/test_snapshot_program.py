"""The host-side snapshot program, run as `python3 -c SOURCE` on a real tree: a real venv with a
wheel installed from a file, real git checkouts, a checksum cache, workflow files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from provisioner import remote
from provisioner.facts.model import Distribution, PythonEnv
from provisioner.facts.snapshots import parse_snapshot, parse_state
from provisioner.remote import snapshot as program
from provisioner.resources.snapshot import venv_known
from provisioner.sandbox.wheels import build_wheel

PYTHON = shutil.which("python3") or sys.executable      # the host's python, not the venv's


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path


@pytest.fixture
def root(tmp_path: Path, venv: Path) -> Iterator[Path]:
    """A ComfyUI root: a plugin checkout, a plain custom node folder, models, workflows, and the venv
    (with `tiny` installed from a wheel file in wheels/, as the backend is)."""
    root = tmp_path / "ComfyUI"
    node = root / "custom_nodes" / "ComfyUI-nunchaku"
    node.mkdir(parents=True)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(node)]
    subprocess.run(["git", "init", "-q", str(node)], check=True)
    (node / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    subprocess.run([*git, "tag", "v1.1.0"], check=True)
    subprocess.run([*git, "remote", "add", "origin", "https://example.com/ComfyUI-nunchaku.git"], check=True)
    (root / "custom_nodes" / "plain").mkdir()
    (root / "custom_nodes" / "old.disabled").mkdir()                    # ComfyUI skips it: so do snapshots
    (root / "models" / "vae").mkdir(parents=True)
    (root / "models" / "vae" / "v.safetensors").write_bytes(b"weights")
    (root / "models" / "vae" / "big.safetensors.part").write_bytes(b"half")
    (root / "models" / "vae" / "put_vae_here").write_bytes(b"")            # ComfyUI's placeholder: no model
    (root / "workflows").mkdir()
    (root / "workflows" / "w.json").write_text('{"1": {}}\n')
    (root / "workflows" / "bin.dat").write_bytes(b"\xff\xfe\x00")
    os.symlink(venv, root / "venv")
    wheels = root / ".provision" / "wheels"
    wheel = build_wheel(wheels, "tiny", "1.0", {"tiny/__init__.py": ""})
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--force-reinstall", "--disable-pip-version-check", str(wheel)], check=True)
    yield root
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "tiny"], check=False)


def run(root: Path, mode: str, **kw: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"taken": "before apply", "profile": {"name": "p", "data": {"a": 1}}, "keep": 5} \
        if mode == "take" else {"now": True}
    fields.update(kw)
    request = remote.snapshot_request(mode=mode, folder=str(root / ".provision" / "snapshots"), root=str(root),
                                      python=str(root / "venv" / "bin" / "python"),
                                      checksums=str(root / ".provision" / "checksums.json"),
                                      workflow_dirs=[str(root / "workflows")], **fields)
    proc = subprocess.run(remote.argv("snapshot", python=PYTHON), input=request, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def stored(root: Path) -> list[str]:
    return sorted(p.name[:-5] for p in (root / ".provision" / "snapshots").glob("*.json"))


def test_take_records_what_the_host_runs_and_keeps_the_wheel_it_was_installed_from(root: Path) -> None:
    wheel = next((root / ".provision" / "wheels").glob("tiny-*.whl"))
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    cache = {str(root / "models" / "vae" / "v.safetensors"): {
        "size": 7, "mtime_ns": (root / "models" / "vae" / "v.safetensors").stat().st_mtime_ns, "sha256": "ab" * 32}}
    (root / ".provision" / "checksums.json").write_text(json.dumps(cache))
    answer = run(root, "take")
    assert answer["reused"] is False and stored(root) == [answer["id"]] and answer["wheels"] == {}
    doc = json.loads((root / ".provision" / "snapshots" / f"{answer['id']}.json").read_text())
    assert doc["taken"] == "before apply" and doc["profile"] == {"name": "p", "data": {"a": 1}}
    snap = parse_snapshot(doc, str(root / ".provision" / "snapshots"))
    state = snap.state
    plugin = state.custom_nodes["ComfyUI-nunchaku"]
    assert plugin and plugin.repo and plugin.tags == ("v1.1.0",) and plugin.dirty == ()
    assert plugin.remote == "https://example.com/ComfyUI-nunchaku.git" and len(plugin.commit or "") == 40
    assert state.custom_nodes["plain"] is not None and not state.custom_nodes["plain"].repo
    assert set(state.custom_nodes) == {"ComfyUI-nunchaku", "plain"}
    assert state.comfyui is not None and not state.comfyui.repo
    tiny = (state.distributions or {})["tiny"]
    assert (tiny.version, tiny.kind, tiny.sha256, tiny.path) == ("1.0", "file", sha, str(wheel))
    assert (state.distributions or {})["pip"].kind == "index"
    kept = Path(snap.wheels["tiny"])
    assert kept == root / ".provision" / "snapshots" / "wheels" / sha / wheel.name and kept.read_bytes() == wheel.read_bytes()
    assert {Path(p).name: (m.size, m.sha256) for p, m in state.models.items()} == {"v.safetensors": (7, "ab" * 32)}
    files = state.workflows[str(root / "workflows")] or {}
    assert files["w.json"].text == '{"1": {}}\n' and files["bin.dat"].text is None and files["bin.dat"].size == 3

    wheel.unlink()                                           # the original goes (a later apply replaced it)
    (root / "custom_nodes" / "ComfyUI-nunchaku" / "a.py").write_text("x = 2\n")
    again = run(root, "take", taken="after apply")
    snap2 = parse_snapshot(json.loads((root / ".provision" / "snapshots" / f"{again['id']}.json").read_text()),
                           str(root / ".provision" / "snapshots"))
    assert snap2.wheels["tiny"] == snap.wheels["tiny"] and again["id"] > answer["id"]   # kept once; ids sort by time
    assert snap2.state.custom_nodes["ComfyUI-nunchaku"].dirty == ("a.py",)   # type: ignore[union-attr]


def test_the_venv_listing_the_facts_gave_is_taken_while_the_venv_keeps_its_fingerprint(root: Path) -> None:
    """The facts program's venv answer (with each direct_url) travels in the request: no interpreter
    starts in the venv while its fingerprint holds; any install since makes the program list it."""
    from provisioner.remote import facts as facts_program

    python = str(root / "venv" / "bin" / "python")
    answer = facts_program.venv(python)
    listed = [dict(d, version="9.9") if d["name"] == "tiny" else d for d in answer["info"]["distributions"]]
    known = {"fingerprint": answer["fingerprint"], "listed": listed}   # 9.9: only the request says so

    def tiny() -> Any:
        state = parse_state(run(root, "read", venv_known=known)["now"])
        return (state.distributions or {})["tiny"]
    taken = tiny()
    sha = hashlib.sha256(next((root / ".provision" / "wheels").glob("tiny-*.whl")).read_bytes()).hexdigest()
    assert (taken.version, taken.kind, taken.sha256) == ("9.9", "file", sha)     # its direct_url travelled
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall",
                    "--disable-pip-version-check", str(next((root / ".provision" / "wheels").glob("tiny-*.whl")))],
                   check=True)
    assert tiny().version == "1.0"                     # reinstalled since: the venv itself answers

    env = PythonEnv(python=python, exists=True, fingerprint="f",
                    distributions={"tiny": Distribution("tiny", "1.0", direct_url='{"url": "file:///w"}')})
    assert venv_known(env) == {"fingerprint": "f", "listed": [{"name": "tiny", "version": "1.0",
                                                                "direct_url": '{"url": "file:///w"}'}]}
    assert venv_known(replace(env, fingerprint=None)) is None and venv_known(replace(env, error="broken")) is None


def test_the_snapshot_program_fingerprints_a_venv_as_the_facts_program_does() -> None:
    # Each program is sent alone, so the function is copied; a drift would let a changed venv pass.
    import inspect

    from provisioner.remote import facts as facts_program
    assert inspect.getsource(program.venv_fingerprint) == inspect.getsource(facts_program.venv_fingerprint)
    assert program.CFG_CAP == facts_program.CFG_CAP


def test_a_wheel_changed_since_it_was_installed_is_not_kept(root: Path) -> None:
    wheel = next((root / ".provision" / "wheels").glob("tiny-*.whl"))
    wheel.write_bytes(wheel.read_bytes() + b"tampered")
    answer = run(root, "take")
    assert "changed since it was installed" in answer["wheels"]["tiny"]
    assert not list((root / ".provision" / "snapshots" / "wheels").glob("*/tiny-*.whl"))


def test_the_wheel_of_an_index_distribution_a_run_replaces_is_fetched_checked_and_kept_once(
        root: Path, tmp_path: Path) -> None:
    """`replaced`: the take fetches the wheel of each index distribution named from the source it
    came from, checks it file by file against the RECORD pip wrote, and keeps it in the store; a
    later take finds it kept and fetches nothing (the index may have dropped it by then)."""
    house = tmp_path / "index"
    build_wheel(house, "idx-dep", "2.0", {"idx_dep/__init__.py": "V = 2\n"})
    python = str(root / "venv" / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--no-index", "--disable-pip-version-check"]
    subprocess.run([*pip, "--find-links", str(house), "idx-dep==2.0"], check=True)
    sources = {"pip": ["--no-index", "--find-links", str(house)], "held": [], "held_prefix": "nvidia-", "torch": None}
    try:
        answer = run(root, "take", replaced=["idx-dep", "tiny"], sources=sources)
        assert answer["warnings"] == [] and answer["wheels"] == {}
        doc = json.loads((root / ".provision" / "snapshots" / f"{answer['id']}.json").read_text())
        assert doc["state"]["distributions"]["idx-dep"]["kind"] == "index"
        kept = root / ".provision" / "snapshots" / doc["wheels"]["idx-dep"]
        served = house / "idx_dep-2.0-py3-none-any.whl"
        assert kept.read_bytes() == served.read_bytes() and kept.parent.name == hashlib.sha256(kept.read_bytes()).hexdigest()
        assert not (root / ".provision" / "snapshots" / "wheels" / ".incoming").exists()

        served.unlink()                                      # the index drops it: kept, not fetched again
        again = run(root, "take", replaced=["idx-dep"], sources=sources)
        doc2 = json.loads((root / ".provision" / "snapshots" / f"{again['id']}.json").read_text())
        assert doc2["wheels"]["idx-dep"] == doc["wheels"]["idx-dep"] and again["warnings"] == []
    finally:
        subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "idx-dep"], check=False)


def test_a_replaced_wheel_that_cannot_be_kept_is_said_and_under_undo_required_nothing_is_written(
        root: Path, tmp_path: Path) -> None:
    """A source that serves another build under the same version (its files differ from the RECORD
    pip wrote), or none at all: the answer says the run cannot be undone; with `undo_required` the
    take fails and writes no snapshot, so the run changes nothing."""
    house, rebuilt = tmp_path / "index", tmp_path / "rebuilt"
    build_wheel(house, "idx-dep", "2.0", {"idx_dep/__init__.py": "V = 2\n"})
    build_wheel(rebuilt, "idx-dep", "2.0", {"idx_dep/__init__.py": "V = 'rebuilt'\n"})
    python = str(root / "venv" / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--disable-pip-version-check",
                    "--find-links", str(house), "idx-dep==2.0"], check=True)
    try:
        def sources(where: Path) -> dict[str, Any]:
            return {"pip": ["--no-index", "--find-links", str(where)], "held": [], "held_prefix": "nvidia-", "torch": None}
        other = run(root, "take", replaced=["idx-dep"], sources=sources(rebuilt))
        (line,) = other["warnings"]
        assert line.startswith("a rollback of this run cannot reinstall idx-dep 2.0 (the wheel its source serves is "
                               "not the one installed: its idx_dep/__init__.py differs from the installed one")
        doc = json.loads((root / ".provision" / "snapshots" / f"{other['id']}.json").read_text())
        assert "idx-dep" not in doc["wheels"] and "not the one installed" in doc["unkept"]["idx-dep"]
        assert not list((root / ".provision" / "snapshots" / "wheels").glob("*/idx_dep-*"))

        before = stored(root)
        request = remote.snapshot_request(mode="take", folder=str(root / ".provision" / "snapshots"), root=str(root),
                                          python=python, checksums="", workflow_dirs=[], taken="before apply",
                                          replaced=["idx-dep"], sources=sources(tmp_path / "empty"), undo_required=True)
        proc = subprocess.run(remote.argv("snapshot", python=PYTHON), input=request, capture_output=True, timeout=120)
        assert proc.returncode == 1 and stored(root) == before
        assert b"this change could not be undone exactly: the wheel of idx-dep 2.0" in proc.stderr
    finally:
        subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "idx-dep"], check=False)


def test_reuse_answers_the_newest_when_nothing_changed(root: Path) -> None:
    first = run(root, "take")
    same = run(root, "take", reuse=True, taken="before rollback")
    assert same == {**same, "id": first["id"], "reused": True} and stored(root) == [first["id"]]
    (root / "workflows" / "w.json").write_text("{}\n")
    other = run(root, "take", reuse=True)
    assert other["reused"] is False and stored(root) == [first["id"], other["id"]]


def test_prune_keeps_the_newest_and_the_protected_and_only_the_wheels_they_need(root: Path) -> None:
    wheels = root / ".provision" / "snapshots" / "wheels"
    oldest = run(root, "take")["id"]
    first_kept = {p.parent.name for p in wheels.glob("*/tiny-*.whl")}
    venv_python = str(root / "venv" / "bin" / "python")
    newer = build_wheel(root / ".provision" / "wheels", "tiny", "2.0", {"tiny/__init__.py": ""})
    subprocess.run([venv_python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--disable-pip-version-check", str(newer)], check=True)
    ids = [run(root, "take", keep=2)["id"] for _ in range(3)]
    assert stored(root) == ids[1:]                              # newest 2; the 1.0 wheel went with the oldest
    assert {p.parent.name for p in wheels.glob("*/tiny-*.whl")} == {hashlib.sha256(newer.read_bytes()).hexdigest()}
    assert oldest not in stored(root) and first_kept
    # A rollback protects the snapshot it restores, however old.
    fourth = run(root, "take", keep=2, protect=[ids[1]])["id"]
    assert stored(root) == [ids[1], ids[2], fourth]             # the protected one stays beyond the 2


def test_read_lists_oldest_first_reports_foreign_files_and_the_state_now(root: Path) -> None:
    a, b = run(root, "take")["id"], run(root, "take")["id"]
    folder = root / ".provision" / "snapshots"
    (folder / "20260101-000000-000.json").write_text("{not json")
    (folder / f"{a}.json.tmp").write_text("half")                   # a write that was interrupted
    answer = run(root, "read")
    assert [d["id"] for d in answer["snapshots"]] == [a, b]
    assert answer["errors"] and answer["errors"][0].startswith("20260101-000000-000.json: ")
    now = parse_state(answer["now"])
    assert now == parse_snapshot(answer["snapshots"][-1], str(folder)).state
    assert run(root, "read", now=False)["now"] is None



def test_a_take_removes_what_a_killed_take_left_but_not_a_running_ones(root: Path) -> None:
    folder = root / ".provision" / "snapshots"
    first = run(root, "take")["id"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    incoming = folder / "wheels" / ".incoming"
    incoming.mkdir(parents=True)
    left = [folder / f"{first}.json.tmp",                             # an older version's name
            folder / f"{first}.json.{dead}.tmp", incoming / f"{dead}-tiny-1.0-py3-none-any.whl"]
    running = [folder / f"{first}.json.{os.getpid()}.tmp", incoming / f"{os.getpid()}-tiny-1.0-py3-none-any.whl"]
    for path in left + running:
        path.write_bytes(b"half")
    downloads = incoming / f"{dead}-download"                   # a take killed while it kept replaced wheels
    downloads.mkdir()
    (downloads / "torch-2.6.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"half")
    second = run(root, "take")["id"]
    assert [p for p in left if p.exists()] == [] and all(p.exists() for p in running)
    assert not downloads.exists()
    assert stored(root) == [first, second] and not list(folder.glob(f"{second}.json.*"))


def test_an_unreadable_venv_is_recorded_not_fatal(root: Path) -> None:
    (root / "venv").unlink()
    answer = run(root, "take")
    doc = json.loads((root / ".provision" / "snapshots" / f"{answer['id']}.json").read_text())
    assert doc["state"]["distributions"] is None and "does not exist" in doc["state"]["venv_error"]


def test_ids_in_the_same_millisecond_do_not_collide(tmp_path: Path) -> None:
    first, ms = program.new_id(str(tmp_path), 1_772_366_400.123)
    assert first == "20260301-120000-123"
    (tmp_path / f"{first}.json").write_text("{}")
    assert program.new_id(str(tmp_path), 1_772_366_400.123)[0] == "20260301-120000-124"


def test_a_bad_request_exits_2() -> None:
    proc = subprocess.run(remote.argv("snapshot", python=PYTHON), input=b"{not json", capture_output=True, timeout=30)
    assert proc.returncode == 2 and b"bad request" in proc.stderr


def test_read_checks_the_kept_wheels_and_stage_puts_one_back_only_when_it_matches(root: Path) -> None:
    wheel = next((root / ".provision" / "wheels").glob("tiny-*.whl"))
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    folder = root / ".provision" / "snapshots"
    take = run(root, "take", sources={"pip": ["--no-index"], "held": ["torch"], "held_prefix": "nvidia-",
                                      "torch": None})
    doc = json.loads((folder / f"{take['id']}.json").read_text())
    assert doc["sources"]["pip"] == ["--no-index"] and "tiny" not in doc["sources"]    # a file install: its own record
    kept = folder / "wheels" / sha / wheel.name
    assert run(root, "read", check_wheels=True)["kept"] == {f"wheels/{sha}/{wheel.name}": sha}
    wheel.unlink()

    def stage(sha256: str) -> subprocess.CompletedProcess[bytes]:
        request = remote.stage_request(str(folder), [(str(kept), str(wheel), sha256, str(wheel.parent))])
        return subprocess.run(remote.argv("snapshot", python=PYTHON), input=request, capture_output=True, timeout=60)

    refused = stage("0" * 64)                                   # not what the snapshot recorded: nothing put back
    assert refused.returncode == 1 and b"has sha256" in refused.stderr and not wheel.exists()
    assert not list(wheel.parent.glob("*.provision-tmp"))
    assert stage(sha).returncode == 0 and hashlib.sha256(wheel.read_bytes()).hexdigest() == sha
    kept.write_bytes(b"bit rot")
    assert run(root, "read", check_wheels=True)["kept"][f"wheels/{sha}/{wheel.name}"] != sha
    outside = remote.stage_request(str(folder), [(str(root / "elsewhere.whl"), str(root / "x.whl"), sha, str(root))])
    proc = subprocess.run(remote.argv("snapshot", python=PYTHON), input=outside, capture_output=True, timeout=60)
    assert proc.returncode == 1 and b"is not in the wheel store" in proc.stderr and not (root / "x.whl").exists()


def test_stage_never_puts_a_kept_wheel_back_through_a_link_in_its_folder(root: Path, tmp_path: Path) -> None:
    """Whatever runs as ComfyUI's user can put a link in the wheel folder: a kept wheel put back
    through it would be written wherever it leads, as the login."""
    wheel = next((root / ".provision" / "wheels").glob("tiny-*.whl"))
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    folder = root / ".provision" / "snapshots"
    run(root, "take", sources={"pip": ["--no-index"], "held": [], "held_prefix": "nvidia-", "torch": None})
    kept = folder / "wheels" / sha / wheel.name
    assert kept.is_file()
    outside = tmp_path / "outside"
    outside.mkdir()
    (wheel.parent / "link").symlink_to(outside)

    def stage(dest: Path, within: Path) -> subprocess.CompletedProcess[bytes]:
        request = remote.stage_request(str(folder), [(str(kept), str(dest), sha, str(within))])
        return subprocess.run(remote.argv("snapshot", python=PYTHON), input=request, capture_output=True, timeout=60)

    proc = stage(wheel.parent / "link" / wheel.name, wheel.parent)
    assert proc.returncode == 1 and b"behind a link" in proc.stderr, proc.stderr
    proc = stage(wheel.parent / ".." / ".." / wheel.name, wheel.parent)
    assert proc.returncode == 1 and b"is not in" in proc.stderr, proc.stderr
    assert list(outside.iterdir()) == [] and not (root / wheel.name).exists()
    wheel.unlink()
    assert stage(wheel, wheel.parent).returncode == 0 and hashlib.sha256(wheel.read_bytes()).hexdigest() == sha
    # A link planted where the temporary copy goes is replaced, never written through.
    victim = outside / "victim"
    victim.write_text("mine\n")
    tmp = wheel.parent / "planted.provision-tmp"
    tmp.symlink_to(victim)
    program._copy_new(str(kept), str(tmp))
    assert victim.read_text() == "mine\n" and not tmp.is_symlink() and tmp.read_bytes() == kept.read_bytes()


def test_each_snapshot_says_whether_a_run_confirmed_its_state_and_mark_records_verification(root: Path) -> None:
    folder = root / ".provision" / "snapshots"

    def doc(ident: str) -> dict[str, Any]:
        return json.loads((folder / f"{ident}.json").read_text())

    first = run(root, "take")["id"]                                     # the host as provision found it
    assert doc(first)["confirmed"] is True
    (root / "workflows" / "w.json").write_text('{"half": "applied"}\n')  # the apply fails midway
    broken = run(root, "take")["id"]                                    # the re-run's `before apply`
    assert doc(broken)["confirmed"] is False
    after = run(root, "take", taken="after apply", reuse=True, confirmed=True)
    assert after == {"id": broken, "time": doc(broken)["time"], "reused": True, "pruned": [], "wheels": {},
                     "warnings": []}
    assert doc(broken)["confirmed"] is True                           # the re-run confirmed that very state
    (root / "workflows" / "w.json").write_text('{"1": {}}\n')            # back to the first state
    again = run(root, "take", taken="before rollback")["id"]
    assert doc(again)["confirmed"] is True                            # the last run finished
    marked = subprocess.run(remote.argv("snapshot", python=PYTHON), input=remote.mark_request(str(folder), first, True),
                            capture_output=True, timeout=60)
    assert marked.returncode == 0 and doc(first)["verified"] is True
    assert parse_snapshot(doc(first), str(folder)).verified is True
    bad = subprocess.run(remote.argv("snapshot", python=PYTHON), input=remote.mark_request(str(folder), "../x", True),
                         capture_output=True, timeout=60)
    assert bad.returncode == 1 and b"is not a snapshot id" in bad.stderr
