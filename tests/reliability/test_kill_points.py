"""Random kill points during apply: a fresh sandbox host behind a real sshd, `provision apply` in its
own process, SIGKILL at a random moment of it, then the host is checked as it was left and
applied again, which must converge:

- as left: no partial file at a final path (every model file, wheel, workflow and the plugin
  checkout is either absent or whole and right);
- after the second apply: every model file has its checksum, no `.part`, no `*.provision-tmp`,
  nothing owed, `plan` says up to date, and the running ComfyUI lists the Nunchaku nodes (a
  restart owed by the killed apply was performed: plan/owed.py).

Kill moments are drawn uniformly over the length of an uninterrupted apply, measured first on a
host of its own. Default: 8 kill points; `PROVISION_RELIABILITY=full`: 104.
`PROVISION_RELIABILITY_SEED` draws other moments.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import time
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from bounded import FULL, Tally
from lab import Lab, LabHost, open_lab

from provisioner.catalog import models as catalog

pytestmark = pytest.mark.reliability

COUNT = 104 if FULL else 8
SEED = int(os.environ.get("PROVISION_RELIABILITY_SEED", "2025"))
THROTTLE_BPS = 6_000_000          # the Hub stand-in's pace: downloads last long enough to be hit
LOADER = "NunchakuQwenImageDiTLoader"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-kill"), model_bytes=8 << 20) as lab:
        lab.world.hub.throttle_bps = THROTTLE_BPS
        yield lab


def expected_models(lab: Lab, host: LabHost) -> dict[Path, str]:
    sel = catalog.resolve("qwen-image-edit-2509", "lightning-4step-r128", "int4", None)   # an RTX 3090 host
    return {host.comfy / "models" / f.folder / f.filename:
            hashlib.sha256(lab.world.files[(f.repo, f.path_in_repo)]).hexdigest() for f in sel.files}


def registered(host: LabHost) -> set[str] | None:
    """The node classes the host's ComfyUI lists, or None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{host.port}/object_info", timeout=10) as resp:
            return set(json.load(resp))
    except OSError:
        return None


def phase(log: Path) -> str:
    """Where the killed apply was: planning, the last change it started, the handler (the restart
    returned, the wait for readiness not), or done."""
    where = "planning"
    for line in log.read_text().splitlines() if log.exists() else ():
        event = json.loads(line) if line.endswith("}") else {}
        if event.get("event") == "change":
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
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if (p.name.endswith((".part", ".provision-tmp", ".provision-tmp.disabled"))
                and ".provision-sandbox" not in p.parts)]


def retire(host: LabHost) -> None:
    """Stop the host's ComfyUI and sshd and drop its files: a hundred hosts must not pile up (its
    name stays in the inventory, unused: --limit picks the host of each kill point)."""
    host.stop()
    host.sshd.stop()
    shutil.rmtree(host.sandbox.root, ignore_errors=True)


def apply_seconds(lab: Lab, tmp_path: Path) -> float:
    """How long an uninterrupted apply of a fresh host takes here (the range kill moments span)."""
    (host,) = lab.add(1)
    started = time.monotonic()
    proc = lab.spawn("apply", "--limit", host.name, "--no-verify", log_dir=tmp_path / "calibration")
    out, _ = proc.communicate(timeout=300)
    seconds = time.monotonic() - started
    assert proc.returncode == 2, out
    retire(host)
    return seconds


def test_random_kill_points_converge(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    span = apply_seconds(lab, tmp_path)
    rng = random.Random(SEED)
    tally = Tally("kill points", bounded=False)
    phases: Counter[str] = Counter()
    for n in range(COUNT):
        (host,) = lab.add(1)
        logs = tmp_path / f"kill-{n}"
        delay = rng.uniform(0.0, span)
        proc = lab.spawn("apply", "--limit", host.name, "--no-verify", log_dir=logs)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        where = phase(logs / f"{host.name}.jsonl")
        phases[where] += 1
        wrong = partial_files(lab, host)
        code, out = lab.run("apply", "--limit", host.name, "--no-verify", "--lock-timeout", "60")
        if code not in (0, 2):
            wrong.append(f"the second apply exited {code}: {out[-1500:]}")
        else:
            wrong += [f"{p.name}: wrong after the second apply" for p, sha in expected_models(lab, host).items()
                      if not p.exists() or hashlib.sha256(p.read_bytes()).hexdigest() != sha]
            wrong += [f"left behind: {p}" for p in leftovers(host)]
            if list((host.comfy / ".provision" / "owed").glob("*")):
                wrong.append("a handler is still owed")
            code, out = lab.run("plan", "--limit", host.name)
            if code != 0:
                wrong.append(f"plan after the second apply exited {code}: {out[-800:]}")
            nodes = registered(host)
            if nodes is None:
                wrong.append("ComfyUI does not answer: a restart was lost")
            elif LOADER not in nodes:
                wrong.append("ComfyUI runs without the Nunchaku nodes: a restart was lost")
        tally.add(not wrong, f"kill {n} at {delay:.2f}s ({where}): " + "; ".join(wrong))
        retire(host)
    tally.extra.update(sorted(phases.items()))
    with capsys.disabled():
        print(f"\n{tally.line()} (an apply takes {span:.1f} s here; seed {SEED})")
    assert not tally.failures, f"{len(tally.failures)} of {tally.tried}:\n" + "\n".join(tally.failures[:10])
    if FULL:        # the full run must have hit the window the lost restart lived in
        assert phases["workflow"] + phases["handler"] > 0, phases
