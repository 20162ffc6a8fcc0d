"""Fleet runner: forks, rolling batches, max-fail, one failure never stops the others, Ctrl-C and
SIGTERM stop them all."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from provisioner.errors import ConnectError, Interrupted
from provisioner.config.inventory import Host
from provisioner.plan.fleet import SkippedError, Stop, batches, run_fleet

HOSTS = [Host(f"h{i}") for i in range(10)]


def test_batches_by_count_and_percentage():
    assert [len(b) for b in batches(HOSTS, 4)] == [4, 4, 2]
    assert [len(b) for b in batches(HOSTS, "30%")] == [3, 3, 3, 1]
    assert [len(b) for b in batches(HOSTS, None)] == [10]
    assert batches([], None) == []


def test_results_keep_inventory_order_and_capture_exceptions():
    def work(host):
        if host.name == "h3":
            raise ConnectError("h3: connection refused")
        time.sleep(0.01 * (10 - int(host.name[1:])))  # finish in reverse order
        return host.name.upper()

    results = run_fleet(HOSTS, work, forks=5)
    assert list(results) == [h.name for h in HOSTS]
    assert isinstance(results["h3"], ConnectError)
    assert results["h9"] == "H9"


def test_forks_bound_parallelism():
    running, peak, lock = [0], [0], threading.Lock()

    def work(host):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return True

    run_fleet(HOSTS, work, forks=3)
    assert peak[0] == 3


def test_max_fail_percentage_stops_later_batches():
    seen = []

    def work(host):
        seen.append(host.name)
        if host.name in {"h0", "h1"}:
            raise RuntimeError("boom")
        return "ok"

    results = run_fleet(HOSTS, work, forks=2, serial=2, max_fail_percentage=50)
    assert sorted(seen) == ["h0", "h1"]
    assert all(isinstance(results[f"h{i}"], SkippedError) for i in range(2, 10))
    assert "not attempted" in str(results["h5"])


@pytest.mark.parametrize("failing, expect_all_run", [({"h0"}, True), ({"h0", "h1"}, False)])
def test_failed_outcomes_count_toward_max_fail(failing, expect_all_run):
    results = run_fleet(HOSTS, lambda h: h.name in failing, forks=2, serial=2,
                        max_fail_percentage=50, failed=lambda outcome: outcome)
    ran = [r for r in results.values() if not isinstance(r, SkippedError)]
    assert (len(ran) == 10) is expect_all_run


@pytest.mark.parametrize("serial, reason", [
    ("abc", "neither a host count"), ("0", "give at least 1"), (-2, "give at least 1"),
    ("150%", "not a share of hosts"), ("0%", "not a share of hosts"), ("nan%", "not a share of hosts"),
])
def test_batches_refuse_a_serial_that_means_nothing(serial, reason):
    with pytest.raises(ValueError, match=reason):
        batches(HOSTS, serial)


# -- Ctrl-C and SIGTERM ----------------------------------------------------------------------------

class FakeConnection:
    """What a host's work blocks on: a remote command that ends when its connection is aborted."""

    def __init__(self) -> None:
        self.aborted = threading.Event()
        self.reason = ""

    def abort(self, reason: str) -> None:
        self.reason = reason
        self.aborted.set()


@pytest.mark.parametrize("how, why", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_a_stop_aborts_running_hosts_and_starts_no_other(how, why):
    """Two forks: h0 is done at once, h1 and h2 are running when the signal comes, h3..h9 wait for a
    fork. Before, the KeyboardInterrupt became one host's result and the others ran to completion."""
    from provisioner.cli import _terminate_as_interrupt

    stop, started, both_running = Stop(), [], threading.Barrier(2)

    def work(host):
        started.append(host.name)
        if host.name == "h0":
            return "done"
        conn = FakeConnection()
        with stop.watch(host.name, conn):
            both_running.wait(5)
            if host.name == "h1":
                threading.Timer(0.1, os.kill, (os.getpid(), how)).start()
            assert conn.aborted.wait(10), "the stop did not abort this host's connection"
            raise ConnectError(conn.reason)

    begun = time.monotonic()
    with _terminate_as_interrupt():
        results = run_fleet(HOSTS, work, forks=2, stop=stop)
    assert time.monotonic() - begun < 3
    assert stop.why == why and stop.running == {"h1", "h2"}
    assert sorted(started) == ["h0", "h1", "h2"]           # nobody started after the stop
    assert results["h0"] == "done"
    assert str(results["h1"]) == f"h1: interrupted ({why})"
    assert str(results["h2"]) == f"h2: interrupted ({why})"
    for name in (f"h{i}" for i in range(3, 10)):
        assert isinstance(results[name], Interrupted) and str(results[name]) == f"{name}: not started ({why})"
    assert list(results) == [h.name for h in HOSTS]


def test_a_host_connecting_after_the_stop_is_aborted_at_once():
    stop = Stop()
    stop("Ctrl-C")
    conn = FakeConnection()
    with stop.watch("h1", conn):
        assert conn.aborted.is_set() and conn.reason == "h1: interrupted (Ctrl-C)"
    with pytest.raises(Interrupted, match=r"^h1: interrupted \(Ctrl-C\)$"):
        stop.check("h1")


def test_a_canary_batch_comes_first_then_the_serial_batches():
    assert [len(b) for b in batches(HOSTS, 4, first=1)] == [1, 4, 4, 1]
    assert [len(b) for b in batches(HOSTS, None, first=2)] == [2, 8]
    assert [len(b) for b in batches(HOSTS, "30%", first=1)] == [1, 3, 3, 3]   # a share of all the hosts
    assert [len(b) for b in batches(HOSTS[:2], None, first=5)] == [2]
    assert batches(HOSTS, None, first=1)[0] == [HOSTS[0]]


def test_halt_ends_the_rollout_after_its_batch_and_later_hosts_are_never_started():
    seen = []

    def work(host):
        seen.append(host.name)
        return "bad" if host.name == "h0" else "ok"

    def halt(batch):
        return "h0 was rolled back" if "bad" in batch.values() else None

    results = run_fleet(HOSTS, work, forks=4, canary=1, serial=3, halt=halt)
    assert seen == ["h0"] and results["h0"] == "bad"
    assert all(str(results[f"h{i}"]) == f"h{i}: not attempted: h0 was rolled back" for i in range(1, 10))
    results = run_fleet(HOSTS, work, forks=4, canary=2, serial=3, halt=lambda batch: None)
    assert all(v in ("ok", "bad") for v in results.values())
