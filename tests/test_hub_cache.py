"""The control machine's record of the Hub: where it lives, what it keeps, and that concurrent
writers (hosts planning in threads, two provision processes) lose nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from provisioner.resources import hub_cache

C1, C2 = "1" * 40, "2" * 40


def test_location_follows_the_env_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(hub_cache.CACHE_ENV, str(tmp_path / "mine"))
    assert hub_cache.path() == tmp_path / "mine" / "hub.json"
    monkeypatch.delenv(hub_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache.path() == tmp_path / "xdg" / "provision" / "hub.json"


def test_a_branch_keeps_its_first_commit_until_forgotten() -> None:
    hub_cache.record("https://hf", "o/r", "main", C1, "a.safetensors", 10, "a" * 64)
    hub_cache.record("https://hf", "o/r", "main", C2, "b.safetensors", 20, None)    # main moved meanwhile
    assert hub_cache.commit_of("https://hf", "o/r", "main") == C1
    assert hub_cache.file_at("https://hf", "o/r", C1, "a.safetensors") == (10, "a" * 64)
    assert hub_cache.file_at("https://hf", "o/r", C2, "b.safetensors") == (20, None)   # commits are forever
    assert hub_cache.file_at("https://other", "o/r", C1, "a.safetensors") is None     # per endpoint
    hub_cache.forget_refs()
    assert hub_cache.commit_of("https://hf", "o/r", "main") is None
    assert hub_cache.file_at("https://hf", "o/r", C1, "a.safetensors") == (10, "a" * 64)


def test_a_damaged_record_is_an_empty_one() -> None:
    hub_cache.path().parent.mkdir(parents=True, exist_ok=True)
    hub_cache.path().write_text("{not json")
    assert hub_cache.commit_of("https://hf", "o/r", "main") is None
    hub_cache.record("https://hf", "o/r", C1, C1, "a", 1, None)
    assert json.loads(hub_cache.path().read_text())["format"] == hub_cache.FORMAT


def test_concurrent_writers_lose_nothing() -> None:
    code = ("import sys\nfrom provisioner.resources import hub_cache\n"
            "for i in range(40):\n"
            "    hub_cache.record('https://hf', 'o/r', sys.argv[1], sys.argv[1], f'{sys.argv[1]}-{i}', i, None)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, c]) for c in (C1, C2)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: hub_cache.record("https://hf", "o/t", "main", C1, f"t-{i}", i, None), range(40)))
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    files = json.loads(hub_cache.path().read_text())["files"]
    assert len(files) == 120
