"""Replication: each chunk a client commits gets r-1 extra copies on other nodes (cluster.replication).

The targets of a chunk are the nodes after the writer in its rendezvous ranking (placement.py). A thread
takes the committed chunks in batches, one per namespace, and pushes each target its chunks over its
link, all targets at once, straight from pinned arena slots; the target receives them into its arena as
a pull would (transfers.py). A copy that fails is counted, never retried: the chunk is still held here.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from ..codec import HEADER_BYTES
from ..errors import InvalidArgument
from ..vocab import split_keys
from .context import Drainer, MemberContext
from .link import LinkError, failure
from .placement import replica_targets
from .publisher import Publisher
from .transfers import REPLICA_CONN, check_stream, description_of, drain, pinned_chunks, receive_chunks, send_chunks

log = logging.getLogger("kvstore.cluster")


class Replicator(Drainer):
    """Thread-safe; `committed` is the store's commit listener."""

    def __init__(self, ctx: MemberContext, publisher: Publisher):
        super().__init__("replicator")
        self.ctx = ctx
        self.publisher = publisher
        self._queue: deque[tuple[bytes, list[bytes]]] = deque()

    def committed(self, conn: int, digest: bytes, keys: list[bytes]) -> None:
        """The store's commit listener: a client's commit stored new chunks (chunks received from peers,
        conn < 0, are never replicated again); queue their extra copies."""
        if conn > 0 and self.ctx.cfg.replication > 1:
            with self._cv:
                self._queue.append((digest, keys))
                self._queued()

    def _has_work(self) -> bool:
        return bool(self._queue)

    def _take(self) -> tuple[bytes, list[bytes]]:
        digest, keys = self._queue.popleft()
        while self._queue and self._queue[0][0] == digest:  # one batch per namespace
            keys = keys + self._queue.popleft()[1]
        return digest, keys

    def _do(self, batch: tuple[bytes, list[bytes]]) -> None:
        digest, keys = batch
        try:
            self._push(digest, keys)
        except Exception:
            log.exception("replication of %d chunks failed", len(keys))
            self.ctx.counters.add("replication_failed_chunks", len(keys))

    def _push(self, digest: bytes, keys: list[bytes]) -> None:
        """Send each chunk to the r-1 nodes after this one in its rendezvous ranking, one stream per target,
        all in flight at once, within cluster.pull_timeout_s."""
        deadline = time.monotonic() + self.ctx.cfg.pull_timeout_s
        targets = replica_targets(b"".join(keys), self.ctx.membership.members(), self.ctx.membership.node,
                                  self.ctx.cfg.replication - 1)
        by_target: dict[str, list[bytes]] = {}
        for key, nodes in zip(keys, targets):
            for node in nodes:
                by_target.setdefault(node, []).append(key)
        sent = []
        description = description_of(self.ctx.store, digest)
        for node, node_keys in by_target.items():
            peer = self.ctx.membership.peer(node)
            if peer is None:
                self.ctx.counters.add("replication_failed_chunks", len(node_keys))
                continue
            with pinned_chunks(self.ctx.store, digest, node_keys) as (found, pairs):
                if not found:
                    continue
                conn = None
                try:
                    conn = peer.link.send("import", {
                        "ns": digest, "keys": b"".join(node_keys[i] for i in found),
                        "sizes": [HEADER_BYTES + payload.size for _, payload in pairs],
                        "geometry": self.ctx.store.namespace(digest).geometry.to_wire(), "description": description},
                        deadline)
                    send_chunks(lambda data: conn.send_bytes(data, deadline), pairs)
                    sent.append((len(found), peer.link, conn))
                except (LinkError, OSError) as exc:
                    if conn is not None:
                        conn.close()
                    log.debug("replication to %s failed: %s", node[:8], failure(exc, node))
                    self.ctx.counters.add("replication_failed_chunks", len(found))
        for count, link, conn in sent:
            try:
                self.ctx.counters.add("replicated_chunks", link.reply(conn, deadline)["held"])
            except LinkError:
                self.ctx.counters.add("replication_failed_chunks", count)

    def serve_import(self, sock, frames, args: dict) -> dict:
        """The link op `import` (ns, keys, sizes, geometry, description), followed by each chunk's header
        and payload: a peer's extra copies, received into this node's arena."""
        sizes = args.get("sizes")
        if not isinstance(sizes, list) or not all(isinstance(s, int) and s > HEADER_BYTES for s in sizes):
            raise InvalidArgument("import needs the size of every chunk it streams")  # nothing can be read past
        digest, blob = args.get("ns"), args.get("keys")
        try:
            keys = split_keys(blob)
            check_stream(keys, list(range(len(sizes))), sizes)
            if not isinstance(digest, bytes) or not isinstance(args.get("geometry"), list):
                raise InvalidArgument("import needs ns (bytes) and geometry")
        except Exception:
            drain(sock, frames, sum(sizes))  # the stream stays in step: the next request can be read
            raise
        held, _ = receive_chunks(self.ctx.store, REPLICA_CONN, digest, keys, list(range(len(keys))), sizes,
                                 args["geometry"], args.get("description") or {}, frames.read_into)
        self.publisher.wait(self.ctx.cfg.call_timeout_s)  # the writer's flush then covers our directory entry
        return {"held": len(held)}
