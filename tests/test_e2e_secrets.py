"""A gated model repo needs an HF token: it reaches the Hub, and nothing else ever sees it: not
the console, not the JSON-lines log, not a command line on the host."""

from __future__ import annotations

from pathlib import Path

import pytest
from lab import open_lab


pytestmark = pytest.mark.slow
TOKEN = "hf_provisionTestSecret0123456789"


def test_token_reaches_the_hub_and_nowhere_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_lab(tmp_path, hub_token=TOKEN) as lab:
        world = lab.world
        (host,) = lab.add(1)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        code, out = lab.run("plan")
        assert code == 1 and "HF_TOKEN" in out          # gated, no token: says which variable to set

        monkeypatch.setenv("HF_TOKEN", TOKEN)
        code, out = lab.run("apply", "--no-verify", "--log-dir", str(tmp_path / "logs"), "-v")
        assert code == 2, out
        authorised = [r for r in world.hub.requests if r.headers.get("Authorization") == f"Bearer {TOKEN}"]
        assert authorised                                # the host's downloads carried it
        assert TOKEN not in out
        for log in (tmp_path / "logs").glob("*.jsonl"):
            assert TOKEN not in log.read_text()
        assert TOKEN not in host.sshd.log_text()         # sshd logs exec'd commands at VERBOSE
        for path in host.sandbox.root.rglob("*"):
            if path.is_file() and path.stat().st_size < 5_000_000 and "ComfyUI/venv" not in str(path):
                assert TOKEN.encode() not in path.read_bytes(), path
