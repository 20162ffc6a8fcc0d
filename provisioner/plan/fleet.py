"""Run one function per host over a fleet: bounded forks, rolling batches, max-fail, Ctrl-C.

Like Fabric's GroupResult, the answer maps every host to its outcome *or* its exception, so one
unreachable host never hides or stops the others. Ctrl-C or SIGTERM (`Stop`) is not any one
host's result: no host starts after it, every running host's connection is aborted (which stops
its remote commands and releases its lock), and the hosts that never started say so.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from provisioner.errors import Interrupted, ProvisionError
from provisioner.config.inventory import Host

WIND_DOWN_S = 30.0  # after a stop, how long running hosts get to return (their connections are gone)

T = TypeVar("T")


class SkippedError(ProvisionError):
    """A host was not attempted because the rollout stopped after an earlier batch (past
    --max-fail-percentage, or a verify gate that rolled a host back)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt (cli.py)."""


class Abortable(Protocol):
    def abort(self, reason: str) -> None: ...


class Stop:
    """One fleet run's stop: why it stopped (None while it runs), which hosts were running then,
    and the connections to abort when it does."""

    def __init__(self) -> None:
        self.why: str | None = None
        self.running: set[str] = set()          # hosts whose work had begun and not ended at the stop
        self._open: dict[int, tuple[str, Abortable]] = {}
        self._lock = threading.Lock()

    def __call__(self, why: str) -> None:
        with self._lock:
            self.why = self.why or why
            opened = list(self._open.values())
        for name, conn in opened:
            conn.abort(f"{name}: interrupted ({self.why})")

    @contextmanager
    def watch(self, name: str, conn: Abortable) -> Iterator[None]:
        """Abort `conn` should the run stop while the block runs (or did already)."""
        with self._lock:
            self._open[id(conn)] = (name, conn)
            why = self.why
        try:
            if why:
                conn.abort(f"{name}: interrupted ({why})")
            yield
        finally:
            with self._lock:
                self._open.pop(id(conn), None)

    def check(self, name: str) -> None:
        """Between two pieces of a host's work: raise if the run stopped meanwhile."""
        if self.why:
            raise Interrupted(f"{name}: interrupted ({self.why})")


def parse_serial(serial: str | int) -> int | str:
    """`--serial` checked: a host count >= 1 (`2`) or a share of hosts in (0, 100] (`"30%"`).

    Raises ValueError with the reason; the answer is what `batches` takes."""
    text = str(serial).strip()
    share = text.endswith("%")
    number = text[:-1].strip() if share else text
    try:
        value = float(number) if share else int(number)
    except ValueError:
        raise ValueError(f"{text!r} is neither a host count (like 2) nor a share of hosts (like 30%)") from None
    if share and not 0 < value <= 100:
        raise ValueError(f"{text} is not a share of hosts: give a percentage above 0 and at most 100")
    if not share and value < 1:
        raise ValueError(f"{text} hosts per batch: give at least 1")
    return f"{number}%" if share else int(value)


def batches(hosts: Sequence[Host], serial: str | int | None, first: int | None = None) -> list[list[Host]]:
    """Split hosts into rolling batches: `serial` is a count (`2`) or a share of all hosts (`"30%"`);
    `first` (the canaries) is the size of the first batch."""
    head = [list(hosts[:first])] if first and hosts else []
    rest = hosts[first:] if first else hosts
    if serial is None or serial == "":
        return head + ([list(rest)] if rest else [])
    checked = parse_serial(serial)
    if isinstance(checked, str):
        size = max(1, math.floor(len(hosts) * float(checked[:-1]) / 100))
    else:
        size = checked
    return head + [list(rest[i:i + size]) for i in range(0, len(rest), size)]


def run_fleet(
    hosts: Sequence[Host],
    work: Callable[[Host], T],
    *,
    forks: int = 10,
    serial: str | int | None = None,
    max_fail_percentage: float | None = None,
    failed: Callable[[T], bool] = lambda _: False,
    canary: int | None = None,
    halt: Callable[[dict[str, T | BaseException]], str | None] | None = None,
    stop: Stop | None = None,
) -> dict[str, T | BaseException]:
    """Call `work(host)` for every host, `forks` at a time, batch after batch (the first of
    `canary` hosts).

    `failed(outcome)` tells whether a returned outcome counts as a failure for max-fail (an
    exception always does). When a batch's failures exceed `max_fail_percentage`, or `halt(the
    batch's results)` gives a reason, the remaining batches are not started and their hosts get a
    `SkippedError`: they are not even connected to. On Ctrl-C or SIGTERM, `stop` is called and
    every host answers: what it returned or raised, or `Interrupted` (not started).
    """
    stop = stop or Stop()
    results: dict[str, T | BaseException] = {}
    groups = batches(hosts, serial, canary)
    lock = threading.Lock()

    def one(host: Host) -> T:
        with lock:
            if stop.why:
                raise Interrupted(f"{host.name}: not started ({stop.why})")
            stop.running.add(host.name)
        try:
            return work(host)
        finally:
            with lock:
                if not stop.why:
                    stop.running.discard(host.name)

    pool = ThreadPoolExecutor(max_workers=max(1, forks), thread_name_prefix="host")
    futures: dict[str, Future[T]] = {}
    try:
        for index, batch in enumerate(groups):
            futures.update((host.name, pool.submit(one, host)) for host in batch)
            failures = 0
            for host in batch:
                outcome = _answer(futures[host.name], None)
                results[host.name] = outcome
                failures += isinstance(outcome, BaseException) or failed(outcome)
            reason = halt({h.name: results[h.name] for h in batch}) if halt else None
            if reason is None and max_fail_percentage is not None and batch \
                    and 100 * failures / len(batch) > max_fail_percentage:
                reason = (f"{failures}/{len(batch)} hosts failed in an earlier batch (over "
                          f"--max-fail-percentage {max_fail_percentage:g})")
            if reason is not None:
                for later in groups[index + 1:]:
                    for host in later:
                        results[host.name] = SkippedError(f"{host.name}: not attempted: {reason}")
                break
    except KeyboardInterrupt as signal:
        with lock:
            stop("SIGTERM" if isinstance(signal, Terminated) else "Ctrl-C")
        pool.shutdown(wait=False, cancel_futures=True)
        for host in hosts:
            future = futures.get(host.name)
            if host.name in results:
                continue
            if future is None or future.cancelled():
                results[host.name] = Interrupted(f"{host.name}: not started ({stop.why})")
            else:
                results[host.name] = _answer(future, WIND_DOWN_S)
    finally:
        pool.shutdown(wait=False)
    return {host.name: results[host.name] for host in hosts if host.name in results}


def _answer(future: Future[Any], timeout: float | None) -> Any:
    """What a host's work returned or raised (reported per host, never raised here)."""
    try:
        return future.result(timeout)
    except CancelledError:
        return Interrupted("not started")
    except TimeoutError:
        return Interrupted(f"still running {timeout:g}s after the stop")
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - reported per host, never raised
        return err
