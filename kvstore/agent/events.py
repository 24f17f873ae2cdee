"""The agent's event feed: what the node directory saw change, for watchers (`events` op, WatchEvents).

A bounded ring of (seq, unix time, kind, namespace id, tier, key blob). Sequence numbers are
consecutive, so a watcher that polls with the last seq it saw learns how many it missed when the ring
has moved past them.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import NamedTuple

EVENT_BUFFER = 4096  # events kept for watchers; older ones are dropped


class Event(NamedTuple):
    seq: int
    time: float  # unix seconds
    kind: str  # "stored", "removed" or "cleared"
    ns_id: int
    tier: int  # tier code (0 for cleared)
    keys: bytes  # blob of 16-byte keys


class EventPage(NamedTuple):
    events: list[Event]
    next: int  # the seq to ask from next time
    dropped: int  # events after `since` no longer buffered
    last: int  # the newest seq


class EventFeed:
    """Thread-safe; `append` is called wherever the directory changes."""

    def __init__(self, capacity: int = EVENT_BUFFER):
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=capacity)
        self._seq = 0

    def append(self, kind: str, ns_id: int, tier: int, keys: bytes) -> None:
        with self._lock:
            self._seq += 1
            self._events.append(Event(self._seq, time.time(), kind, ns_id, tier, keys))

    def since(self, since: int, limit: int) -> EventPage:
        """At most `limit` events after seq `since`, oldest first."""
        with self._lock:
            first = self._events[0].seq if self._events else self._seq + 1
            skip = max(0, since + 1 - first)  # sequence numbers in the ring are consecutive
            page = list(itertools.islice(self._events, skip, skip + limit))
            return EventPage(page, page[-1].seq if page else max(since, self._seq),
                             max(0, first - since - 1), self._seq)
