"""Bounded retention on a host (resources/retention.py): wheels the backend no longer uses, plugin
backups beyond the newest three, and the temporary siblings killed uploads and clones leave, each
removed by a change the plan shows. The JSON-lines logs of the control machine: test_progress_logs."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
from test_resource_backend import ROOT, _wheel
from test_resource_backend import make_facts as backend_facts
from test_resource_backend import make_profile as backend_profile
from test_resource_plugin import DEST, make_facts as plugin_facts
from test_resource_plugin import make_profile as plugin_profile
from test_resource_workflow import make_facts as workflow_facts
from test_resource_workflow import make_profile as workflow_profile

from packaging.version import Version

from provisioner.config.model import WheelSource
from provisioner.facts.model import Entry, GitCheckout
from provisioner.resources import backend, plugin, releases, retention, workflow
from provisioner.resources.base import Run
from provisioner.sandbox.release_server import ReleaseServer, start_release_server

WHEELS = f"{ROOT}/.provision/wheels"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
CURRENT = "nunchaku-1.0.1+torch2.6-cp312-cp312-linux_x86_64.whl"
OLD = "nunchaku-1.0.0+torch2.6-cp312-cp312-linux_x86_64.whl"
OLDER_PART = "nunchaku-0.3.1+torch2.6-cp312-cp312-linux_x86_64.whl.part"


def entries(*names: str, kind: str = "file") -> tuple[Entry, ...]:
    return tuple(Entry(n, kind, 1000, 1) for n in names)


def test_what_counts_as_a_leftover() -> None:
    listed = entries(CURRENT, OLD, OLDER_PART, "README.txt", "torch-2.6.0-cp312-cp312-linux_x86_64.whl",
                     f".{CURRENT}.1a2b3c4d.provision-tmp", "x.provision-tmp", "notes.provision-tmp.txt")
    assert retention.stale_wheels(listed, "nunchaku", Version("1.0.1+torch2.6")) == [OLD, OLDER_PART]
    assert retention.temps(listed) == [f".{CURRENT}.1a2b3c4d.provision-tmp", "x.provision-tmp"]
    stamps = [f"ComfyUI-nunchaku.provision-backup-2025{m:02d}01-000000.disabled" for m in (3, 1, 2, 4, 5)]
    listed = entries(*stamps, "Other.provision-backup-20250101-000000.disabled", kind="dir")
    assert retention.backups(listed, "ComfyUI-nunchaku") == sorted(stamps)
    assert retention.surplus_backups(listed, "ComfyUI-nunchaku") == sorted(stamps)[:2]
    assert retention.surplus_backups(listed, "ComfyUI-nunchaku", adding=1) == sorted(stamps)[:3]
    assert retention.cleanup("x", "/f", [], "nothing") is None


# --- wheels -----------------------------------------------------------------------------------

@pytest.fixture
def server(tmp_path: Path) -> Iterator[ReleaseServer]:
    releases.clear_cache()
    srv = start_release_server()
    srv.add("nunchaku-tech", "nunchaku", "v1.0.1", _wheel(tmp_path / "r", "1.0.1", "torch2.6-cp312-linux_x86_64"))
    yield srv
    srv.stop()
    releases.clear_cache()


ENV = {"torch": "2.6.0+cu124", "tag": "cp312", "platform": "linux_x86_64"}


def test_a_converged_backend_removes_the_wheels_it_does_not_use(server: ReleaseServer) -> None:
    profile = backend_profile("1.0.1", [WheelSource("github", f"{server.url}/nunchaku-tech/nunchaku")])
    facts = backend_facts({**ENV, "nunchaku": {"version": "1.0.1+torch2.6"}})
    assert backend.probe(profile).listing == (WHEELS,)
    assert backend.plan(profile, facts).changes == ()
    facts = replace(facts, listings={WHEELS: entries(CURRENT, OLD, ".x.whl.ab12cd34.provision-tmp")})
    (change,) = backend.plan(profile, facts).changes
    assert (change.action, change.key, change.notify) == ("remove", WHEELS, frozenset())
    (step,) = change.steps
    assert isinstance(step, Run) and step.argv == ("rm", "-rf", f"{WHEELS}/{OLD}", f"{WHEELS}/.x.whl.ab12cd34.provision-tmp")
    assert server.requests == []                  # still no release asked on a converged host


def test_an_upgrade_removes_the_wheels_it_replaces_once_installed(server: ReleaseServer) -> None:
    profile = backend_profile("1.0.1", [WheelSource("github", f"{server.url}/nunchaku-tech/nunchaku")])
    facts = replace(backend_facts({**ENV, "nunchaku": {"version": "1.0.0+torch2.6"}}),
                    listings={WHEELS: entries(OLD, OLDER_PART)})
    (change,) = backend.plan(profile, facts).changes
    *_, install, tidy = change.steps
    assert isinstance(install, Run) and "install" in install.argv
    assert isinstance(tidy, Run) and tidy.argv == ("rm", "-rf", f"{WHEELS}/{OLD}", f"{WHEELS}/{OLDER_PART}")


# --- plugin backups ---------------------------------------------------------------------------

NODES = "/srv/ComfyUI/custom_nodes"
CONVERGED = GitCheckout(DEST, True, True, "a" * 40, ("v1.1.0",), None, (),
                        "https://github.com/nunchaku-ai/ComfyUI-nunchaku.git")


def backup(month: int) -> str:
    return f"ComfyUI-nunchaku.provision-backup-2025{month:02d}01-000000.disabled"


def test_backups_beyond_the_newest_three_are_removed_alone_on_a_converged_plugin() -> None:
    profile = plugin_profile({})
    facts = replace(plugin_facts({DEST: CONVERGED}),
                    listings={NODES: entries(*(backup(m) for m in (1, 2, 3)), "ComfyUI-nunchaku", kind="dir")})
    assert plugin.plan(profile, facts, now=NOW).changes == ()
    facts = replace(facts, listings={NODES: entries(*(backup(m) for m in (1, 2, 3, 4)),
                                                    "ComfyUI-nunchaku.provision-tmp.disabled", "Other.provision-tmp.disabled",
                                                    kind="dir")})
    (change,) = plugin.plan(profile, facts, now=NOW).changes
    assert change.action == "remove" and change.notify == frozenset()
    assert change.steps[0].argv == ("rm", "-rf", f"{NODES}/{backup(1)}",                      # type: ignore[union-attr]
                                    f"{NODES}/ComfyUI-nunchaku.provision-tmp.disabled")


def test_a_change_that_makes_a_backup_removes_the_oldest_beyond_three() -> None:
    dirty = replace(CONVERGED, dirty=("__init__.py",))
    facts = replace(plugin_facts({DEST: dirty}), listings={NODES: entries(*(backup(m) for m in (1, 2, 3)), kind="dir")})
    (change,) = plugin.plan(plugin_profile({"plugin": {"force": True}}), facts, now=NOW).changes
    assert change.steps[0].argv[:2] == ("cp", "-a")                                          # type: ignore[union-attr]
    assert change.steps[-1].argv == ("rm", "-rf", f"{NODES}/{backup(1)}")                    # type: ignore[union-attr]
    assert f"{backup(1)} removed: only the newest 3 backups are kept" in change.warnings


# --- workflow uploads -------------------------------------------------------------------------

def test_what_a_killed_upload_left_beside_a_workflow_is_removed() -> None:
    profile = workflow_profile({})
    folder = "/srv/ComfyUI/workflows"
    assert workflow.probe(profile).listing == (folder,)
    facts = workflow_facts()
    wanted = workflow.plan(profile, facts).changes
    on_host = {c.key: c.after for c in wanted}
    left = ".qwen-image-edit-lightning.json.1a2b3c4d.provision-tmp"
    facts = replace(workflow_facts(contents=on_host), listings={folder: entries("qwen-image-edit-lightning.json", left)})
    (change,) = workflow.plan(profile, facts).changes
    assert (change.action, change.key) == ("remove", folder)
    assert change.steps[0].argv == ("rm", "-rf", f"{folder}/{left}")                         # type: ignore[union-attr]


# --- the control machine's logs -----------------------------------------------------------------

def test_a_hosts_log_is_rotated_and_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from provisioner.plan import progress

    monkeypatch.setattr(progress, "LOG_BYTES", 1000)
    reporter = progress.Reporter(Console(file=io.StringIO()), log_dir=tmp_path)
    for i in range(400):                              # ~60 bytes a record: 24 KB in all
        reporter.log("gpu-01", "step", i=i)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["gpu-01.jsonl", *(f"gpu-01.jsonl.{n}" for n in range(1, progress.LOG_KEEP + 1))]
    assert all(p.stat().st_size < 1100 for p in tmp_path.iterdir())
    last = [json.loads(line)["i"] for line in (tmp_path / "gpu-01.jsonl").read_text().splitlines()]
    before = [json.loads(line)["i"] for line in (tmp_path / "gpu-01.jsonl.1").read_text().splitlines()]
    assert last[-1] == 399 and before[-1] + 1 == last[0]          # newest first, nothing lost between
