"""Per-run memo for control-machine lookups that every host's plan repeats (Hub metadata, release
listings): hosts plan in parallel threads, so concurrent callers of one key wait for the first
answer instead of each asking the same server."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class SingleFlight(Generic[V]):
    def __init__(self) -> None:
        self._values: dict[Hashable, V] = {}
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value for `key`, made once; an exception is not remembered (the next call retries)."""
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._values:
                self._values[key] = make()
            return self._values[key]

    def clear(self) -> None:
        with self._guard:
            self._values.clear()
            self._locks.clear()
