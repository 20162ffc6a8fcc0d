"""Run one function per host over a fleet: bounded forks, rolling batches, max-fail.

Like Fabric's GroupResult, the answer maps every host to its outcome *or* its exception, so one
unreachable host never hides or stops the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from provisioner.errors import ProvisionError
from provisioner.config.inventory import Host

T = TypeVar("T")


class SkippedError(ProvisionError):
    """A host was not attempted because the rollout stopped after an earlier batch (past
    --max-fail-percentage, or a verify gate that rolled a host back)."""


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
    stop: Callable[[dict[str, T | BaseException]], str | None] | None = None,
) -> dict[str, T | BaseException]:
    """Call `work(host)` for every host, `forks` at a time, batch after batch (the first of
    `canary` hosts).

    `failed(outcome)` tells whether a returned outcome counts as a failure for max-fail (an
    exception always does). When a batch's failures exceed `max_fail_percentage`, or `stop(the
    batch's results)` gives a reason, the remaining batches are not started and their hosts get a
    `SkippedError`: they are not even connected to.
    """
    results: dict[str, T | BaseException] = {}
    groups = batches(hosts, serial, canary)
    with ThreadPoolExecutor(max_workers=max(1, forks), thread_name_prefix="host") as pool:
        for index, batch in enumerate(groups):
            futures = {host.name: pool.submit(work, host) for host in batch}
            failures = 0
            for name, future in futures.items():
                try:
                    outcome = future.result()
                    results[name] = outcome
                    failures += failed(outcome)
                except BaseException as err:  # noqa: BLE001 - reported per host, never raised
                    results[name] = err
                    failures += 1
            reason = stop({h.name: results[h.name] for h in batch}) if stop else None
            if reason is None and max_fail_percentage is not None and batch \
                    and 100 * failures / len(batch) > max_fail_percentage:
                reason = (f"{failures}/{len(batch)} hosts failed in an earlier batch (over "
                          f"--max-fail-percentage {max_fail_percentage:g})")
            if reason is not None:
                for later in groups[index + 1:]:
                    for host in later:
                        results[host.name] = SkippedError(f"{host.name}: not attempted: {reason}")
                break
    return {host.name: results[host.name] for host in hosts if host.name in results}
