"""The host-side downloader, run as `python3 -c SOURCE` against the Hub stand-in over real HTTP."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import smallfs

from provisioner import remote
from provisioner.sandbox.hf_server import HfServer, start_hf_server

REPO, PATH = "nunchaku-ai/nunchaku-qwen-image-edit-2509", "svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-4steps.safetensors"
GATED = "org/gated-model"
TOKEN = "hf_secret_token_value_123"
DATA = hashlib.sha256(b"seed").digest() * 40_000        # 1.28 MB of deterministic bytes
SHA = hashlib.sha256(DATA).hexdigest()
PYTHON = shutil.which("python3") or sys.executable      # the host's python, not the venv's


@pytest.fixture
def hub() -> Iterator[HfServer]:
    with start_hf_server({(REPO, PATH): DATA, (GATED, "w.safetensors"): DATA},
                         gated={GATED}, token=TOKEN) as server:
        yield server


def run(req: dict[str, object], python: str = PYTHON) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    argv = remote.argv("fetch", python=python)
    proc = subprocess.run(argv, input=json.dumps(req), capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]   # every stdout line is JSON
    return proc, lines


def request(server: HfServer, tmp_path: Path, **kw: object) -> dict[str, object]:
    req = {"url": f"{server.url}/{REPO}/resolve/main/{PATH}", "dest": str(tmp_path / "models" / "dm" / "m.safetensors"),
           "sha256": SHA, "size": len(DATA), "cache": str(tmp_path / ".provision" / "checksums.json"),
           "mode": "fetch", "backoff_s": 0.01}
    req.update(kw)
    return req


def cdn_gets(server: HfServer) -> list:
    return [r for r in server.requests if r.origin == "cdn" and r.method == "GET"]


def test_full_download_verifies_renames_and_records_the_cache(hub: HfServer, tmp_path: Path) -> None:
    req = request(hub, tmp_path)
    proc, lines = run(req)
    assert proc.returncode == 0, proc.stderr
    dest = Path(str(req["dest"]))
    assert dest.read_bytes() == DATA and not Path(f"{dest}.part").exists()
    final = lines[-1]
    assert final == {"ok": True, "mode": "fetch", "dest": str(dest), "size": len(DATA), "sha256": SHA,
                     "fetched": len(DATA), "resumed_from": 0}
    assert lines[-2] == {"done": len(DATA), "total": len(DATA)}    # progress ends at the total
    cache = json.loads(Path(str(req["cache"])).read_text())
    st = dest.stat()
    assert cache == {str(dest): {"size": len(DATA), "mtime_ns": st.st_mtime_ns, "sha256": SHA}}
    # The Hub answered 302 to the CDN origin, which served the bytes.
    assert [r.status for r in hub.requests if r.origin == "hub"] == [302]
    assert [r.status for r in cdn_gets(hub)] == [200]


def test_token_goes_on_stdin_reaches_the_hub_and_never_the_cdn(hub: HfServer, tmp_path: Path) -> None:
    argv = remote.argv("fetch", python=PYTHON)
    stdin = remote.fetch_request(url=f"{hub.url}/{GATED}/resolve/main/w.safetensors",
                                 dest=str(tmp_path / "w.safetensors"), sha256=SHA, size=len(DATA),
                                 cache=str(tmp_path / "c.json"), token=TOKEN)
    assert not any(TOKEN in arg for arg in argv)                   # `ps` on the host never shows it
    assert TOKEN in stdin.decode()
    proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert TOKEN.encode() not in proc.stdout + proc.stderr
    (hub_req,) = [r for r in hub.requests if r.origin == "hub"]
    assert hub_req.headers.get("Authorization") == f"Bearer {TOKEN}" and hub_req.status == 302
    assert [r.headers.get("Authorization") for r in cdn_gets(hub)] == [None]


def test_gated_repo_without_token_fails_with_a_hint(hub: HfServer, tmp_path: Path) -> None:
    proc, lines = run(request(hub, tmp_path, url=f"{hub.url}/{GATED}/resolve/main/w.safetensors"))
    assert proc.returncode == 1
    assert "HTTP 401" in proc.stderr and "token" in proc.stderr and lines[-1]["ok"] is False
    assert len(hub.requests) == 1                                   # a 401 is not retried


def test_dropped_connection_resumes_with_range_in_the_same_run(hub: HfServer, tmp_path: Path) -> None:
    hub.drop_after(300_000)
    proc, lines = run(request(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr
    first, second = cdn_gets(hub)
    assert first.body_bytes == 300_000 and "Range" not in first.headers
    assert second.headers["Range"] == "bytes=300000-" and second.status == 206
    assert second.body_bytes == len(DATA) - 300_000
    assert lines[-1]["sha256"] == SHA and lines[-1]["fetched"] == len(DATA)


def test_interrupted_run_leaves_a_part_the_next_run_resumes(hub: HfServer, tmp_path: Path) -> None:
    req = request(hub, tmp_path, retries=0)
    hub.drop_after(500_000)
    proc, lines = run(req)
    assert proc.returncode == 1 and "run again to resume" in proc.stderr
    part = Path(f"{req['dest']}.part")
    assert part.stat().st_size == 500_000 and not Path(str(req["dest"])).exists()

    proc, lines = run(req)
    assert proc.returncode == 0, proc.stderr
    assert lines[-1]["resumed_from"] == 500_000 and lines[-1]["fetched"] == len(DATA) - 500_000
    assert cdn_gets(hub)[-1].body_bytes == len(DATA) - 500_000 < len(DATA)
    assert Path(str(req["dest"])).read_bytes() == DATA and not part.exists()


def test_server_ignoring_range_restarts_from_zero(hub: HfServer, tmp_path: Path) -> None:
    req = request(hub, tmp_path)
    Path(str(req["dest"])).parent.mkdir(parents=True)
    Path(f"{req['dest']}.part").write_bytes(b"\0" * 1000)         # would corrupt the file if appended to
    hub.honor_range = False
    proc, lines = run(req)
    assert proc.returncode == 0, proc.stderr
    assert cdn_gets(hub)[0].headers["Range"] == "bytes=1000-" and cdn_gets(hub)[0].status == 200
    assert Path(str(req["dest"])).read_bytes() == DATA and lines[-1]["resumed_from"] == 1000


def test_checksum_mismatch_leaves_nothing_at_dest(hub: HfServer, tmp_path: Path) -> None:
    req = request(hub, tmp_path, sha256="0" * 64)
    proc, lines = run(req)
    assert proc.returncode == 1
    assert "checksum mismatch" in proc.stderr and SHA in proc.stderr
    assert not Path(str(req["dest"])).exists() and not Path(f"{req['dest']}.part").exists()
    assert not Path(str(req["cache"])).exists()


def test_missing_file_fails_fast_without_retries(hub: HfServer, tmp_path: Path) -> None:
    proc, _ = run(request(hub, tmp_path, url=f"{hub.url}/{REPO}/resolve/main/nope.safetensors"))
    assert proc.returncode == 1 and "HTTP 404" in proc.stderr
    assert len(hub.requests) == 1


def test_verify_mode_hashes_once_and_records(tmp_path: Path) -> None:
    dest = tmp_path / "vae.safetensors"
    dest.write_bytes(DATA)
    cache = tmp_path / "checksums.json"
    stdin = remote.fetch_request(dest=str(dest), sha256=SHA, size=len(DATA), cache=str(cache), mode="verify")
    proc = subprocess.run(remote.argv("fetch", python=PYTHON), input=stdin, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(cache.read_text())[str(dest)]["sha256"] == SHA
    assert json.loads(proc.stdout.splitlines()[-1])["fetched"] == 0


def test_verify_mismatch_fails_but_records_the_real_checksum(tmp_path: Path) -> None:
    dest = tmp_path / "vae.safetensors"
    dest.write_bytes(DATA)
    cache = tmp_path / "checksums.json"
    proc, lines = run({"dest": str(dest), "sha256": "f" * 64, "size": len(DATA), "cache": str(cache), "mode": "verify"})
    assert proc.returncode == 1 and "next plan replaces it" in proc.stderr
    assert json.loads(cache.read_text())[str(dest)]["sha256"] == SHA   # so the next plan says "replace"
    assert dest.read_bytes() == DATA                                    # verify never deletes


def test_concurrent_writers_keep_every_cache_entry(tmp_path: Path) -> None:
    cache = tmp_path / "checksums.json"
    procs = []
    for i in range(8):
        f = tmp_path / f"f{i}"
        f.write_bytes(DATA[: 1000 + i])
        req = {"dest": str(f), "cache": str(cache), "mode": "verify"}
        procs.append(subprocess.Popen(remote.argv("fetch", python=PYTHON), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL))
        procs[-1].stdin.write(json.dumps(req).encode())          # type: ignore[union-attr]
        procs[-1].stdin.close()                                  # type: ignore[union-attr]
    assert [p.wait(timeout=60) for p in procs] == [0] * 8
    entries = json.loads(cache.read_text())
    assert {Path(k).name for k in entries} == {f"f{i}" for i in range(8)}
    assert entries[str(tmp_path / "f3")]["sha256"] == hashlib.sha256(DATA[:1003]).hexdigest()


def test_bad_request_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(remote.argv("fetch", python=PYTHON), input="{not json", capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "bad request" in proc.stderr


def test_host_programs_are_python38_syntax_and_stdlib_only() -> None:
    for program in remote.PROGRAMS:       # a host's system python may be old and bare
        tree = ast.parse(remote.source(program), feature_version=(3, 8))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                     and n.col_offset == 0}
        assert imported <= set(sys.stdlib_module_names) | {"__future__"}, (program, imported)


def test_model_header_is_checked_before_the_rename(tmp_path: Path) -> None:
    """A finished, checksum-correct download whose safetensors header declares another precision
    than the plan expects never reaches its final name: the DiT of an Ada host must be int4."""
    from provisioner.sandbox.world import safetensors_standin

    fp4 = safetensors_standin(200_000, PATH, precision="fp4", rank=128)
    int4 = safetensors_standin(200_000, PATH, precision="int4", rank=128)
    with start_hf_server({(REPO, PATH): fp4, (REPO, "int4.safetensors"): int4}) as server:
        wrong = request(server, tmp_path, sha256=hashlib.sha256(fp4).hexdigest(), size=len(fp4),
                        quantization={"dtype": "int4", "rank": 128})
        proc, lines = run(wrong)
        dest = Path(str(wrong["dest"]))
        assert proc.returncode == 1
        assert lines[-1]["error"] == (f"{dest}: its header declares fp4_e2m1_all rank 128 weights, expected int4 "
                                      "rank 128; removed the download")
        assert not dest.exists() and not Path(f"{dest}.part").exists()
        right = request(server, tmp_path, url=f"{server.url}/{REPO}/resolve/main/int4.safetensors",
                        sha256=hashlib.sha256(int4).hexdigest(), size=len(int4),
                        quantization={"dtype": "int4", "rank": 128})
        proc, _ = run(right)
        assert proc.returncode == 0, proc.stderr
        assert dest.read_bytes() == int4
    with start_hf_server({(REPO, PATH): DATA}) as server:          # 1.28 MB of noise named .safetensors
        proc, lines = run(request(server, tmp_path, quantization={"dtype": "int4", "rank": 128}))
        assert proc.returncode == 1 and "not a safetensors file" in lines[-1]["error"]


def test_a_full_disk_is_said_as_such_not_retried_and_the_part_kept_to_resume(
        hub: HfServer, small_fs: Callable[[int], Path]) -> None:
    """ENOSPC used to be retried as a network error and end in "run again to resume"."""
    disk = small_fs(512 << 10)                           # 0.5 MiB for a 1.28 MB file
    req = request(hub, disk)
    proc, lines = run(req)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert f"disk full at {disk}/models/dm: " in line and " bytes free, " in line and "more needed" in line
    assert "kept" in line and "to resume once space is freed" in line
    assert len(cdn_gets(hub)) == 1                       # not retried
    part = Path(f"{req['dest']}.part")
    kept = part.read_bytes()
    assert 0 < len(kept) < len(DATA) and kept == DATA[:len(kept)]       # what it holds is the file's start
    assert not Path(str(req["dest"])).exists()
    smallfs.resize(disk, 4 << 20)                       # space freed: the next run resumes
    proc, lines = run(req)
    assert proc.returncode == 0, proc.stderr
    assert lines[-1]["resumed_from"] == len(kept) and Path(str(req["dest"])).read_bytes() == DATA


def test_a_full_disk_removes_a_part_the_server_cannot_resume(hub: HfServer, small_fs: Callable[[int], Path]) -> None:
    disk = small_fs(512 << 10)
    hub.honor_range = False
    req = request(hub, disk)
    proc, _ = run(req)
    assert proc.returncode == 1
    assert "disk full at" in proc.stderr and "(the server cannot resume it)" in proc.stderr
    assert list((disk / "models" / "dm").iterdir()) == []
    assert len(cdn_gets(hub)) == 1


def test_a_disk_too_full_for_the_part_itself_is_said_as_such(hub: HfServer, small_fs: Callable[[int], Path]) -> None:
    disk = small_fs(64 << 10)
    (disk / "filler").write_bytes(b"\0" * (64 << 10))
    proc, _ = run(request(hub, disk))
    assert proc.returncode == 1 and "disk full at" in proc.stderr, proc.stderr
