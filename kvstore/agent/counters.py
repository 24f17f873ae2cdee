"""The agent's monotonic counters by name (the `counters` of its stats; docs/metrics.md)."""

from __future__ import annotations

import threading
from collections import Counter


class Counters:
    """Thread-safe named counts; every room of the agent adds to the same one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: Counter = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def total(self) -> int:
        """The sum of every count: it moves whenever the agent served anything."""
        with self._lock:
            return sum(self._values.values())

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
