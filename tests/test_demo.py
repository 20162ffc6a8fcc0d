"""`make demo ARGS=--keep`: the stand-ins stay up, and the command it prints runs `provision plan`
against the sandbox it leaves, as printed (nothing else to set), until the demo is stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_the_kept_demo_prints_a_command_that_works_as_printed() -> None:
    demo = subprocess.Popen([sys.executable, "-m", "provisioner.sandbox.demo", "--keep"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "400", "NO_COLOR": "1"})
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 600
        assert demo.stdout is not None
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
            if "-m provisioner plan " in line:
                break
        printed = lines[-1].strip()
        assert "demo ok" in "".join(lines) and "stay up until Ctrl-C" in "".join(lines)
        # run as a user would paste it: a shell, with none of the demo's environment
        clean = {k: v for k, v in os.environ.items() if k not in ("PROVISION_CACHE_DIR",)}
        done = subprocess.run(["sh", "-c", printed], cwd=REPO, capture_output=True, text=True, timeout=300, env=clean)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "sandbox-3090: up to date" in done.stdout
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=60)
    assert demo.returncode == 0
