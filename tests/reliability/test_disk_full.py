"""A host whose disk fills: models/ is a link to a size-limited tmpfs of its own (as it often is a
link to another disk), behind a real sshd.

- Too small from the start: `plan` refuses, naming that filesystem, though the ComfyUI root's
  has room (the check measured the root's before), and the host is left as it was.
- Filled by someone else during the download: the apply fails with "disk full at …", without
  retrying (one request), no partial file at the final path, the `.part` kept (the Hub serves
  ranges); once space is freed, the next apply resumes from it and converges.

Skipped, with the reason, where a tmpfs cannot be mounted (mount needs root).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lab import Lab, LabHost, open_lab, tree_state

from provisioner.catalog import models as catalog
from provisioner.plan.build import DISK_MARGIN_BYTES

pytestmark = pytest.mark.reliability

MODEL_BYTES = 16 << 20


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-disk"), model_bytes=MODEL_BYTES) as lab:
        yield lab


def models_on(host: LabHost, disk: Path) -> None:
    """Make the host's models/ a link to `disk`, keeping what was in it."""
    models = host.comfy / "models"
    for item in models.iterdir():
        shutil.move(str(item), str(disk / item.name))
    models.rmdir()
    models.symlink_to(disk)


def dit(host: LabHost) -> Path:
    sel = catalog.resolve("qwen-image-edit-2509", "lightning-4step-r128", "int4", None)
    return host.comfy / "models" / sel.dit.folder / sel.dit.filename


def test_a_models_disk_too_small_is_refused_by_the_plan(lab: Lab, small_fs: Callable[[int], Path]) -> None:
    (host,) = lab.add(1)
    disk = small_fs(64 << 20)
    models_on(host, disk)
    before = tree_state(host.sandbox.root)
    for verb in ("plan", "apply"):
        code, out = lab.run(verb, "--limit", host.name, "--no-verify") if verb == "apply" else lab.run(verb)
        assert code == 1, out
        assert f"model: not enough disk at {host.comfy}/models" in out and "67.1 MB free" in out, out
    assert tree_state(host.sandbox.root) == before


def test_a_disk_filled_during_the_download_is_said_as_such_and_resumed_once_freed(
        lab: Lab, small_fs: Callable[[int], Path]) -> None:
    (host,) = lab.add(1)
    disk = small_fs(DISK_MARGIN_BYTES + (64 << 20))
    models_on(host, disk)
    part = dit(host).with_name(dit(host).name + ".part")
    lab.world.hub.throttle_bps = 4_000_000
    filler = disk / "someone-elses-file"
    try:
        proc = lab.spawn("apply", "--limit", host.name, "--no-verify")
        deadline = time.monotonic() + 120
        while not (part.exists() and part.stat().st_size > 2 << 20):
            assert time.monotonic() < deadline and proc.poll() is None, "the download never started"
            time.sleep(0.02)
        with open(filler, "wb") as fh:                    # another writer takes all but 256 KiB
            block = b"\0" * (8 << 20)
            while shutil.disk_usage(disk).free > (8 << 20) + (256 << 10):
                fh.write(block)
            fh.write(b"\0" * (shutil.disk_usage(disk).free - (256 << 10)))
        out, _ = proc.communicate(timeout=180)
    finally:
        lab.world.hub.throttle_bps = None
    assert proc.returncode == 1, out
    (line,) = [x for x in out.splitlines() if "✗ model" in x]
    assert f"disk full at {host.comfy}/models/diffusion_models: " in line and "more needed; kept" in line, line
    assert "run again to resume" not in out                           # not taken for a network error
    gets = [r for r in lab.world.hub.requests if r.origin == "cdn" and r.method == "GET"
            and r.body_bytes > 0 and r.headers.get("Range") is None and r.body_bytes < MODEL_BYTES]
    assert len(gets) == 1                                             # one GET of the DiT: no retry
    assert not dit(host).exists()                                     # never a partial file at its path
    kept = part.stat().st_size
    assert 2 << 20 < kept < MODEL_BYTES

    filler.unlink()                                                   # space freed
    since = len(lab.world.hub.requests)
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    resumed = [int(r.headers["Range"][6:-1]) for r in lab.world.hub.requests[since:]
               if r.origin == "cdn" and r.headers.get("Range")]
    assert resumed == [kept]
    want = hashlib.sha256(next(v for (repo, path), v in lab.world.files.items() if path.endswith(dit(host).name)))
    assert hashlib.sha256(dit(host).read_bytes()).hexdigest() == want.hexdigest() and not part.exists()
    assert lab.run("plan", "--limit", host.name)[0] == 0
