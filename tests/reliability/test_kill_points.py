"""Random kill points during apply and during rollback: a fresh sandbox host behind a real sshd
for each, the command in a process of its own, SIGKILL at a random moment of it, then the host is
checked as it was left and the command run again, which must converge:

- as left: no partial file at a final path (every model file, wheel, workflow and the plugin
  checkout is either absent or whole and right);
- after the second run: every model file has its checksum, no `.part`, no `*.provision-tmp`
  (nor a killed snapshot's temporary files),
  nothing owed, nothing left to do, and the running ComfyUI lists the Nunchaku nodes and loaded
  the backend the venv holds (a restart owed by the killed run was performed: plan/owed.py).

Apply: a fresh host, `apply` killed, `apply` again; `plan` must say up to date. Rollback: a fresh
host applied to the lab's profile (A), then upgraded (B: the plugin tag, the backend wheel, a
package added, the workflows; in the torch-move case torch 2.6.0+cu126 -> 2.8.0+cu128 too), then `rollback` (to the snapshot taken before B's apply) killed and
`rollback --to` that snapshot again (a default rollback after a partial one may choose another:
docs/rollback.md); the host must be exactly A (tree, `pip freeze --all`, plugin commit) and
`rollback --to ID --check` must find nothing to do.

Kill moments are drawn uniformly over the length of the same command uninterrupted, measured
first on a host of its own. Default: 8 apply and 4 rollback kill points; `PROVISION_RELIABILITY=full`:
104 and 48. `PROVISION_RELIABILITY_SEED` draws other moments.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from bounded import FULL, Tally
from lab import Lab, LabHost, open_lab
from test_e2e_rollback import UPGRADE, add_upgrade_wheels, history, state

from provisioner.catalog import models as catalog

pytestmark = pytest.mark.reliability

APPLY_KILLS = 104 if FULL else 8
ROLLBACK_KILLS = 48 if FULL else 4
SEED = int(os.environ.get("PROVISION_RELIABILITY_SEED", "2025"))
THROTTLE_BPS = 6_000_000          # the Hub stand-in's pace: downloads last long enough to be hit
LOADER = "NunchakuQwenImageDiTLoader"
# B, what a rollback undoes: on a torch both nunchaku 1.0.1 (A's) and 1.1.0 have wheels for, so
# the rollback reinstalls the wheel file its snapshot kept.
TORCH = "2.8.0+cu128"
UPGRADE_B = {**UPGRADE, "backend": {"version": "1.1.0"}}
# The same B with torch moved too (2.6.0+cu126 -> 2.8.0+cu128, on an RTX 5090: its driver runs
# both; it takes the fp4 model files): the rollback fetches torch from the torch index again, puts
# back the kept 1.0.1+torch2.6 wheel and uninstalls the torchaudio the move added.
TORCH_A = "2.6.0+cu126"


def torch_move(lab: Lab) -> dict[str, object]:
    return {**UPGRADE_B, "comfyui": {"torch": {"version": "2.8.0", "cuda": "12.8", "index_url": None,
                                               "find_links": [f"{lab.world.torch_wheelhouse}/{{flavour}}"]}}}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-kill"), model_bytes=8 << 20) as lab:
        add_upgrade_wheels(lab)
        lab.world.hub.throttle_bps = THROTTLE_BPS
        yield lab


def expected_models(lab: Lab, host: LabHost) -> dict[Path, str]:
    precision = "fp4" if host.sandbox.gpu == "rtx5090" else "int4"          # an RTX 5090, else an RTX 3090
    sel = catalog.resolve("qwen-image-edit-2509", "lightning-4step-r128", precision, None)
    return {host.comfy / "models" / f.folder / f.filename:
            hashlib.sha256(lab.world.files[(f.repo, f.path_in_repo)]).hexdigest() for f in sel.files}


def registered(host: LabHost) -> set[str] | None:
    """The node classes the host's ComfyUI lists, or None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{host.port}/object_info", timeout=10) as resp:
            return set(json.load(resp))
    except OSError:
        return None


def loaded_backend(host: LabHost) -> str | None:
    """The nunchaku version the running ComfyUI-nunchaku logged at its start."""
    with urllib.request.urlopen(f"http://127.0.0.1:{host.port}/internal/logs/raw", timeout=10) as resp:
        logged = "".join(str(e["m"]) for e in json.load(resp)["entries"])
    found = re.findall(r"Nunchaku version: (\S+)", logged)
    return found[-1] if found else None


def installed_backend(host: LabHost) -> str:
    return subprocess.run([str(host.sandbox.python), "-c", "from importlib.metadata import version; "
                           "print(version('nunchaku'))"], check=True, capture_output=True, text=True).stdout.strip()


def phase(log: Path) -> str:
    """Where the killed run was: planning, its snapshot before the changes, the last change it
    started, the handler (the restart returned, the wait for readiness not), its snapshot after
    the changes, or done."""
    where = "planning"
    for line in log.read_text().splitlines() if log.exists() else ():
        event = json.loads(line) if line.endswith("}") else {}
        if event.get("event") in ("prelude", "postlude"):
            where = "snapshot " + ("before" if event["event"] == "prelude" else "after")
        elif event.get("event") == "change":
            where = event["resource"]
        elif event.get("event") == "step" and str(event.get("step", "")).startswith("restart ComfyUI"):
            where = "handler"
        elif event.get("event") == "done":
            where = "done"
    return where


def partial_files(lab: Lab, host: LabHost) -> list[str]:
    """Files at a final path that are not whole and right: what no kill may ever leave."""
    wrong = []
    for path, sha in expected_models(lab, host).items():
        if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            wrong.append(f"{path.name}: wrong bytes at the final path")
    for wheel in (host.comfy / ".provision" / "wheels").glob("*.whl"):
        if not zipfile.is_zipfile(wheel):
            wrong.append(f"{wheel.name}: not a whole wheel")
    for workflow in (host.comfy / "workflows").glob("*.json"):
        try:
            json.loads(workflow.read_text())
        except ValueError:
            wrong.append(f"{workflow.name}: not whole JSON")
    if host.plugin.exists() and not (host.plugin / "__init__.py").is_file():
        wrong.append("the plugin folder is there without its files")
    return wrong


def leftovers(host: LabHost) -> list[str]:
    root = host.sandbox.root
    snapshots = host.comfy / ".provision" / "snapshots"
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if (p.name.endswith((".part", ".provision-tmp", ".provision-tmp.disabled"))
                and ".provision-sandbox" not in p.parts)
            or (p.parent == snapshots and p.name.endswith(".tmp"))          # a killed snapshot's
            or p.parent == snapshots / "wheels" / ".incoming"]


def not_converged(lab: Lab, host: LabHost) -> list[str]:
    """What the run after a killed one left wrong, of what both kinds of run must leave right."""
    wrong = [f"{p.name}: wrong after the second run" for p, sha in expected_models(lab, host).items()
             if not p.exists() or hashlib.sha256(p.read_bytes()).hexdigest() != sha]
    wrong += [f"left behind: {p}" for p in leftovers(host)]
    if list((host.comfy / ".provision" / "owed").glob("*")):
        wrong.append("a handler is still owed")
    nodes = registered(host)
    if nodes is None:
        wrong.append("ComfyUI does not answer: a restart was lost")
    elif LOADER not in nodes:
        wrong.append("ComfyUI runs without the Nunchaku nodes: a restart was lost")
    elif (running := loaded_backend(host)) != (installed := installed_backend(host)):
        wrong.append(f"ComfyUI loaded nunchaku {running}, the venv holds {installed}: a restart was lost")
    return wrong


def retire(host: LabHost) -> None:
    """Stop the host's ComfyUI and sshd and drop its files: a hundred hosts must not pile up (its
    name stays in the inventory, unused: --limit picks the host of each kill point)."""
    host.stop()
    host.sshd.stop()
    shutil.rmtree(host.sandbox.root, ignore_errors=True)


def uninterrupted(lab: Lab, logs: Path, verb: str, *args: str) -> float:
    """Seconds `provision VERB ARGS` takes here in a process of its own, run to its end (the
    range kill moments span); it must change the host."""
    started = time.monotonic()
    proc = lab.spawn(verb, *args, log_dir=logs)
    out, _ = proc.communicate(timeout=300)
    seconds = time.monotonic() - started
    assert proc.returncode == 2, out
    return seconds


def killed(lab: Lab, host: LabHost, delay: float, logs: Path, verb: str, *args: str) -> str:
    """`provision VERB ARGS` in a process of its own, SIGKILLed `delay` s after it started; where it was."""
    proc = lab.spawn(verb, *args, log_dir=logs)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return phase(logs / f"{host.name}.jsonl")


def report(tally: Tally, phases: Counter[str], span: float, what: str, capsys: pytest.CaptureFixture[str]) -> None:
    tally.extra.update(sorted(phases.items()))
    with capsys.disabled():
        print(f"\n{tally.line()} ({what} takes {span:.1f} s here; seed {SEED})")
    assert not tally.failures, f"{len(tally.failures)} of {tally.tried}:\n" + "\n".join(tally.failures[:10])


def test_random_kill_points_during_apply_converge(lab: Lab, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (host,) = lab.add(1)
    span = uninterrupted(lab, tmp_path / "calibration", "apply", "--limit", host.name, "--no-verify")
    retire(host)
    rng = random.Random(SEED)
    tally = Tally("apply kill points", bounded=False)
    phases: Counter[str] = Counter()
    for n in range(APPLY_KILLS):
        (host,) = lab.add(1)
        delay = rng.uniform(0.0, span)
        where = killed(lab, host, delay, tmp_path / f"kill-{n}", "apply", "--limit", host.name, "--no-verify")
        phases[where] += 1
        wrong = partial_files(lab, host)
        code, out = lab.run("apply", "--limit", host.name, "--no-verify", "--lock-timeout", "60")
        if code not in (0, 2):
            wrong.append(f"the second apply exited {code}: {out[-1500:]}")
        else:
            wrong += not_converged(lab, host)
            code, out = lab.run("plan", "--limit", host.name)
            if code != 0:
                wrong.append(f"plan after the second apply exited {code}: {out[-800:]}")
        tally.add(not wrong, f"kill {n} at {delay:.2f}s ({where}): " + "; ".join(wrong))
        retire(host)
    report(tally, phases, span, "an apply", capsys)
    if FULL:        # the full run must have hit the window the lost restart lived in
        assert phases["workflow"] + phases["handler"] > 0, phases


def upgraded(lab: Lab, *, moves_torch: bool = False) -> tuple[LabHost, tuple[dict[str, str], str, str], str]:
    """A fresh host applied to A, then to B (`moves_torch`: B moves torch too): the host, A's state
    and the id of the snapshot taken before B's apply (what a rollback returns to). The profile is
    A's again when this returns."""
    (host,) = lab.add(1, torch=TORCH_A, gpu="rtx5090") if moves_torch else lab.add(1, torch=TORCH)
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    before = state(host)
    lab.profile_extra.update(torch_move(lab) if moves_torch else UPGRADE_B)
    lab.write()
    try:
        code, out = lab.run("apply", "--limit", host.name, "--no-verify")
        assert code == 2, out
    finally:
        lab.profile_extra.clear()
        lab.write()
    snap = history(lab, host)[-2]
    assert snap["taken"] == "before apply", snap
    return host, before, snap["id"]


@pytest.mark.parametrize("moves_torch", [False, True], ids=["upgrade", "torch-move"])
def test_random_kill_points_during_rollback_converge(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], moves_torch: bool) -> None:
    monkeypatch.setattr(lab.world.hub, "throttle_bps", None)   # only the rollback is killed: set hosts up fast
    host, _, _ = upgraded(lab, moves_torch=moves_torch)
    span = uninterrupted(lab, tmp_path / "calibration", "rollback", "--limit", host.name, "--no-verify")
    retire(host)
    rng = random.Random(SEED)
    tally = Tally("rollback kill points", bounded=False)
    phases: Counter[str] = Counter()
    for n in range(ROLLBACK_KILLS):
        host, before, target = upgraded(lab, moves_torch=moves_torch)
        delay = rng.uniform(0.0, span)
        where = killed(lab, host, delay, tmp_path / f"kill-{n}", "rollback", "--limit", host.name, "--no-verify")
        phases[where] += 1
        wrong = partial_files(lab, host)
        code, out = lab.run("rollback", "--limit", host.name, "--to", target, "--no-verify", "--lock-timeout", "60")
        if code not in (0, 2):
            wrong.append(f"the second rollback exited {code}: {out[-1500:]}")
        else:
            (tree, freeze, commit), (tree_a, freeze_a, commit_a) = state(host), before
            wrong += [f"{path} is not as in the snapshot" for path in sorted(set(tree) | set(tree_a))
                      if tree.get(path) != tree_a.get(path)]
            wrong += ["pip freeze is not the snapshot's"] * (freeze != freeze_a)
            wrong += ["the plugin is not at the snapshot's commit"] * (commit != commit_a)
            wrong += not_converged(lab, host)
            code, out = lab.run("rollback", "--limit", host.name, "--to", target, "--check")
            if code != 0:
                wrong.append(f"rollback --check after the second rollback exited {code}: {out[-800:]}")
        tally.add(not wrong, f"kill {n} at {delay:.2f}s ({where}): " + "; ".join(wrong))
        retire(host)
    report(tally, phases, span, "a rollback of a torch move" if moves_torch else "a rollback", capsys)
