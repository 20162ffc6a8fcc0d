"""`provision apply` over real sshd hosts: convergence, idempotence without writes, interruption at
several points (a killed controller, Ctrl-C, SIGTERM), step time limits, the host lock, and a fleet
with an unreachable host."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from lab import Lab, LabHost, mtimes, open_lab, tree_state
from sshd import started_through, wait_until

from provisioner.catalog import models as catalog

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-apply"), model_bytes=4 << 20) as lab:
        yield lab


def expected_models(host: LabHost, lab: Lab) -> dict[Path, str]:
    sel = catalog.resolve("qwen-image-edit-2509", "lightning-4step-r128", "int4", None)   # an RTX 3090 host
    return {host.comfy / "models" / f.folder / f.filename:
            hashlib.sha256(lab.world.files[(f.repo, f.path_in_repo)]).hexdigest() for f in sel.files}


def assert_converged(lab: Lab, host: LabHost) -> None:
    code, out = lab.run("plan", "--limit", host.name)
    assert code == 0, out
    for path, sha in expected_models(host, lab).items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
        assert not path.with_name(path.name + ".part").exists()


def test_fresh_host_converges_and_second_apply_changes_nothing(lab: Lab) -> None:
    (host,) = lab.add(1)
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    assert "1 changed, 0 unchanged, 0 failed" in out
    assert "handler: restarted ComfyUI" in out
    assert_converged(lab, host)

    before_tree, before_mtimes = tree_state(host.sandbox.root), mtimes(host.sandbox.root)
    since = host.sshd.log_size()
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 0, out
    assert "0 changed, 1 unchanged, 0 failed" in out
    assert tree_state(host.sandbox.root) == before_tree
    assert mtimes(host.sandbox.root) == before_mtimes          # no write at all, not even the lock
    assert host.sshd.wait_counts(1, 1, since=since) == (1, 1)  # one connection, one exec


def settled_counts(host: LabHost, since: int) -> tuple[int, int]:
    """(connections, sessions) in the host's sshd log since `since`, once two reads 0.3 s apart
    agree: sshd's children log asynchronously, so the first read may miss a late line."""
    previous = None
    while True:
        time.sleep(0.3)
        now = (host.sshd.count_connections(since), host.sshd.count_sessions(since))
        if now == previous:
            return now
        previous = now


def test_a_converged_fleet_costs_one_connection_and_one_exec_per_host(lab: Lab) -> None:
    """The no-op path's round-trip budget, held for every host of a fleet, for plan and apply, with
    the controller's records (Hub answers, schema verdicts, venv answers) warm, as a re-run has them."""
    hosts = lab.add(2)
    code, out = lab.run("apply", "--no-verify")
    assert code == 2, out
    for verb in ("apply", "plan", "apply"):
        since = {h.name: h.sshd.log_size() for h in hosts}
        code, out = lab.run(verb, *(("--no-verify",) if verb == "apply" else ()))
        assert code == 0, out
        for h in hosts:
            assert settled_counts(h, since[h.name]) == (1, 1), (verb, h.name)


# The sessions sshd starts (execs and the SFTP channel) for a first converge of a lab host, as
# measured: the facts, pip's dry run of the packages, the lock, the facts again under it (the lock
# made .provision/, which those facts did not see: remote.lock_untouched), the snapshot before, the owed restart's record, one exec per step of each change (plugin clone 1,
# backend 2, packages 1, 3 downloads, the workflows' SFTP writes), the restart and the wait until
# ready, the record's removal, the facts to confirm, the snapshot after. It was 27 while the plan
# made again under the lock ran pip's dry run again (plan/preview.py: DryRuns), 26 while the hold
# program ran apart from each pip install (resources/hold.py), 24 while a clone was five commands
# (remote.CLONE) and the workflows' folder had a mkdir of its own (a put makes it).
FIRST_CONVERGE_SESSIONS = 18


def test_a_first_converge_costs_at_most_its_budget_of_execs(lab: Lab, tmp_path: Path) -> None:
    """The first converge's round-trip budget: each exec starts a supervisor (and most a program)
    on the host, which a fleet on shared cores pays in CPU; one connection for all of them. The
    apply's log says what the commands cost the host, by kind, as their supervisors measured it."""
    (host,) = lab.add(1)
    since = host.sshd.log_size()
    proc = lab.spawn("apply", "--limit", host.name, "--no-verify", log_dir=tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out
    connections, sessions = settled_counts(host, since)
    assert connections == 1
    assert sessions <= FIRST_CONVERGE_SESSIONS, sessions
    (done,) = [e for e in log_events(tmp_path, host) if e["event"] == "done"]
    cost = done["host_cpu"]
    # pip's three starts: the packages' dry run once (the plan under the lock reuses it), two installs
    assert (cost["pip dry run"]["commands"], cost["pip install"]["commands"]) == (1, 2), cost
    assert cost["facts"]["commands"] == 3 and cost["snapshot"]["commands"] == 2, cost
    assert "hold" not in cost, cost            # each install writes its own constraints file first
    # every finished command is counted: the sessions add the lock holder and the SFTP channel
    assert sum(k["commands"] for k in cost.values()) == sessions - 2, (cost, sessions)
    assert all(k["seconds"] > 0 for k in cost.values()), cost
    # ...and each step's own share, in its log record: the steps are part of the whole
    steps = [e for e in log_events(tmp_path, host) if e["event"] == "step" and "host_cpu_s" in e]
    assert [e["step"].split(" ")[:2] for e in steps].count(["pip", "install"]) == 2
    assert sum(e["host_cpu_s"] for e in steps) <= sum(k["seconds"] for k in cost.values()) + 0.01
    # A later apply finds the lock file as the first one left it: the plan's facts stand under the
    # lock, and only the confirmation gathers them again (the one change: a workflow value).
    lab.overlays[host.name] = {"workflow": {"sampler": "dpmpp_2m"}}
    lab.write()
    again = tmp_path / "again"
    try:
        assert lab.run("apply", "--limit", host.name, "--no-verify", "--log-dir", str(again))[0] == 2
    finally:
        del lab.overlays[host.name]
        lab.write()
    (done,) = [e for e in log_events(again, host) if e["event"] == "done"]
    assert done["host_cpu"]["facts"]["commands"] == 2, done["host_cpu"]


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the apply to reach the kill point")
        time.sleep(0.01)


def log_events(log_dir: Path, host: LabHost) -> list[dict]:
    path = log_dir / f"{host.name}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def started(resource: str, log_dir: Path, host: LabHost) -> Callable[[], bool]:
    return lambda: any(e["event"] == "change" and e["resource"] == resource
                       for e in log_events(log_dir, host))


@pytest.mark.parametrize("point", ["backend", "packages", "model", "workflow"])
def test_killed_apply_converges_when_run_again(lab: Lab, tmp_path: Path, point: str) -> None:
    (host,) = lab.add(1)
    lab.world.hub.throttle_bps = 1_500_000 if point == "model" else None
    proc = lab.spawn("apply", "--limit", host.name, "--no-verify", log_dir=tmp_path)
    try:
        if point == "model":  # mid-download: part of the DiT file is on disk
            parts = lambda: list((host.comfy / "models" / "diffusion_models").glob("*.part"))  # noqa: E731
            wait_for(lambda: any(p.stat().st_size > 500_000 for p in parts()))
        else:
            wait_for(started(point, tmp_path, host))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # Whatever it ran on the host (pip, git, the download) stops with it, as does its lock holder.
        wait_until(lambda: not started_through(host.sshd), 10)
    finally:
        lab.world.hub.throttle_bps = None
        if proc.poll() is None:
            proc.kill()
    if point == "model":
        (part,) = (host.comfy / "models" / "diffusion_models").glob("*.part")
        resumed_from = part.stat().st_size
        final = part.with_name(part.name[:-5])
        assert not final.exists()                                  # never a partial file at its path
    requests_before = len(lab.world.hub.requests)
    code, out = lab.run("apply", "--limit", host.name, "--no-verify", "--lock-timeout", "20")
    assert code == 2, out
    assert_converged(lab, host)
    if point == "model":
        # Resumed, not restarted (the killed run's host process may add a few bytes before it
        # notices its controller is gone, so the resume point is at least what we saw).
        starts = [int(r.headers["Range"][6:-1]) for r in lab.world.hub.requests[requests_before:]
                  if r.headers.get("Range")]
        assert starts and min(starts) >= resumed_from > 0
    assert lab.run("apply", "--limit", host.name, "--no-verify")[0] == 0


def registered(host: LabHost) -> set[str]:
    """The node classes the host's running ComfyUI lists now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{host.port}/object_info", timeout=10) as resp:
        return set(json.load(resp))


def test_a_restart_owed_by_a_killed_apply_is_recorded_shown_and_performed(lab: Lab, tmp_path: Path) -> None:
    """Killed after every change that needs a restart and before the restart: the host says a
    restart is owed (the plan shows it, the host is not up to date), and the next apply restarts
    ComfyUI, though only the workflow is left to change, and verification passes."""
    (host,) = lab.add(1)
    proc = lab.spawn("apply", "--limit", host.name, "--no-verify", log_dir=tmp_path)
    try:
        wait_for(started("workflow", tmp_path, host))        # plugin, backend, packages, models done
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "NunchakuQwenImageDiTLoader" not in registered(host)   # the old process runs on
    marker = json.loads((host.comfy / ".provision" / "owed" / "restart-comfyui").read_text())
    assert marker["change"].startswith("plugin: clone ComfyUI-nunchaku")

    code, out = lab.run("plan", "--limit", host.name)
    assert code == 2, out
    assert "restart-comfyui owed since" in out and "by an interrupted run: plugin: clone" in out
    assert "up to date" not in out.splitlines()[0]
    code, out = lab.run("plan", "--limit", host.name, "--json")
    assert json.loads(out[:out.rindex("}") + 1])["hosts"][0]["owed"][0]["handler"] == "restart-comfyui"

    code, out = lab.run("apply", "--limit", host.name, "--lock-timeout", "20")
    assert code == 2, out
    assert "handler: restarted ComfyUI" in out and "FAIL" not in out
    assert "NunchakuQwenImageDiTLoader" in registered(host)
    assert not (host.comfy / ".provision" / "owed" / "restart-comfyui").exists()
    assert lab.run("plan", "--limit", host.name)[0] == 0


def test_a_restart_that_fails_stays_owed(lab: Lab) -> None:
    (host,) = lab.add(1)
    lab.overlays[host.name] = {"comfyui": {**host.provision_vars()["comfyui"],
                                           "restart": {"command": ["false"]}}}
    lab.write()
    try:
        code, out = lab.run("apply", "--limit", host.name, "--no-verify")
        assert code == 1 and "handler restart-comfyui failed" in out, out
        code, out = lab.run("plan", "--limit", host.name)
        assert code == 2 and "0 changes, 1 owed handler" in out, out
    finally:
        lab.overlays.clear()
        lab.write()
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2 and "handler: restarted ComfyUI" in out, out
    assert lab.run("plan", "--limit", host.name)[0] == 0


def test_what_killed_uploads_and_older_versions_left_is_removed_by_the_next_apply(lab: Lab) -> None:
    """A killed upload's temporary sibling in workflows/ (it used to stay forever), a wheel no
    longer installed: plan shows their removal, apply removes them, and then nothing is left to do."""
    (host,) = lab.add(1)
    assert lab.run("apply", "--limit", host.name, "--no-verify")[0] == 2
    workflows = host.comfy / "workflows"
    name = sorted(p.name for p in workflows.glob("*.json"))[0]
    leftover = workflows / f".{name}.1a2b3c4d.provision-tmp"
    leftover.write_text('{"half": ')
    wheels = host.comfy / ".provision" / "wheels"
    (kept,) = [p.name for p in wheels.glob("*.whl")]
    old = wheels / kept.replace(kept.split("-")[1].split("+")[0], "0.9.0", 1)
    old.write_bytes(b"PK")
    state = host.comfy / ".provision"
    (state / "owed").mkdir(exist_ok=True)
    written = [state / ".constraints.txt.1a2b3c4d.provision-tmp", state / ".checksums.json.4242.provision-tmp",
               state / "owed" / ".restart-comfyui.ab12cd34.provision-tmp"]
    for path in written:
        path.write_text("half")
    code, out = lab.run("plan", "--limit", host.name)
    assert code == 2 and "4 changes" in out, out
    assert f"remove what killed uploads left from {workflows}: {leftover.name}" in out
    assert f"remove wheels the installed backend does not use from {wheels}: {old.name}" in out
    assert f"remove what killed writes left from {state}: {written[1].name}, {written[0].name}" in out
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2 and "handler" not in out, out                  # nothing ComfyUI loads: no restart
    assert not leftover.exists() and not old.exists() and not any(p.exists() for p in written)
    assert [p.name for p in wheels.iterdir()] == [kept]
    assert lab.run("apply", "--limit", host.name, "--no-verify")[0] == 0


def test_two_concurrent_applies_do_not_interleave(lab: Lab, tmp_path: Path) -> None:
    (host,) = lab.add(1)
    lab.world.hub.throttle_bps = 700_000  # ~9 s of downloads: the second apply surely meets the lock
    try:
        first = lab.spawn("apply", "--limit", host.name, "--no-verify", log_dir=tmp_path / "a")
        wait_for(started("plugin", tmp_path / "a", host))
        second = lab.spawn("apply", "--limit", host.name, "--no-verify", log_dir=tmp_path / "b")
        out_first, _ = first.communicate(timeout=120)
        out_second, _ = second.communicate(timeout=120)
    finally:
        lab.world.hub.throttle_bps = None
    assert first.returncode == 2, out_first
    assert second.returncode == 0, out_second          # it waited, then found nothing left to do
    assert "waiting for the lock held by" in out_second
    assert not [e for e in log_events(tmp_path / "b", host) if e["event"] == "change"]
    first_done = max(e["t"] for e in log_events(tmp_path / "a", host))
    second_steps = [e["t"] for e in log_events(tmp_path / "b", host) if e["event"] == "step"]
    assert all(t > first_done for t in second_steps)
    assert_converged(lab, host)


def test_an_apply_that_ran_between_the_plan_and_the_lock_is_seen(lab: Lab, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The facts of a plan are not gathered again under the lock when no apply held it since
    (remote.lock_untouched): here another control machine converges the host in between, so the
    plan is made again, finds nothing left, and nothing is applied twice."""
    from provisioner.plan import apply as apply_module

    (host,) = lab.add(1)
    real_lock = apply_module.host_lock

    @contextmanager
    def after_another_apply(*args: Any, **kwargs: Any) -> Iterator[str | None]:
        other = lab.spawn("apply", "--limit", host.name, "--no-verify", log_dir=tmp_path / "other")
        out, _ = other.communicate(timeout=600)
        assert other.returncode == 2, out
        with real_lock(*args, **kwargs) as found:
            yield found

    monkeypatch.setattr(apply_module, "host_lock", after_another_apply)
    code, out = lab.run("apply", "--limit", host.name, "--no-verify", "--log-dir", str(tmp_path / "this"))
    assert code == 0 and "up to date" in out, out             # planned again under the lock: nothing left
    assert not [e for e in log_events(tmp_path / "this", host) if e["event"] in ("change", "step")]
    assert_converged(lab, host)


def test_lock_timeout_is_a_clear_failure(lab: Lab, tmp_path: Path) -> None:
    (host,) = lab.add(1)
    lab.world.hub.throttle_bps = 700_000
    try:
        first = lab.spawn("apply", "--limit", host.name, "--no-verify", log_dir=tmp_path)
        wait_for(started("plugin", tmp_path, host))
        code, out = lab.run("apply", "--limit", host.name, "--no-verify", "--lock-timeout", "0.5")
        first.communicate(timeout=120)
    finally:
        lab.world.hub.throttle_bps = None
    assert code == 1
    assert "another apply holds" in out and "--lock-timeout" in out
    assert "Traceback" not in out


def test_fleet_with_an_unreachable_host_converges_the_rest(lab: Lab) -> None:
    a, b = lab.add(2)
    lab.add_unreachable()
    try:
        code, out = lab.run("apply", "--limit", f"{a.name}:{b.name}:gpu-down", "--no-verify")
    finally:
        lab.extra_hosts.clear()
        lab.write()
    assert code == 1, out
    assert "3 hosts: 2 changed, 0 unchanged, 1 failed" in out
    assert "gpu-down" in out and "refused" in out
    assert_converged(lab, a)
    assert_converged(lab, b)


def test_check_mode_is_plan(lab: Lab) -> None:
    (host,) = lab.add(1)
    before = tree_state(host.sandbox.root)
    code, out = lab.run("apply", "--limit", host.name, "--check")
    assert code == 2 and "8 changes" in out
    assert tree_state(host.sandbox.root) == before


def lock_free(host: LabHost) -> bool:
    lock = host.comfy / ".provision" / "lock"
    return not lock.exists() or subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0


@pytest.mark.parametrize("how, why", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_or_sigterm_stops_the_fleet_and_says_what_was_done(lab: Lab, tmp_path: Path,
                                                                 how: signal.Signals, why: str) -> None:
    """Two forks, three hosts: two are downloading when the signal comes, the third never starts.
    Before, the interrupt became one host's result and the others ran to completion."""
    hosts = lab.add(3)
    names = ":".join(h.name for h in hosts)
    lab.world.hub.throttle_bps = 400_000
    proc = lab.spawn("apply", "--limit", names, "--forks", "2", "--no-verify", log_dir=tmp_path)
    try:
        running = hosts[:2]
        parts = lambda h: list((h.comfy / "models").glob("*/*.part"))  # noqa: E731
        wait_for(lambda: all(any(p.stat().st_size > 100_000 for p in parts(h)) for h in running), 120)
        signalled = time.monotonic()
        proc.send_signal(how)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        lab.world.hub.throttle_bps = None
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert took < 10, f"took {took:.1f}s to stop"
    for host in running:
        assert f"{host.name}: interrupted after " in out and "(applied: plugin, backend, packages)" in out, out
        wait_until(lambda: not started_through(host.sshd), 5)        # the downloads stopped on the host
        assert lock_free(host)
    assert f"{hosts[2].name}: not started" in out
    assert not (hosts[2].comfy / "models").exists() or not parts(hosts[2])
    assert f"interrupted ({why}): 3 hosts: 0 done (0 changed, 0 unchanged, 0 failed), 2 interrupted, 1 not started" in out
    assert "Traceback" not in out and "internal error" not in out
    # Run again: nothing waits for a lock, the downloads resume, all three converge.
    code, again = lab.run("apply", "--limit", names, "--no-verify", "--lock-timeout", "0")
    assert code == 2 and "waiting for the lock" not in again, again
    for host in hosts:
        assert_converged(lab, host)


def test_a_stalled_download_is_stopped_by_its_silence_limit_and_resumed(lab: Lab, tmp_path: Path) -> None:
    (host,) = lab.add(1)
    lab.overlays[host.name] = {"timeouts": {"download_stall_s": 2}}
    lab.write()
    lab.world.hub.stall_after = 2_500_000          # the CDN goes silent, its connection open
    try:
        code, out = lab.run("apply", "--limit", host.name, "--no-verify", "--log-dir", str(tmp_path))
    finally:
        lab.world.hub.stall_after = None
    assert code == 1, out
    assert "printed nothing for 2s (stopped, with its process group)" in out
    wait_until(lambda: not started_through(host.sshd), 5)
    assert lock_free(host)
    (part,) = (host.comfy / "models" / "diffusion_models").glob("*.part")
    assert part.stat().st_size == 2 << 20                     # fetch writes whole MiB chunks
    requests_before = len(lab.world.hub.requests)
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    assert_converged(lab, host)
    starts = [r.headers.get("Range") for r in lab.world.hub.requests[requests_before:]]
    assert f"bytes={2 << 20}-" in starts                       # resumed, not started again
    del lab.overlays[host.name]
    lab.write()


def test_a_pip_install_past_its_time_limit_is_stopped_on_the_host(lab: Lab, tmp_path: Path) -> None:
    (host,) = lab.add(1)
    # Every pip install in this host's venv takes 5 s (a .pth file runs at interpreter start), so
    # the first one, the backend's, runs past its 0.3 s limit however fast the machine is. A held
    # install is `python -c HOLD install ...` (the hold program runs pip itself): match `install`,
    # not `pip`, or the backend's fast --no-deps install slips under the limit on a quick machine.
    (site,) = host.sandbox.venv.glob("lib/python3*/site-packages")
    (site / "zz-slow-pip.pth").write_text(
        "import sys, time; time.sleep(5) if 'install' in getattr(sys, 'orig_argv', ()) else None\n")
    lab.overlays[host.name] = {"timeouts": {"pip_s": 0.3}}
    lab.write()
    try:
        code, out = lab.run("apply", "--limit", host.name, "--no-verify", "--log-dir", str(tmp_path))
    finally:
        del lab.overlays[host.name]
        lab.write()
        (site / "zz-slow-pip.pth").unlink()
    assert code == 1, out
    assert "✗ backend:" in out and "timed out after 0.3s (its process group was stopped)" in out, out
    wait_until(lambda: not started_through(host.sshd), 10)    # pip and its children, gone
    assert lock_free(host)
    failed = [e for e in log_events(tmp_path, host) if e["event"] == "failed"]
    assert failed and failed[0]["resource"] == "backend" and "stderr" in failed[0]
