"""What every room of a cluster member shares: its configuration, its node's store, the members and the
counts; and the thread that drains a room's queue of work."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..agent import NodeStore
from ..agent.counters import Counters
from ..config import ClusterConfig
from .membership import Membership

log = logging.getLogger("kvstore.cluster")


@dataclass(frozen=True)
class MemberContext:
    cfg: ClusterConfig
    store: NodeStore
    membership: Membership
    counters: Counters


class Drainer:
    """One thread that takes queued work in batches and does it; `wait` returns once everything queued so
    far is done. A subclass says what is queued (`_has_work`), how a batch is taken (`_take`, under the
    lock) and what doing it is (`_do`, without the lock; an exception is logged and the loop goes on)."""

    linger_s = 0.0  # how long work may gather before a batch is taken

    def __init__(self, name: str):
        self._cv = threading.Condition()
        self._busy = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"kvstore-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def wait(self, timeout: float) -> bool:
        """Until everything queued so far is done (or `timeout`)."""
        with self._cv:
            return self._cv.wait_for(lambda: not (self._has_work() or self._busy), timeout)

    def _queued(self) -> None:
        """Call under `self._cv` after queueing work."""
        self._cv.notify()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            with self._cv:
                while not self._has_work() and not self._stopping.is_set():
                    self._cv.wait(0.5)
            if self._stopping.is_set():
                return
            if self.linger_s:
                time.sleep(self.linger_s)
            with self._cv:
                batch = self._take()
                self._busy += 1
            try:
                self._do(batch)
            except Exception:
                log.exception("%s failed", self._thread.name)
            finally:
                with self._cv:
                    self._busy -= 1
                    self._cv.notify_all()

    def _has_work(self) -> bool:
        raise NotImplementedError

    def _take(self) -> Any:
        raise NotImplementedError

    def _do(self, batch: Any) -> None:
        raise NotImplementedError
