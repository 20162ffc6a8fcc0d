"""Throughput: a 1 GB push by provision's `put_file` (through the system scp above 64 MiB), by
paramiko's pipelined SFTP (what put_file used before) and by a plain `scp`, and the fetch script's verify
mode vs `sha256sum`, on one loopback sshd host. Files live in a temporary folder, removed after."""

from __future__ import annotations

import hashlib
import shutil
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.hosts import ToolFleet
from sshd import SYSTEM_PATH
from bench.measure import median
from provisioner.connection import scp as system_scp
from provisioner.connection.ssh import SshConnection
from provisioner import remote

BLOCK = 1 << 20
# The interpreter an sshd host runs `python3` with (its PATH is the system one, see tests/sshd.py).
HOST_PYTHON = shutil.which("python3", path=SYSTEM_PATH) or "python3"


def _make_file(path: Path, mib: int) -> str:
    """`mib` MiB of incompressible bytes (so no layer can win by compressing); returns the sha256."""
    digest = hashlib.sha256()
    block = os.urandom(BLOCK)
    with open(path, "wb") as f:
        for i in range(mib):
            chunk = block[i % 251:] + block[:i % 251]   # rotate: every MiB differs, cheaply
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def _timed(fn: Any, fresh: Path | None = None) -> float:
    """Seconds `fn` takes; `fresh`: a copy left there by the run before is removed first, outside
    the timing (replacing a 1 GB file costs the filesystem ~0.2-0.4 s to free the old one: ext4
    with discard here, in put_file's rename and in scp's truncate alike; the transfer is measured)."""
    if fresh is not None:
        fresh.unlink(missing_ok=True)
        os.sync()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(fleet: ToolFleet, mib: int, runs: int) -> dict[str, Any]:
    host = fleet.hosts[0].sshd
    with tempfile.TemporaryDirectory(prefix="provision-bench-push-") as tmp:
        src, dest_p, dest_s = Path(tmp) / "src.bin", Path(tmp) / "push.bin", Path(tmp) / "scp.bin"
        want = _make_file(src, mib)
        size = src.stat().st_size
        scp_argv = ["scp", "-q", "-F", str(fleet.fleet.ssh_config), "-o",
                    f"UserKnownHostsFile={fleet.fleet.known_hosts}", str(src), f"{host.name}:{dest_s}"]
        conn = SshConnection(host.host(), host.options())
        push: list[float] = []
        sftp: list[float] = []
        scp: list[float] = []
        threshold = system_scp.SYSTEM_COPY_MIN
        try:
            for _ in range(runs):     # taking turns, as the tools do
                push.append(_timed(lambda: conn.put_file(str(src), str(dest_p)), dest_p))
                system_scp.SYSTEM_COPY_MIN = 1 << 62     # paramiko's pipelined SFTP, forced
                try:
                    sftp.append(_timed(lambda: conn.put_file(str(src), str(dest_p)), dest_p))
                finally:
                    system_scp.SYSTEM_COPY_MIN = threshold
                scp.append(_timed(lambda: subprocess.run(scp_argv, check=True), dest_s))
        finally:
            conn.close()
        request = remote.fetch_request(dest=str(dest_p), cache=str(Path(tmp) / "checksums.json"),
                                       sha256=want, size=size, mode="verify")

        def verify() -> None:
            out = subprocess.run([HOST_PYTHON, "-c", remote.source("fetch")], input=request,
                                 capture_output=True, check=True).stdout.decode().strip().splitlines()
            if not json.loads(out[-1]).get("ok"):
                raise RuntimeError(f"fetch script verify failed: {out[-1]}")

        def sha256sum() -> None:
            out = subprocess.run(["sha256sum", str(dest_s)], capture_output=True, check=True, text=True)
            if out.stdout.split()[0] != want:
                raise RuntimeError("scp copy differs from the source")

        verify_s = [_timed(verify) for _ in range(runs)]
        sum_s = [_timed(sha256sum) for _ in range(runs)]
    mb = size / 1e6
    rows = {
        "push_provision": push, "push_sftp": sftp, "push_scp": scp, "hash_fetch_script": verify_s, "hash_sha256sum": sum_s,
    }
    result: dict[str, Any] = {"mib": mib, "runs": runs, "python3": _python3_version()}
    for key, values in rows.items():
        result[key] = {"seconds": values, "median_s": median(values), "mb_per_s": mb / median(values)}
    result["push_ratio"] = result["push_provision"]["mb_per_s"] / result["push_scp"]["mb_per_s"]
    result["sftp_ratio"] = result["push_sftp"]["mb_per_s"] / result["push_scp"]["mb_per_s"]
    result["hash_ratio"] = result["hash_fetch_script"]["mb_per_s"] / result["hash_sha256sum"]["mb_per_s"]
    return result


def _python3_version() -> str:
    return subprocess.run([HOST_PYTHON, "-c", "import sys; print(sys.version.split()[0])"],
                          capture_output=True, text=True).stdout.strip() or sys.version.split()[0]
