"""Connection faults over real sshd hosts, through the real CLI in its own process: a host that
freezes mid-apply (its sshd stopped with SIGSTOP, the TCP connection left open), a controller that
freezes mid-apply (SIGSTOP: what a network partition looks like from the host), and applies that
meet on one host. Each prints its figures (docs/reliability.md, "Connection faults")."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lab import Lab, LabHost, open_lab
from sshd import started_through, wait_until

pytestmark = pytest.mark.reliability

HEARTBEAT = 1.0                 # --heartbeat: a silent peer is gone after 3 s
GRACE = 5.0                     # connection/supervised.py GRACE_S: SIGTERM, then SIGKILL


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-faults"), model_bytes=8 << 20) as lab:
        yield lab


def events(log_dir: Path, host: LabHost) -> list[dict]:
    path = log_dir / f"{host.name}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def downloading(host: LabHost, at_least: int = 200_000) -> Callable[[], bool]:
    def check() -> bool:
        """the host is downloading its model"""
        return any(p.stat().st_size >= at_least for p in (host.comfy / "models").glob("*/*.part"))
    return check


def lock_free(host: LabHost) -> bool:
    lock = host.comfy / ".provision" / "lock"
    return not lock.exists() or subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0


def figure(text: str) -> None:
    print(f"\nconnection faults: {text}")


@pytest.mark.parametrize("heartbeat", [HEARTBEAT, 5.0])       # 5: the default
def test_a_host_frozen_mid_apply_fails_alone_and_the_fleet_reports(lab: Lab, tmp_path: Path,
                                                                 heartbeat: float) -> None:
    """Before: the run waited on the frozen host until TCP gave up, minutes after the other host
    was done, with no summary and no report; the host's download went on by itself."""
    frozen, healthy = lab.add(2)
    report = tmp_path / "report"
    lab.world.hub.throttle_bps = 1_500_000
    beat = ["--heartbeat", str(heartbeat)] if heartbeat != 5.0 else []
    proc = lab.spawn("apply", "--limit", f"{frozen.name}:{healthy.name}", *beat,
                     "--report", str(report), log_dir=tmp_path / "logs")
    try:
        wait_until(downloading(frozen), 120)
        with frozen.sshd.frozen() as pids:
            assert pids
            froze = time.monotonic()
            lab.world.hub.throttle_bps = None
            failed = lambda: [e for e in events(tmp_path / "logs", frozen) if e["event"] == "failed"]  # noqa: E731
            wait_until(lambda: bool(failed()), 3 * heartbeat + 10)
            detected = time.monotonic() - froze
            # Still frozen: its commands stopped by themselves (our heartbeat no longer reached them),
            # and its lock went with them.
            wait_until(lambda: not started_through(frozen.sshd), 3 * heartbeat + GRACE + 5)
            stopped = time.monotonic() - froze
            assert lock_free(frozen)
            out, _ = proc.communicate(timeout=300)
            finished = time.monotonic() - froze
    finally:
        lab.world.hub.throttle_bps = None
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out
    assert f"{frozen.name}: no answer to the heartbeat for" in failed()[0]["error"]
    assert "2 hosts: 1 changed, 0 unchanged, 1 failed" in out, out
    data = json.loads((report / "report.json").read_text())
    rows = {h["host"]: h for h in data["hosts"]}
    assert rows[healthy.name]["status"] == "passed" and rows[frozen.name]["status"] != "passed"
    figure(f"frozen host: its failure after {detected:.1f} s (heartbeat {heartbeat:g} s, 3 missed), "
           f"its commands stopped on the host after {stopped:.1f} s, the run's summary and report "
           f"{finished:.1f} s after the freeze")
    # Thawed, it converges: the download resumes.
    code, again = lab.run("apply", "--limit", frozen.name, "--no-verify")
    assert code == 2, again


@pytest.mark.parametrize("heartbeat", [HEARTBEAT, 5.0])       # 5: the default
def test_a_partitioned_controller_lets_the_next_apply_in(lab: Lab, tmp_path: Path, heartbeat: float) -> None:
    """Before: the stopped controller's lock holder read its stdin, which neither ended nor spoke;
    the next apply waited out its --lock-timeout (TCP would have given up after minutes)."""
    (host,) = lab.add(1)
    lab.world.hub.throttle_bps = 1_000_000
    beat = ["--heartbeat", str(heartbeat)] if heartbeat != 5.0 else []
    first = lab.spawn("apply", "--limit", host.name, "--no-verify", *beat, log_dir=tmp_path / "a")
    try:
        wait_until(downloading(host), 120)
        first.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        lab.world.hub.throttle_bps = None
        wait_until(lambda: lock_free(host), 3 * heartbeat + GRACE + 5)
        released = time.monotonic() - stopped_at
        wait_until(lambda: not started_through(host.sshd), GRACE + 5)
        quiet = time.monotonic() - stopped_at
        code, out = lab.run("apply", "--limit", host.name, "--no-verify", "--lock-timeout", "30")
        took = time.monotonic() - stopped_at
    finally:
        lab.world.hub.throttle_bps = None
        first.send_signal(signal.SIGCONT)
        first.kill()
        first.communicate()
    assert code == 2, out
    assert "waiting for the lock" not in out
    figure(f"partitioned controller: its lock released {released:.1f} s after it stopped answering "
           f"(heartbeat {heartbeat:g} s), its commands gone after {quiet:.1f} s; the next apply "
           f"converged the host {took:.1f} s after the partition")


def test_applies_that_meet_on_one_host_take_turns(lab: Lab, tmp_path: Path) -> None:
    """Three applies started together: one changes the host; the others wait for its lock, then
    find nothing to do. No step of one runs between the steps of another."""
    (host,) = lab.add(1)
    lab.world.hub.throttle_bps = 2_000_000
    started = time.monotonic()
    try:
        procs = [lab.spawn("apply", "--limit", host.name, "--no-verify", "--lock-timeout", "300",
                           log_dir=tmp_path / str(i)) for i in range(3)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        lab.world.hub.throttle_bps = None
    total = time.monotonic() - started
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 0, 2], outs
    winner = codes.index(2)
    logs = {i: events(tmp_path / str(i), host) for i in range(3)}
    changed = [i for i, log in logs.items() if any(e["event"] == "change" for e in log)]
    assert changed == [winner]
    done = max(e["t"] for e in logs[winner])
    for i in (i for i in range(3) if i != winner):
        assert "waiting for the lock held by" in outs[i], outs[i]
        assert all(e["t"] > done for e in logs[i] if e["event"] == "step")
    code, out = lab.run("plan", "--limit", host.name)
    assert code == 0, out
    figure(f"three applies on one host: one changed it, two waited for its lock and found nothing to do; "
           f"all three done in {total:.1f} s")
