"""The control machine's record of the Hub: where it lives, what it keeps, and that concurrent
writers (hosts planning in threads, two provision processes) lose nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from provisioner.config.records import CACHE_ENV
from provisioner.resources import hub_cache

C1, C2 = "1" * 40, "2" * 40


def test_location_follows_the_env_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert hub_cache.path() == tmp_path / "mine" / "hub.json"
    monkeypatch.delenv(CACHE_ENV)
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


def test_a_deep_or_special_record_is_an_empty_one_too() -> None:
    # A record 5000 `[` deep was a RecursionError in every plan; a FIFO in its place hung it.
    hub_cache.path().parent.mkdir(parents=True, exist_ok=True)
    hub_cache.path().write_text("[" * 5000 + "]" * 5000)
    assert hub_cache.commit_of("https://hf", "o/r", "main") is None
    hub_cache.path().unlink()
    os.mkfifo(hub_cache.path())
    assert hub_cache.commit_of("https://hf", "o/r", "main") is None


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


@pytest.mark.parametrize("endpoint, repo, path, revision", [
    ("https://huggingface.co", "nunchaku-tech/nunchaku-qwen-image-edit-2509",
     "lightning-251115/svdq-int4_r128-qwen-image-edit-2509-lightning-4steps-251115.safetensors", "main"),
    ("http://127.0.0.1:8080/", "org/repo", "dir with space/ü+x#y?.safetensors", "refs/pr/3"),
    ("http://hub.local", "org/repo", "w.safetensors", "0123456789abcdef0123456789abcdef01234567"),
])
def test_recorded_urls_are_the_ones_huggingface_hub_builds(endpoint: str, repo: str, path: str,
                                                           revision: str) -> None:
    """hub.py formats a recorded file's URL itself, to keep the library's import off the no-op."""
    from huggingface_hub import hf_hub_url

    from provisioner.resources import hub

    assert hub._url(endpoint, repo, path, revision) == hf_hub_url(
        repo, path, revision=revision, endpoint=endpoint.rstrip("/"))


def test_a_plan_answered_from_the_record_does_not_import_huggingface_hub(tmp_path: Path) -> None:
    code = (
        "import sys; from provisioner.resources import hub, hub_cache\n"
        "hub_cache.record('http://hub', 'o/r', 'main', 'c' * 40, 'w.bin', 5, 'a' * 64)\n"
        "f = hub.file_metadata('http://hub', 'o/r', 'w.bin')\n"
        "assert (f.size, f.commit) == (5, 'c' * 40), f\n"
        "print('huggingface_hub' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PROVISION_CACHE_DIR": str(tmp_path)})
    assert out.stdout.strip() == "False"
