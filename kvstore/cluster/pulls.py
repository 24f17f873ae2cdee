"""Remote hits: chunks this node lacks and peers hold, pulled into its arena before a reader gets them.

The directory says who holds each chunk; each holder is asked for its batch over its link, all at once,
the nearest holder in memory first, the next one if that fails, within cluster.pull_timeout_s. Chunks
stream from the holder's pinned slots straight into reserved slots here and are verified before they
are committed (transfers.py). A chunk that could not be pulled is a miss with its reason, never a hang.
Two requests wanting the same chunk pull it once: the second waits for the first.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from ..codec import HEADER_BYTES
from ..errors import KVStoreError
from ..vocab import MissReason, Tier, fastest_tier, split_keys
from ..wire.framing import pack
from .context import MemberContext
from .holders import HolderQueries
from .link import NO_REPLY, LinkError, failure
from .transfers import PULL_CONN, description_of, pinned_chunks, receive_chunks, send_chunks

log = logging.getLogger("kvstore.cluster")


class Puller:
    """Thread-safe."""

    def __init__(self, ctx: MemberContext, queries: HolderQueries):
        self.ctx = ctx
        self.queries = queries
        self._pulling: dict[bytes, threading.Event] = {}  # keys some request is pulling right now
        self._lock = threading.Lock()

    def pull_missing(self, digest: bytes, blob: bytes, prefix: bool) -> tuple[set[int], dict[int, MissReason]]:
        """Bring the chunks among `blob`'s keys that this node lacks and peers hold into the arena, batched
        per holder, within cluster.pull_timeout_s. With `prefix`, only up to the first chunk nobody holds.
        Returns (indexes pulled, {index: reason} for chunks that could not be)."""
        deadline = time.monotonic() + self.ctx.cfg.pull_timeout_s
        missing = np.flatnonzero(self.queries.local_tiers(digest, blob) == Tier.NONE).tolist()
        if not missing or not self.ctx.membership.peers():
            return set(), {}
        keys = split_keys(blob)
        # Keys another request is pulling already: wait for it instead of pulling twice.
        mine: list[int] = []
        waits: list[threading.Event] = []
        with self._lock:
            for i in missing:
                event = self._pulling.get(keys[i])
                if event is None:
                    self._pulling[keys[i]] = threading.Event()
                    mine.append(i)
                else:
                    waits.append(event)
        reasons: dict[int, MissReason] = {}
        pulled: set[int] = set()
        try:
            if mine:
                pulled, reasons = self._pull(digest, keys, mine, prefix, deadline)
        finally:
            with self._lock:
                for i in mine:
                    self._pulling.pop(keys[i]).set()
        for event in waits:
            event.wait(max(0.0, deadline - time.monotonic()))
        return pulled, reasons

    def prefetch(self, digest: bytes, blob: bytes) -> int:
        """Start pulling the chunks among `blob`'s keys missing here, in the background; returns how many
        are missing locally (a later acquire waits for the pulls in progress)."""
        missing = int((self.queries.local_tiers(digest, blob) == Tier.NONE).sum())
        if missing and self.ctx.membership.peers():
            threading.Thread(target=self.pull_missing, args=(digest, blob, True), daemon=True,
                             name="kvstore-prefetch").start()
        return missing

    def _pull(self, digest: bytes, keys: list[bytes], wanted: list[int], prefix: bool, deadline: float):
        holders, unanswered = self.queries.holders([keys[i] for i in wanted], deadline)
        reasons: dict[int, MissReason] = {}
        plan: dict[int, list[str]] = {}  # index -> holders, best first
        rtt = {node: peer.rtt_s for node, peer in self.ctx.membership.peers().items()}
        for i, candidates in zip(wanted, holders):
            if not candidates:
                reasons[i] = MissReason.DIRECTORY_UNAVAILABLE if unanswered else MissReason.NOT_FOUND
                continue
            plan[i] = sorted(candidates, key=lambda n: (fastest_tier(candidates[n]) == Tier.DISK,
                                                        rtt.get(n, float("inf"))))
        if prefix and reasons:  # beyond the first chunk nobody holds, a prefix read stops anyway
            first_gap = min(reasons)
            plan = {i: c for i, c in plan.items() if i < first_gap}
        pulled: set[int] = set()
        attempt = 0
        while plan and time.monotonic() < deadline:
            by_holder: dict[str, list[int]] = {}
            for i, candidates in plan.items():
                if attempt < len(candidates):
                    by_holder.setdefault(candidates[attempt], []).append(i)
            if not by_holder:
                break
            asked = []
            for node, indexes in by_holder.items():
                peer = self.ctx.membership.peer(node)
                try:
                    if peer is None:
                        raise LinkError(MissReason.REMOTE_UNAVAILABLE, f"{node[:8]} left")
                    request = {"ns": digest, "keys": b"".join(keys[i] for i in indexes)}
                    asked.append((indexes, peer.link, peer.link.send("export", request, deadline)))
                except LinkError as exc:
                    asked.append((indexes, None, exc))
            for indexes, link, conn in asked:  # all in flight; collect in order
                got, failed = self._collect(digest, keys, indexes, link, conn, deadline)
                pulled.update(got)
                reasons.update(failed)
                for i in got:
                    plan.pop(i, None)
                    reasons.pop(i, None)
            attempt += 1
        for i in plan:
            reasons.setdefault(i, MissReason.REMOTE_TIMEOUT)
        self.ctx.counters.add("remote_pulled_chunks", len(pulled))
        for reason in reasons.values():
            self.ctx.counters.add(reason.counter)
        return pulled, reasons

    def _collect(self, digest, keys, indexes, link, conn, deadline) -> tuple[list[int], dict[int, MissReason]]:
        """Receive one holder's chunks over its link, straight into the arena. (indexes pulled, reasons)."""
        if isinstance(conn, LinkError):
            return [], {i: conn.reason for i in indexes}
        wanted = [keys[i] for i in indexes]
        try:
            reply = conn.reply(deadline)
            reasons = {n: MissReason.REMOTE_EVICTED for n in range(len(wanted))}  # the directory said so
            got, failed = [], {}
            if reply["found"]:
                got, failed = receive_chunks(self.ctx.store, PULL_CONN, digest, wanted, reply["found"], reply["sizes"],
                                             reply["geometry"], reply.get("description") or {},
                                             lambda view: conn.read_into(view, deadline))
        except Exception as exc:  # the stream is out of step: the connection is not reused
            conn.close()
            error = failure(exc, link.node)
            if not isinstance(exc, (OSError, KVStoreError)):
                log.warning("pull from %s failed: %r", link.node[:8], exc)
            return [], {i: error.reason for i in indexes}
        link.done(conn)
        reasons.update(failed)
        for n in got:
            reasons.pop(n, None)
        self.ctx.counters.add("link_pulled_chunks", len(got))
        self.ctx.counters.add("remote_pulled_bytes", self.ctx.store.arena_bytes([wanted[n] for n in got]))
        return [indexes[n] for n in got], {indexes[n]: reason for n, reason in reasons.items()}

    def serve_export(self, sock, frames, args: dict):
        """The link op `export` (ns, keys): a reply frame (found indexes, chunk sizes, the namespace's
        geometry and description), then each found chunk's header and payload from its pinned slot."""
        digest, keys = args.get("ns"), split_keys(args.get("keys"))
        try:
            geometry = self.ctx.store.namespace(digest).geometry.to_wire()
        except KVStoreError:
            return {"found": [], "sizes": []}
        with pinned_chunks(self.ctx.store, digest, keys) as (found, pairs):
            sizes = [HEADER_BYTES + payload.size for _, payload in pairs]
            sock.sendall(pack(["ok", {"found": found, "sizes": sizes, "geometry": geometry,
                                      "description": description_of(self.ctx.store, digest)}]))
            send_chunks(sock.sendall, pairs)
        self.ctx.counters.add("link_exported_chunks", len(found))
        return NO_REPLY
