"""Build the caches the real-upstream and real-hosts tiers make on first use, with no test run:
the upstream mirrors, the real venv, the real wheelhouse, the hosts' Debian rootfs and the ComfyUI
image. `.ci/run` starts it beside `make test`, so a new machine's minutes of pip, debootstrap and
`docker build` overlap the default suite instead of following it. Each step is the fixture's own
function (same cache keys, same locks), so the tiers find the result and build nothing.

    .venv/bin/python tests/hosts/prepare.py      # PROVISION_COMFYUI_REPO / PROVISION_PLUGIN_REPO as for the tiers
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS / "hosts"), str(TESTS / "real"), str(TESTS)]    # as pytest's rootdir imports them

import machines  # noqa: E402
import upstream  # noqa: E402


def say(line: str) -> None:
    print(f"[prepare {time.strftime('%H:%M:%S')}] {line}", flush=True)


def main() -> int:
    started = time.monotonic()
    real_cache = upstream.cache_dir()
    comfyui_repo = upstream.mirror(upstream.source("PROVISION_COMFYUI_REPO", upstream.COMFYUI_REPO), real_cache)
    upstream.mirror(upstream.source("PROVISION_PLUGIN_REPO", upstream.PLUGIN_REPO), real_cache)
    say("mirrors ready")
    upstream.real_venv(real_cache, upstream.requirements_at(comfyui_repo, upstream.REQUIREMENTS_TAG), say)
    say("the real tier's venv ready")
    wheelhouse = upstream.wheelhouse(real_cache, upstream.wheelhouse_requirements(comfyui_repo), say)
    say("the real wheelhouse ready")
    reason = machines.unable()
    if reason:
        say(f"the real-hosts tier {reason}: its rootfs and image are not built")
        return 0
    hosts_cache = machines.cache_dir()
    rootfs = machines.rootfs(hosts_cache, say)
    if shutil.which("dockerd") is None:
        say("no dockerd here: the ComfyUI image is not built (the Docker cases skip)")
        return 0
    with machines.locked(hosts_cache / "docker.lock"):
        daemon = machines.Dockerd(hosts_cache / "docker", Path(f"/run/{machines.LABEL}-{os.getpid()}"))
        try:
            daemon.start()
            base = daemon.import_rootfs(rootfs)
            machines.comfyui_image(daemon, base, comfyui_repo, wheelhouse, upstream.REQUIREMENTS_TAG,
                                   upstream.TORCH_PINS, upstream.EXTRA, say)
        finally:
            daemon.stop()
    say(f"all caches ready in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
