"""Telling the cluster directory what this node holds: its holdings changes, batched per directory owner.

The store reports every change of its node directory (under its lock: only queued here); a thread
gathers them for a moment and sends one batch per owner, all in flight at once, with a deadline. An
owner that fails loses its batch: the directory is advice, rebuilt when membership changes.
"""

from __future__ import annotations

import time

import numpy as np

from ..vocab import MissReason, pick_keys
from .context import Drainer, MemberContext
from .directory import DirectoryShard, by_owner
from .link import LinkError

class Publisher(Drainer):
    """Thread-safe; `changed` is the store's holdings listener."""

    linger_s = 0.002  # gather holdings changes this long into one batch per owner

    def __init__(self, ctx: MemberContext, shard: DirectoryShard):
        super().__init__("publisher")
        self.ctx = ctx
        self.shard = shard
        self._pending: dict[bytes, int] = {}  # holdings changes not yet sent to the directory owners

    def changed(self, keys: list[bytes], bits: list[int]) -> None:
        """The store's holdings listener (called under its directory's lock): queue the change."""
        with self._cv:
            self._pending.update(zip(keys, bits))
            self._queued()

    def republish(self) -> None:
        """Queue everything this node holds (the owners of our keys may have changed)."""
        keys, bits = self.ctx.store.holdings()
        self.changed(keys, bits.tolist())

    def _has_work(self) -> bool:
        return bool(self._pending)

    def _take(self) -> dict[bytes, int]:
        batch, self._pending = self._pending, {}
        return batch

    def _do(self, batch: dict[bytes, int]) -> None:
        if batch:
            self._send(list(batch), bytes(batch.values()))

    def _send(self, keys: list[bytes], bits: bytes) -> None:
        """One batch per directory owner, all in flight at once, within cluster.call_timeout_s."""
        blob = b"".join(keys)
        bits_array = np.frombuffer(bits, dtype=np.uint8)
        deadline = time.monotonic() + self.ctx.cfg.call_timeout_s
        membership, counters = self.ctx.membership, self.ctx.counters
        me = membership.node
        sent = []
        for node, picked in by_owner(blob, membership.members()):
            if node == me:
                self.shard.apply(me, [keys[i] for i in picked.tolist()], bits_array[picked].tolist())
                continue
            peer = membership.peer(node)
            try:
                if peer is None:
                    raise LinkError(MissReason.REMOTE_UNAVAILABLE, f"{node[:8]} left")
                args = {"node": me, "keys": pick_keys(blob, picked), "bits": bits_array[picked].tobytes()}
                sent.append((peer.link, peer.link.send("apply", args, deadline)))
            except LinkError:
                counters.add("directory_updates_lost")
        for link, conn in sent:
            try:
                link.reply(conn, deadline)
            except LinkError:
                counters.add("directory_updates_lost")
        counters.add("directory_updates_sent", len(keys))

