"""What provision reads back is untrusted: a host's `.provision/` (snapshots damaged or edited by
whatever runs as ComfyUI's user, FIFOs and devices in their place), old reports, and profile values
at and past their bounds. Each case runs the real CLI, in a process of its own bounded in time and
memory (`bounded.provision`), against sandbox hosts behind real sshd servers; each prints its figures
(docs/reliability.md, "Untrusted input")."""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from bounded import MEMORY, Outcome, Tally, provision
from lab import Lab, LabHost, open_lab, tree_state
from test_e2e_rollback import add_upgrade_wheels, history
from test_kill_points import upgraded

from provisioner.config.schema import schema

pytestmark = pytest.mark.reliability

CLI_SECONDS = 60.0             # a command against a host: connects, reads its snapshots
BROKEN = ("Traceback", "internal error")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-untrusted"), model_bytes=1 << 20) as lab:
        add_upgrade_wheels(lab)
        yield lab


def cli(lab: Lab, verb: str, *args: str, timeout: float = CLI_SECONDS, memory: int = MEMORY) -> Outcome:
    return provision([verb, str(lab.profile), *lab.ssh_args(), "--no-color", *args], lab.root, timeout, memory)


def figure(text: str) -> None:
    print(f"\nuntrusted input: {text}")


# -- the snapshots folder: damage and edits -----------------------------------------------------------

def damage(kind: str) -> Callable[[Path, dict[str, Any]], None]:
    """A way to break the snapshot file at `path` (its document `doc`)."""
    def apply(path: Path, doc: dict[str, Any]) -> None:
        path.unlink()
        if kind == "truncated":
            path.write_text(json.dumps(doc)[:200])
        elif kind == "empty":
            path.write_text("")
        elif kind == "random bytes":
            path.write_bytes(os.urandom(4096))
        elif kind == "a list":
            path.write_text("[]")
        elif kind == "format 999":
            path.write_text(json.dumps({**doc, "format": 999}))
        elif kind == "another id":
            path.write_text(json.dumps({**doc, "id": "20000101-000000-000"}))
        elif kind == "a FIFO":
            os.mkfifo(path)
        elif kind == "a link to /dev/zero":
            path.symlink_to("/dev/zero")
        elif kind == "a link to /dev/urandom":
            path.symlink_to("/dev/urandom")
        elif kind == "200000 levels deep":
            path.write_text('{"format": 1, "id": "%s", "state": %s}' % (doc["id"], "[" * 200_000 + "]" * 200_000))
        elif kind == "NaN":
            path.write_text(json.dumps(doc).replace('"size": ', '"size": NaN, "was": ', 1))
        elif kind == "a folder":
            path.mkdir()
    return apply


DAMAGE = ["truncated", "empty", "random bytes", "a list", "format 999", "another id", "a FIFO",
          "a link to /dev/zero", "a link to /dev/urandom", "200000 levels deep", "NaN", "a folder"]


def edits(host: LabHost, outside: Path) -> dict[str, Callable[[dict[str, Any]], None]]:
    """The edits that once made a rollback write, clone or delete outside the root (issue 28)."""
    root = host.comfy

    def workflow_folder_outside(doc: dict[str, Any]) -> None:
        doc["state"]["workflows"][str(outside / "flows")] = {"keep.json": {"text": "{}"}}

    def workflow_through_dotdot(doc: dict[str, Any]) -> None:
        folder = next(iter(doc["state"]["workflows"]))
        (doc["state"]["workflows"][folder] or {})["../../../../" + str(outside.relative_to("/")) + "/w.json"] = \
            {"text": "PWNED"}

    def node_through_dotdot(doc: dict[str, Any]) -> None:
        doc["state"]["custom_nodes"]["../../../PWNED_snapnode"] = {
            "repo": True, "commit": "a" * 40, "tags": [], "remote": str(root / "custom_nodes" / "ComfyUI-nunchaku"),
            "dirty": []}

    def wheel_anywhere(doc: dict[str, Any]) -> None:
        for key, dist in (doc["state"]["distributions"] or {}).items():
            if key in doc["wheels"]:
                dist["url"] = f"file://{outside}/kept.whl"

    def kept_wheel_outside(doc: dict[str, Any]) -> None:
        for key in doc["wheels"]:
            doc["wheels"][key] = "wheels/" + "a" * 64 + "/../../../../../../../" + str(outside.relative_to("/"))

    def model_outside(doc: dict[str, Any]) -> None:
        doc["state"]["models"][str(outside / "model.safetensors")] = {"size": 1, "sha256": None}

    def remote_helper(doc: dict[str, Any]) -> None:
        node = doc["state"]["custom_nodes"]["ComfyUI-nunchaku"]
        node["remote"], node["commit"] = f"ext::sh -c touch% {outside}/ext", "b" * 40

    def pip_options(doc: dict[str, Any]) -> None:
        # What `pip download` got as written before the sources were checked (found by an audit).
        sources = doc.setdefault("sources", {})
        for key in [*sources] or ["torch"]:
            sources[key] = ["--log", str(outside / "pip.log"), "--dest", str(outside), "--no-index"]

    return {"a workflow folder outside the root": workflow_folder_outside,
            "a workflow through ..": workflow_through_dotdot, "a custom node through ..": node_through_dotdot,
            "a wheel put back outside": wheel_anywhere, "a kept wheel outside the store": kept_wheel_outside,
            "a model outside models/": model_outside, "an ext:: origin": remote_helper,
            "pip options in the sources": pip_options}


def test_damaged_and_edited_snapshots_are_named_and_nothing_outside_the_root_is_touched(
        lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host, _, target = upgraded(lab)
    folder = host.comfy / ".provision" / "snapshots"
    pristine = tmp_path / "pristine"
    shutil.copytree(folder, pristine, symlinks=True)
    outside = tmp_path / "outside"
    (outside / "flows").mkdir(parents=True)
    (outside / "flows" / "mine.json").write_text("mine\n")
    before_outside = tree_state(outside)
    tally = Tally("snapshot damage and edits", bounded=False)
    slowest = 0.0

    def reset() -> Path:
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder, symlinks=True)
        return folder / f"{target}.json"

    cases: list[tuple[str, Callable[[Path], None]]] = []
    for kind in DAMAGE:
        cases.append((kind, lambda p, k=kind: damage(k)(p, json.loads(p.read_text()))))
    for name, edit in edits(host, outside).items():
        def edited(p: Path, edit: Callable[[dict[str, Any]], None] = edit) -> None:
            doc = json.loads(p.read_text())
            edit(doc)
            p.write_text(json.dumps(doc, indent=1))
        cases.append((name, edited))
    for name, make in cases:
        make(reset())
        for verb, args in (("history", ("--json",)), ("rollback", ("--check", "--no-verify")),
                           ("rollback", ("--check", "--to", target, "--no-verify"))):
            done = cli(lab, verb, "--limit", host.name, *args)
            slowest = max(slowest, done.seconds)
            ok = done.code is not None and not any(b in done.output for b in BROKEN)
            if verb == "history" and ok:
                listed = json.JSONDecoder().raw_decode(done.output[done.output.index("{"):])[0][host.name]
                ok = target not in [s["id"] for s in listed["snapshots"]] and \
                    any(e.startswith(f"{target}.json") or target in e for e in listed["errors"])
            tally.add(ok, f"{name}: {verb} {' '.join(args)} -> {done.code}: {done.output[-400:]}", done.seconds)
    # Every edit at once on the default target, then a real rollback: whatever it chooses, nothing
    # outside the root may change, and nothing named by an edit may appear.
    doc_path = reset()
    doc = json.loads(doc_path.read_text())
    for edit in edits(host, outside).values():
        edit(doc)
    doc_path.write_text(json.dumps(doc, indent=1))
    done = cli(lab, "rollback", "--limit", host.name, "--no-verify", timeout=300, memory=2 << 30)
    tally.add(done.code is not None and not any(b in done.output for b in BROKEN),
              f"rollback with every edit: {done.code}: {done.output[-400:]}", done.seconds)
    tally.add(tree_state(outside) == before_outside, f"outside changed: {tree_state(outside)}")
    tally.add(not (host.comfy.parent.parent.parent / "PWNED_snapnode").exists()
              and not list(host.comfy.parent.rglob("PWNED*")), "a PWNED node appeared")
    with capsys.disabled():
        figure(f"{tally.line()}; slowest command {slowest:.1f} s (limit {CLI_SECONDS:g} s, "
               f"{MEMORY >> 20} MiB address space)")
    assert not tally.failures, tally.failures[:5]


# -- old reports ----------------------------------------------------------------------------------------

def hostile_reports(where: Path) -> dict[str, Path]:
    where.mkdir()
    (where / "zero").symlink_to("/dev/zero")
    os.mkfifo(where / "fifo")
    def put(name: str, text: str) -> Path:
        (where / name).write_text(text)
        return where / name
    return {
        "/dev/zero": Path("/dev/zero"), "/dev/urandom": Path("/dev/urandom"), "a link to /dev/zero": where / "zero",
        "a FIFO": where / "fifo", "a folder": where,
        "200000 deep": put("deep.json", "[" * 200_000 + "]" * 200_000),
        "a list as a host name": put("list.json", json.dumps({"version": 4, "hosts": [{"host": ["a"]}]})),
        "a number as a host": put("num.json", json.dumps({"version": 4, "hosts": [7]})),
        "Infinity": put("inf.json", '{"version": 4, "hosts": [{"host": "a", "figures": {"warm_median_s": Infinity}}]}'),
        "NaN": put("nan.json", '{"version": 4, "hosts": [], "generated_at": NaN}'),
        "1e999": put("big.json", '{"version": 4, "hosts": [{"host": "a", "figures": {"x": 1e999}}]}'),
        "checks as a string": put("checks.json", json.dumps({"version": 4, "hosts": [{"host": "a", "checks": "x"}]})),
        "node sets as a list": put("sets.json", json.dumps({"version": 4, "hosts": [], "node_sets": [1]})),
        "not UTF-8": _bytes(where / "latin.json", b'{"version": 4, "\xff": 1}'),
        "65 MiB": _sparse(where / "huge.json", 65 << 20),
    }


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def test_hostile_old_reports_are_one_line_exit_3_before_any_host(lab: Lab, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (host,) = lab.add(1)
    tally = Tally("hostile old reports")
    for name, path in hostile_reports(tmp_path / "reports").items():
        done = cli(lab, "verify", "--limit", host.name, "--compare", str(path), timeout=10)
        lines = done.output.strip().splitlines()
        tally.add(done.code == 3 and len(lines) == 1 and "--compare" in lines[0]
                  and not any(b in done.output for b in BROKEN), f"--compare {name}: {done.code}: {done.output[-300:]}",
                  done.seconds)
    for name in ("a FIFO", "a link to /dev/zero"):
        report = tmp_path / ("dir-fifo" if name == "a FIFO" else "dir-zero")
        report.mkdir()
        if name == "a FIFO":
            os.mkfifo(report / "report.json")
        else:
            (report / "report.json").symlink_to("/dev/zero")
        for extra in ((), ("--promote-reference", host.name)):
            done = cli(lab, "verify", "--limit", host.name, "--report", str(report), *extra, timeout=10)
            tally.add(done.code == 3 and "move it away" in done.output and len(done.output.strip().splitlines()) == 1,
                      f"--report with {name} {extra}: {done.code}: {done.output[-300:]}", done.seconds)
    with capsys.disabled():
        figure(tally.line())
    assert not tally.failures, tally.failures


# -- numeric bounds ---------------------------------------------------------------------------------------

def _numbers(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    if isinstance(node, dict):
        kinds = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
        if {"integer", "number"} & set(kinds) and "maximum" in node:
            yield path, node
        for key, child in (node.get("properties") or {}).items():
            yield from _numbers(child, (*path, key))


def test_every_number_past_its_bound_is_refused_and_verify_at_the_bound_stays_small(
        lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """warm_runs 1e9 once passed and filled 23 GB; now every number past its maximum is exit 3 at
    its key, under the address-space limit, and a verification at warm_runs' maximum runs in it."""
    tally = Tally("numbers past their bound")
    base = {"comfyui": {"root": "/opt/ComfyUI"}, "workflow": {"template_dir": str(Path(__file__).parents[2] / "templates")}}
    keys = list(_numbers(schema("profile")))
    for path, node in keys:
        for value in [v for v in (node["maximum"] + 1, 10**18) if v > node["maximum"]]:
            data = copy.deepcopy(base)
            at = data
            for part in path[:-1]:
                at = at.setdefault(part, {})
            at[path[-1]] = value
            profile = tmp_path / "p.yaml"
            profile.write_text(yaml.safe_dump(data))
            done = provision(["validate", str(profile)], tmp_path)
            tally.add(done.code == 3 and ".".join(path) in done.output and f"{profile}:" in done.output,
                      f"{'.'.join(path)} = {value}: {done.code}: {done.output[-200:]}", done.seconds)
    tally.extra["keys"] = len(keys)
    with capsys.disabled():
        figure(tally.line())
    assert not tally.failures, tally.failures[:5]

    # At the bound: a real verification of warm_runs' maximum, in a process limited to 2 GiB of
    # address space (numpy's OpenBLAS reserves more than the 512 MiB the input cases get).
    (host,) = lab.add(1)
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code in (0, 2), out
    most = schema("profile")["properties"]["verify"]["properties"]["warm_runs"]["maximum"]
    lab.profile_extra["verify"] = {"warm_runs": most}
    lab.write()
    limit = 2 << 30
    try:
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "provisioner", "verify", str(lab.profile), *lab.ssh_args(),
                               "--no-color", "--limit", host.name, "--json"], cwd=lab.root, capture_output=True,
                              text=True, timeout=900, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
        seconds = time.monotonic() - started
    finally:
        lab.profile_extra.clear()
        lab.write()
    report = json.loads(proc.stdout[proc.stdout.index("{"):]) if "{" in proc.stdout else {}
    warm = [r for h in report.get("hosts", []) for r in h.get("runs", []) if r.get("kind") == "warm"]
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss >> 10
    with capsys.disabled():
        figure(f"verify at warm_runs {most}: exit {proc.returncode}, {len(warm)} warm runs, {seconds:.0f} s, "
               f"peak child RSS {rss} MiB (limit {limit >> 20} MiB address space)")
    assert proc.returncode == 0 and len(warm) == most, (proc.stdout + proc.stderr)[-800:]
