"""What a host keeps under `<root>/.provision/` is untrusted: the snapshot program reads it within
bounds (regular files, size caps, JSON depth), and the controller holds every stored snapshot to
the shape provision writes and every path in it to its place (facts/snapshot_check.py) before any
planner sees it. The edits below are those that once made `rollback` write, clone or delete outside
the root; each is refused naming its field."""

from __future__ import annotations

import ast
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from provisioner import remote
from provisioner.config.inventory import Host
from provisioner.config.model import build_profile
from provisioner.connection.local import LocalConnection
from provisioner.facts import snapshot_check
from provisioner.facts.snapshots import read_snapshots
from provisioner.remote import snapshot as program

ROOT = "/srv/ComfyUI"
SHA = "d" * 64
WHEEL = f"{ROOT}/.provision/wheels/nunchaku-1.0.1-cp312-cp312-linux_x86_64.whl"
DOC: dict[str, Any] = {
    "format": 1, "id": "20260301-110000-000", "time": "2026-03-01T11:00:00.000Z", "taken": "before apply",
    "profile": {"name": "p", "data": {}}, "wheels": {"nunchaku": f"wheels/{SHA}/nunchaku-1.0.1.whl"}, "unkept": {},
    "sources": {"torch": ["--index-url", "https://download.pytorch.org/whl/cu124"]},
    "state": {
        "comfyui": {"repo": True, "commit": "c" * 40, "tags": ["v0.3.64"], "remote": "https://github.com/x/ComfyUI",
                    "dirty": []},
        "comfyui_version": "0.3.64",
        "custom_nodes": {"ComfyUI-nunchaku": {"repo": True, "commit": "a" * 40, "tags": ["v1.1.0"],
                                              "remote": "https://github.com/nunchaku-ai/ComfyUI-nunchaku.git",
                                              "dirty": []}, "plain": {"repo": False}},
        "distributions": {"torch": {"name": "torch", "version": "2.6.0+cu124", "kind": "index"},
                          "nunchaku": {"name": "nunchaku", "version": "1.0.1", "kind": "file",
                                       "url": "file://" + WHEEL, "sha256": SHA}},
        "venv_error": None,
        "models": {f"{ROOT}/models/diffusion_models/dit.safetensors": {"size": 100, "sha256": "e" * 64}},
        "workflows": {f"{ROOT}/workflows": {"edit.json": {"text": "{}\n"}}, "/elsewhere/flows": None},
    },
}


def places(**profile: Any) -> snapshot_check.Places:
    data = {"comfyui": {"root": ROOT}, "workflow": {"dest": "/elsewhere/flows"}, **profile}
    return snapshot_check.Places.of(build_profile(data, name="p", file="/p/p.yaml"))


def edited(path: str | tuple[str, ...], value: Any, *, key: str | None = None) -> dict[str, Any]:
    """DOC with `value` at `path` (a/b/c, or the keys when one holds a slash), or at a `key` there."""
    doc = copy.deepcopy(DOC)
    *parents, last = path.split("/") if isinstance(path, str) else path
    node = doc
    for part in parents:
        node = node[part]
    if key is not None:
        node[last][key] = value
    else:
        node[last] = value
    return doc


def test_a_snapshot_as_provision_writes_it_passes() -> None:
    assert snapshot_check.problem(DOC, places()) is None
    # Fields a later format adds are not refused.
    assert snapshot_check.problem({**DOC, "confirmed": True, "state": {**DOC["state"], "units": {}}}, places()) is None


NODE = {"repo": True, "commit": "a" * 40, "tags": [], "remote": "https://example.com/n.git", "dirty": []}
EDITS = [
    # (what, the edited document, the field named)
    ("a custom node cloned outside", edited("state/custom_nodes", NODE, key="../../../PWNED_snapnode"),
     "state/custom_nodes"),
    ("a hidden custom node name", edited("state/custom_nodes", NODE, key=".."), "state/custom_nodes"),
    ("a workflow folder outside the root", edited("state/workflows", {"x.json": {"text": "{}"}}, key="/etc/cron.d"),
     "state/workflows//etc/cron.d"),
    ("a workflow folder through ..", edited("state/workflows", {}, key=f"{ROOT}/../../etc"),
     f"state/workflows/{ROOT}/../../etc"),
    ("a relative workflow folder", edited("state/workflows", {}, key="workflows"), "state/workflows/workflows"),
    ("a workflow written through ..", edited(("state", "workflows", f"{ROOT}/workflows"), {"text": "{}"},
                                             key="../../../etc/passwd"), "state/workflows"),
    ("a model file outside models/", edited("state/models", {"size": 1, "sha256": None}, key="/etc/shadow"),
     "state/models//etc/shadow"),
    ("a kept wheel outside the store", edited("wheels", f"wheels/{SHA}/../../../../bin/sh", key="nunchaku"),
     "wheels/nunchaku"),
    ("a kept wheel at an absolute path", edited("wheels", "/usr/bin/python3", key="nunchaku"), "wheels/nunchaku"),
    ("a wheel put back outside the wheel folder", edited("state/distributions/nunchaku", "file:///usr/lib/x.whl",
                                                         key="url"), "state/distributions/nunchaku/url"),
    ("a wheel put back through ..", edited("state/distributions/nunchaku",
                                           f"file://{ROOT}/.provision/wheels/../../main.py", key="url"),
     "state/distributions/nunchaku/url"),
    ("a wheel put back below the wheel folder", edited("state/distributions/nunchaku",
                                                       f"file://{ROOT}/.provision/wheels/link/n.whl", key="url"),
     "state/distributions/nunchaku/url"),
    ("an option as a package URL", edited("state/distributions", {"name": "x", "version": "1", "kind": "url",
                                                                  "url": "--index-url=http://evil"}, key="x"),
     "state/distributions/x/url"),
    ("a local path as a package URL", edited("state/distributions", {"name": "x", "version": "1", "kind": "url",
                                                                     "url": "/tmp/setup-dir"}, key="x"),
     "state/distributions/x/url"),
    ("a version with a marker", edited("state/distributions/torch", "2.6; os_name=='posix'", key="version"),
     "state/distributions/torch/version"),
    ("an option as a package name", edited("state/distributions/torch", "-rrequirements.txt", key="name"),
     "state/distributions/torch/name"),
    ("an option as an origin", edited("state/custom_nodes/ComfyUI-nunchaku", "--upload-pack=touch /tmp/x",
                                      key="remote"), "state/custom_nodes/ComfyUI-nunchaku/remote"),
    ("a remote helper as an origin", edited("state/custom_nodes/ComfyUI-nunchaku", "ext::sh -c touch% /tmp/x",
                                            key="remote"), "state/custom_nodes/ComfyUI-nunchaku/remote"),
    ("a commit that is no commit", edited("state/custom_nodes/ComfyUI-nunchaku", "HEAD --", key="commit"),
     "state/custom_nodes/ComfyUI-nunchaku/commit"),
    ("format 999", edited("format", 999), "format"),
    ("a list", [], "the top level"),
    ("an id that is no id", edited("id", "../x"), "id"),
    ("no state", {k: v for k, v in DOC.items() if k != "state"}, "the top level"),
    # The pip source arguments an index distribution is fetched again with: each was once passed to
    # `pip download` as recorded, so `--log` appended pip's log to any file the login can write,
    # `--dest` put the download anywhere, and `-r` read any file.
    ("pip's log written anywhere", edited("sources", ["--log", "/home/login/.bashrc"], key="torch"), "sources/torch"),
    ("a download put anywhere", edited("sources", ["--index-url", "https://x.example/simple", "--dest", "/etc/cron.d"],
                                       key="torch"), "sources/torch"),
    ("a requirements file read", edited("sources", ["-r", "/root/.netrc"], key="torch"), "sources/torch"),
    ("an option as an index", edited("sources", ["--index-url", "--dest=/etc"], key="torch"), "sources/torch"),
    ("a word with a space", edited("sources", ["--find-links", "/srv/w --dest /etc"], key="torch"), "sources/torch"),
    ("a secret local index", edited("sources", ["--index-url", "file:///root/secret"], key="torch"),
     "sources/torch"),
    ("a local index outside", edited("sources", ["--index-url", "file:///root/simple"], key="torch"), "sources/torch"),
    ("a local folder through ..", edited("sources", ["--find-links", f"{ROOT}/.provision/wheels/../../../root"],
                                         key="torch"), "sources/torch"),
    ("a size that is no size", edited(("state", "models", f"{ROOT}/models/diffusion_models/dit.safetensors"), -1,
                                      key="size"), "state/models"),
]


@pytest.mark.parametrize(("what", "doc", "field"), EDITS, ids=[e[0] for e in EDITS])
def test_each_edit_that_once_steered_the_rollback_is_refused_naming_its_field(what: str, doc: Any,
                                                                             field: str) -> None:
    why = snapshot_check.problem(doc, places())
    assert why is not None and why.startswith(field), (what, why)


def test_a_wheel_from_a_local_find_links_folder_is_in_its_place() -> None:
    doc = edited("state/distributions/nunchaku", "file:///srv/wheelhouse/nunchaku-1.0.1.whl", key="url")
    assert snapshot_check.problem(doc, places()) is not None
    assert snapshot_check.problem(doc, places(pip={"find_links": ["file:///srv/wheelhouse"]})) is None
    assert snapshot_check.problem(doc, places(pip={"find_links": ["/srv/wheelhouse/"]})) is None


def test_the_pip_sources_provision_records_are_in_their_place() -> None:
    """What `index_sources` records from a profile passes, an old remote mirror included (it still
    serves the old version); a local one must be the profile's own or lie in one of its folders."""
    torch = {"version": "2.6.0", "index_url": "file:///srv/torch/{flavour}", "find_links": ["/srv/tw/{flavour}"]}
    own = places(pip={"index_url": "https://pkgs.example/simple", "find_links": ["/srv/wheelhouse", "rel/wheels"]},
                 comfyui={"root": ROOT, "torch": torch})
    for args in (["--index-url", "https://old-mirror.example/whl/cu124"], ["--no-index"],
                 ["--index-url", "https://pkgs.example/simple", "--find-links", "/srv/wheelhouse",
                  "--find-links", "rel/wheels"],
                 ["--index-url", "file:///srv/torch/cu128", "--find-links", "/srv/tw/cu128"],
                 ["--no-index", "--find-links", "/srv/wheelhouse/sub"], ["--find-links", f"{ROOT}/.provision/wheels"]):
        assert snapshot_check.problem(edited("sources", args, key="torch"), own) is None, args
    # A find-links folder anywhere passes, as an index anywhere does (a torch move changes the
    # folder per CUDA build); one that is not absolute and normal, or a local index outside, does not.
    assert snapshot_check.problem(edited("sources", ["--find-links", "/srv/tw"], key="torch"), own) is None
    for args in (["--find-links", "/srv/tw/cu128/../../../root"], ["--find-links", "other/rel"],
                 ["--index-url", "file:///srv/torch"]):
        why = snapshot_check.problem(edited("sources", args, key="torch"), own)
        assert why is not None and why.startswith("sources/torch: "), (args, why)


def test_a_wheel_from_torch_s_find_links_folder_of_its_flavour_is_in_its_place() -> None:
    doc = edited("state/distributions/nunchaku", "file:///srv/tw/cu128/nunchaku-1.0.1.whl", key="url")
    own = places(comfyui={"root": ROOT, "torch": {"version": "2.6.0", "find_links": ["/srv/tw/{flavour}"]}})
    assert snapshot_check.problem(doc, own) is None
    outside = edited("state/distributions/nunchaku", "file:///srv/tw/cu128/../../x/n.whl", key="url")
    assert snapshot_check.problem(outside, own) is not None


# --- through the host program and the controller, on a real tree ----------------------------------

@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    root = tmp_path / "ComfyUI"
    (root / "workflows").mkdir(parents=True)
    (root / "workflows" / "w.json").write_text("{}\n")
    (root / ".provision" / "snapshots").mkdir(parents=True)
    return root


def host_profile(root: Path) -> Any:
    return build_profile({"comfyui": {"root": str(root), "venv": str(root / "venv")}}, name="p", file="/p/p.yaml")


def take(root: Path) -> str:
    request = remote.snapshot_request(mode="take", folder=str(root / ".provision" / "snapshots"), root=str(root),
                                      python=str(root / "venv" / "bin" / "python"),
                                      checksums=str(root / ".provision" / "checksums.json"),
                                      workflow_dirs=[str(root / "workflows")], taken="before apply", keep=5)
    proc = subprocess.run(remote.argv("snapshot", python=sys.executable), input=request, capture_output=True,
                          timeout=60, check=True)
    return json.loads(proc.stdout)["id"]


def read(root: Path) -> Any:
    return read_snapshots(LocalConnection(Host("local", transport="local")), host_profile(root), now=True)


def test_an_edited_snapshot_is_listed_as_edited_and_never_planned_from(host_root: Path, tmp_path: Path) -> None:
    first = take(host_root)
    (host_root / "workflows" / "w.json").write_text('{"1": {}}\n')
    second = take(host_root)
    path = host_root / ".provision" / "snapshots" / f"{second}.json"
    doc = json.loads(path.read_text())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for the controller")
    doc["state"]["workflows"][str(outside)] = {"x.json": {"text": "{}"}}
    path.write_text(json.dumps(doc))
    found = read(host_root)
    assert [s.id for s in found.snapshots] == [first]
    assert len(found.errors) == 1 and found.errors[0].startswith(f"{second}.json: state/workflows/{outside}: ")
    assert "edited on the host" in found.errors[0]
    # The host program did not read the folder the edited snapshot named: it is not the root's.
    assert found.now is not None and str(outside) not in found.now.workflows


@pytest.mark.parametrize("damage", ["fifo", "dev-zero", "dev-urandom", "deep", "nan-depth", "huge"])
def test_a_damaged_snapshot_file_is_an_error_line_in_bounded_time_and_memory(host_root: Path, damage: str) -> None:
    good = take(host_root)
    bad = host_root / ".provision" / "snapshots" / "20991231-235959-999.json"
    if damage == "fifo":
        os.mkfifo(bad)
    elif damage.startswith("dev-"):
        bad.symlink_to("/dev/" + damage[4:])
    elif damage == "deep":
        bad.write_text('{"format": 1, "id": "20991231-235959-999", "state": ' + "[" * 200_000 + "]" * 200_000 + "}")
    elif damage == "nan-depth":
        bad.write_text('{"format": 1, "id": "20991231-235959-999", "state": {"models": {"x": NaN}}}')
    else:
        with open(bad, "wb") as fh:
            fh.truncate(65 << 20)           # sparse: past the 64 MiB a snapshot may take
    started = time.monotonic()
    found = read(host_root)
    assert time.monotonic() - started < 30
    assert [s.id for s in found.snapshots] == [good]
    assert len(found.errors) == 1 and found.errors[0].startswith("20991231-235959-999.json: "), found.errors


def test_the_host_program_reads_a_dev_zero_snapshot_under_a_memory_cap(host_root: Path) -> None:
    # Before: the reader grew to 14 GB on a snapshot linked to /dev/zero. Now, under 256 MiB of
    # address space, it answers with the file named as unreadable.
    take(host_root)
    (host_root / ".provision" / "snapshots" / "20991231-235959-999.json").symlink_to("/dev/zero")
    (host_root / ".provision" / "checksums.json").symlink_to("/dev/zero")
    request = remote.snapshot_request(mode="read", folder=str(host_root / ".provision" / "snapshots"),
                                      root=str(host_root), python=str(host_root / "venv" / "bin" / "python"),
                                      checksums=str(host_root / ".provision" / "checksums.json"),
                                      workflow_dirs=[str(host_root / "workflows")], now=True)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (256 << 20, 256 << 20))

    proc = subprocess.run(remote.argv("snapshot", python=sys.executable), input=request, capture_output=True,
                          timeout=30, preexec_fn=cap)
    assert proc.returncode == 0, proc.stderr.decode()[-500:]
    assert any(e.startswith("20991231-235959-999.json:") for e in json.loads(proc.stdout)["errors"])


def test_a_fifo_or_a_link_in_a_workflow_folder_is_left_out_unread(host_root: Path, tmp_path: Path) -> None:
    os.mkfifo(host_root / "workflows" / "pipe.json")
    (host_root / "workflows" / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "secret").write_text("s")
    (host_root / "workflows" / "link.json").symlink_to(tmp_path / "secret")
    started = time.monotonic()
    files = program.workflow_folder(str(host_root / "workflows"))
    assert time.monotonic() - started < 5 and sorted(files) == ["w.json"]


def test_the_now_state_naming_a_path_outside_is_a_plan_error(host_root: Path) -> None:
    profile = host_profile(host_root)
    bad = {"models": {"/etc/shadow": {"size": 1, "sha256": None}}}
    assert snapshot_check.state_problem(bad, snapshot_check.Places.of(profile)).startswith("state/models//etc/shadow")


def test_a_kept_wheel_is_only_a_world_readable_archive_reached_without_a_link(tmp_path: Path) -> None:
    folder = tmp_path / "snapshots"
    folder.mkdir()
    secret = tmp_path / "key.whl"
    secret.write_bytes(b"private")
    secret.chmod(0o600)
    link = tmp_path / "link.whl"
    link.symlink_to(secret)
    text = tmp_path / "notes.txt"
    text.write_text("x")
    text.chmod(0o644)
    for source, why in ((secret, "not readable by everyone"), (link, "link.whl"), (text, "not a wheel")):
        kept, reason = program.keep_wheel(str(folder), {"url": f"file://{source}", "sha256": None})
        assert kept is None and why in reason, (source, reason)
    # pip's recorded sha256 names the store's folder: one that is no sha256 is never a path.
    wheel = tmp_path / "ok-1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    wheel.chmod(0o644)
    kept, _ = program.keep_wheel(str(folder), {"url": f"file://{wheel}", "sha256": "../../../x"})
    assert kept is not None and kept.startswith("wheels/") and ".." not in kept
    assert not list(folder.rglob("*.whl")) or all(folder in p.parents for p in folder.rglob("*.whl"))


# --- the reading helpers of the host programs ------------------------------------------------------

HELPERS = ("open_regular", "read_capped", "_no_constant", "_finite", "loads_bounded")


def _defs(program_name: str) -> dict[str, str]:
    tree = ast.parse(remote.source(program_name))
    found = {n.name: ast.dump(n) for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in HELPERS}
    found.update({t.id: ast.dump(n.value) for n in tree.body if isinstance(n, ast.Assign)
                  for t in n.targets if isinstance(t, ast.Name) and t.id in ("JSON_DEPTH", "_JSON_TOKENS")})
    return found


def test_the_host_programs_that_read_host_files_share_one_reading_block() -> None:
    # Each program is sent alone, so the block is copied; the copies must not drift.
    copies = {name: _defs(name) for name in ("facts", "fetch", "snapshot")}
    assert all(len(c) == len(HELPERS) + 2 for c in copies.values()), {k: sorted(v) for k, v in copies.items()}
    assert copies["facts"] == copies["fetch"] == copies["snapshot"]


def test_the_reading_block_refuses_what_is_no_regular_file_and_json_too_deep(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link").symlink_to("/dev/zero")
    (tmp_path / "file").write_text('{"a": [1]}')
    for path, follow in ((tmp_path / "pipe", True), ("/dev/zero", True), (tmp_path / "link", True)):
        with pytest.raises(ValueError, match="not a regular file"):
            program.read_capped(str(path), 100, follow)
    with pytest.raises(ValueError, match="is a link"):
        program.read_capped(str(tmp_path / "link"), 100, follow=False)
    with pytest.raises(ValueError, match="more than 5 bytes"):
        program.read_capped(str(tmp_path / "file"), 5)
    assert program.loads_bounded(program.read_capped(str(tmp_path / "file"), 100)) == {"a": [1]}
    with pytest.raises(ValueError, match="nested deeper than 64"):
        program.loads_bounded("[" * 65 + "]" * 65)
    assert program.loads_bounded('["[[[[[[", "\\"["]') == ["[[[[[[", '"[']
    for text in ('{"a": NaN}', "[Infinity]", "[1e999]"):
        with pytest.raises(ValueError):
            program.loads_bounded(text)


def test_the_lock_program_refuses_a_fifo_and_still_names_the_holder(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    started = time.monotonic()
    proc = subprocess.run(remote.argv("lock", str(tmp_path / "fifo"), "5", "me", python=sys.executable),
                          input=b"", capture_output=True, timeout=10)
    assert proc.returncode == 2 and b"not a regular file" in proc.stderr and time.monotonic() - started < 5
    lock = str(tmp_path / "lock")
    holder = subprocess.Popen(remote.argv("lock", lock, "5", "apply by alice", python=sys.executable),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b'locked ""\n'
        busy = subprocess.run(remote.argv("lock", lock, "0.3", "bob", python=sys.executable), input=b"",
                              capture_output=True, timeout=10)
        assert busy.returncode == 75 and busy.stdout.decode().splitlines()[-1] == "busy apply by alice"
    finally:
        holder.communicate(b"", timeout=10)


def test_a_snapshots_folder_linked_out_of_the_root_is_refused_and_nothing_is_written_there(
        host_root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = host_root / ".provision" / "snapshots"
    folder.rmdir()
    folder.symlink_to(elsewhere)
    for mode, fields in (("take", {"taken": "before apply", "keep": 1}), ("read", {"now": True})):
        request = remote.snapshot_request(mode=mode, folder=str(folder), root=str(host_root),
                                          python=str(host_root / "venv" / "bin" / "python"),
                                          checksums=str(host_root / ".provision" / "checksums.json"),
                                          workflow_dirs=[str(host_root / "workflows")], **fields)
        proc = subprocess.run(remote.argv("snapshot", python=sys.executable), input=request, capture_output=True,
                              timeout=60)
        assert proc.returncode == 1 and b"outside" in proc.stderr, proc.stderr
    assert list(elsewhere.iterdir()) == []
    folder.unlink()
    folder.mkdir()
    (folder / "wheels").symlink_to(elsewhere)          # the kept wheels' store led away instead
    proc = subprocess.run(remote.argv("snapshot", python=sys.executable), input=remote.snapshot_request(
        mode="take", folder=str(folder), root=str(host_root), python=str(host_root / "venv" / "bin" / "python"),
        checksums="", workflow_dirs=[], taken="before apply", keep=1), capture_output=True, timeout=60)
    assert proc.returncode == 1 and b"outside" in proc.stderr and list(elsewhere.iterdir()) == []


def test_the_lock_program_refuses_a_provision_folder_that_is_a_link(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / ".provision").symlink_to(tmp_path / "elsewhere")
    proc = subprocess.run(remote.argv("lock", str(tmp_path / ".provision" / "lock"), "5", "me", python=sys.executable),
                          input=b"", capture_output=True, timeout=10)
    assert proc.returncode == 2 and b"is a link" in proc.stderr and list((tmp_path / "elsewhere").iterdir()) == []
