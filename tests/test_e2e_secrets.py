"""A gated model repo needs an HF token: it reaches the Hub, and nothing else ever sees it: not
the console, not the JSON-lines log, not a command line on the host."""

from __future__ import annotations

from pathlib import Path

import pytest
from lab import open_lab, tree_state


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


def test_a_token_read_with_its_trailing_newline_works_and_leaks_nowhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`export HF_TOKEN=$(cat token)` keeps the file's newline in some shells and tools: the plan
    stripped it while the apply sent it raw, so the host's downloader refused the header and
    quoted it (`b'Bearer hf_…\\n'`) into the console, the log and the report."""
    with open_lab(tmp_path, hub_token=TOKEN) as lab:
        (host,) = lab.add(1)
        monkeypatch.setenv("HF_TOKEN", TOKEN + "\n")
        report = tmp_path / "report"
        code, out = lab.run("apply", "--log-dir", str(tmp_path / "logs"), "--report", str(report))
        assert code == 2, out
        sent = {r.headers.get("Authorization") for r in lab.world.hub.requests} - {None}
        assert sent == {f"Bearer {TOKEN}"}
        texts = [out, *(p.read_text() for p in (tmp_path / "logs").glob("*.jsonl")),
                 *(p.read_text() for p in report.glob("*.*") if p.suffix in (".json", ".html", ".xml"))]
        assert all(TOKEN[3:] not in text for text in texts)


def test_a_token_with_a_control_character_inside_is_bad_input(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_lab(tmp_path, hub_token=TOKEN) as lab:
        (host,) = lab.add(1)
        before = tree_state(host.sandbox.root)
        monkeypatch.setenv("HF_TOKEN", TOKEN[:10] + "\n" + TOKEN[10:])
        for verb in ("plan", "apply"):
            code, out = lab.run(verb)
            assert code == 3, out
            assert "HF_TOKEN" in out and "control character" in out and TOKEN[3:10] not in out
            assert len(out.strip().splitlines()) == 1
        assert tree_state(host.sandbox.root) == before
