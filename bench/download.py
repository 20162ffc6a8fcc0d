"""Download throughput: the host's fetch program vs `curl` (alone, and followed by `sync FILE`: the
fetch program fsyncs before its rename), and huggingface_hub's HTTP download where a venv has it,
for one large file from the Hub stand-in (302 to its CDN, as the real Hub),
on this machine. Tools take turns inside every repetition; every file is removed after each run.

The stand-in cannot speak Xet (the real Hub's chunk protocol behind hf_xet), so what hf_xet would
do against the real Hub is not measured here; huggingface_hub falls back to plain HTTP against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run alone: `bench` and `provisioner` importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from bench.measure import median
from bench.throughput import HOST_PYTHON
from provisioner import remote
from provisioner.sandbox.hf_server import start_hf_server

REPO_ID, PATH = "bench/large", "model.safetensors"
BLOCK = 1 << 20


def _content(mib: int) -> bytes:
    block = os.urandom(BLOCK)
    return b"".join(block[i % 251:] + block[:i % 251] for i in range(mib))


def _fetch_script(url: str, dest: Path, sha256: str, size: int) -> None:
    request = remote.fetch_request(url=url, dest=str(dest), cache=str(dest.parent / "checksums.json"),
                                   sha256=sha256, size=size)
    out = subprocess.run(list(remote.argv("fetch", python=HOST_PYTHON)), input=request,
                         capture_output=True, check=True).stdout.decode().strip().splitlines()
    if not json.loads(out[-1]).get("ok"):
        raise RuntimeError(f"fetch failed: {out[-1]}")


def _curl(url: str, dest: Path, durable: bool = False) -> None:
    subprocess.run(["curl", "-sSfL", "-o", str(dest), url], check=True)
    if durable:  # what the fetch script also does before its rename: the bytes on disk
        subprocess.run(["sync", str(dest)], check=True)


def _hf_hub_download(endpoint: str, dest: Path) -> None:
    code = ("import sys; from huggingface_hub import hf_hub_download; "
            "hf_hub_download(sys.argv[1], sys.argv[2], endpoint=sys.argv[3], local_dir=sys.argv[4], token=False)")
    subprocess.run([sys.executable, "-c", code, REPO_ID, PATH, endpoint, str(dest.parent)], check=True,
                   env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})


def _hf_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("huggingface_hub", "hf_xet"):
        try:
            from importlib.metadata import version
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed
            out[name] = None
    return out


def measure(mib: int, runs: int) -> dict[str, Any]:
    data = _content(mib)
    sha256, size = hashlib.sha256(data).hexdigest(), len(data)
    hub = start_hf_server({(REPO_ID, PATH): data})
    del data
    url = f"{hub.url}/{REPO_ID}/resolve/main/{PATH}"
    tools: dict[str, Any] = {
        "curl": lambda d: _curl(url, d),
        "curl_sync": lambda d: _curl(url, d, durable=True),
        "fetch_script": lambda d: _fetch_script(url, d, sha256, size),
    }
    versions = _hf_versions()
    if versions["huggingface_hub"]:
        tools["hf_hub_download"] = lambda d: _hf_hub_download(hub.url, d)
    seconds: dict[str, list[float]] = {k: [] for k in tools}
    try:
        with tempfile.TemporaryDirectory(prefix="provision-bench-download-") as tmp:
            for _ in range(runs):
                for name, run in tools.items():
                    folder = Path(tmp) / name
                    folder.mkdir()
                    dest = folder / PATH
                    started = time.perf_counter()
                    run(dest)
                    seconds[name].append(time.perf_counter() - started)
                    if dest.stat().st_size != size:
                        raise RuntimeError(f"{name} wrote {dest.stat().st_size} bytes, expected {size}")
                    shutil.rmtree(folder)
    finally:
        hub.stop()
    result: dict[str, Any] = {"mib": mib, "runs": runs, "versions": versions,
                              "curl_version": subprocess.run(["curl", "--version"], capture_output=True,
                                                             text=True).stdout.split("\n")[0]}
    for name, values in seconds.items():
        result[name] = {"seconds": values, "median_s": median(values), "mb_per_s": size / 1e6 / median(values)}
    result["fetch_vs_curl"] = result["curl"]["median_s"] / result["fetch_script"]["median_s"]
    result["fetch_vs_curl_sync"] = result["curl_sync"]["median_s"] / result["fetch_script"]["median_s"]
    return result


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1024, 3), indent=1))
