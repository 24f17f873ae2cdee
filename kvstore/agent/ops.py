"""The agent's ops: each request decoded into its typed message, served by the store, and counted.

`AgentOps.dispatch` takes one decoded frame and returns the wire reply; the socket server
(server.py) only moves frames. A cluster member composes its `Peers` (kvstore/cluster) in: lookups
may then ask the cluster, acquires pull what peers hold first, flush also waits for replication and
the cluster directory, and three more ops exist (prefetch, pull, on_members). Every request is counted
by op and timed by the tier that served it (kvstore/recorder.py; docs/metrics.md).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Protocol

from ..errors import InvalidArgument, KVStoreError, ProtocolError
from ..layout import Geometry
from ..recorder import RequestRecorder
from ..vocab import BIT_OF_TIER, KEY_BYTES, MissReason, Op, Tier, key_count, split_keys
from ..wire.framing import PROTOCOL_VERSION, error_reply
from ..wire.messages import (REQUESTS, Acquire, AcquireReply, Chunks, Commit, Events, Evict, Flush, FlushReply,
                             Hello, HelloReply, Lookup, LookupReply, Message, Move, OnMembers, Pin, PullReply,
                             PrefetchReply, Register, Request, Reserve, Touch, Unpin)
from .leases import PIN_CONN
from .store import NodeStore

log = logging.getLogger("kvstore.agent")

# What the control plane may run on every member (on_members): operator ops, never the data path.
MEMBER_OPS = frozenset({Op.HELLO, Op.STATS, Op.LIST, Op.CHUNKS, Op.EVICT, Op.CLEAR, Op.PIN, Op.UNPIN, Op.MOVE,
                        Op.PULL, Op.REGISTER})


class Peers(Protocol):
    """The cluster, as the ops of a member see it (kvstore.cluster.ClusterNode)."""

    node: str
    call_timeout_s: float

    def members(self) -> list[str]: ...

    def lookup(self, digest: bytes, blob: bytes) -> LookupReply: ...

    def pull_missing(self, digest: bytes, blob: bytes, prefix: bool) -> tuple[set[int], dict[int, MissReason]]: ...

    def prefetch(self, digest: bytes, blob: bytes) -> int: ...

    def local_tiers(self, digest: bytes, blob: bytes): ...

    def wait_synced(self, timeout: float) -> bool: ...

    def on_members(self, op: Op, calls: dict[str, dict], timeout: float) -> dict[str, list]: ...

    def stats(self) -> dict: ...


class AgentOps:
    """The op table of one agent (with `peers`: of a cluster member). Thread-safe."""

    def __init__(self, store: NodeStore, peers: Peers | None = None):
        self.store = store
        self.peers = peers
        self.recorder = RequestRecorder()
        self.connections: Callable[[], int] = lambda: 0  # the server's open connections
        self.metrics_port = 0  # the agent's Prometheus endpoint, once started
        self._handlers: dict[Op, Callable[[int, Any], Any]] = {
            Op.HELLO: self._hello, Op.REGISTER: self._register, Op.LOOKUP: self._lookup,
            Op.CONTAINS: self._contains, Op.RESERVE: self._reserve, Op.COMMIT: self._commit,
            Op.ABORT: lambda conn, r: store.abort(conn, r.rid), Op.ACQUIRE: self._acquire,
            Op.RELEASE: lambda conn, r: store.release(conn, r.lid), Op.TOUCH: self._touch,
            Op.EVICT: self._evict, Op.CLEAR: lambda conn, r: store.clear(r.ns), Op.FLUSH: self._flush,
            Op.STATS: lambda conn, r: self.stats(), Op.LIST: lambda conn, r: store.list_namespaces(),
            Op.EVENTS: self._events, Op.CHUNKS: self._chunks, Op.PIN: self._pin, Op.UNPIN: self._unpin,
            Op.MOVE: self._move,
        }
        if peers is not None:
            self._handlers.update({Op.PREFETCH: self._prefetch, Op.PULL: self._pull, Op.ON_MEMBERS: self._on_members})
        # how each timed op's tier and tokens are read off its reply
        self._observers: dict[Op, Callable[[Any, Any], tuple[str, dict | None]]] = {
            Op.LOOKUP: self._observe_lookup, Op.RESERVE: _observe_put, Op.COMMIT: _observe_put,
            Op.ACQUIRE: self._observe_acquire, Op.TOUCH: self._observe_touch}

    # ---- dispatch ---------------------------------------------------------------------------------
    def dispatch(self, conn: int, frame: Any) -> tuple[Op | None, list]:
        """(op, wire reply) of one request frame `[op, {args}]`; op None when the frame named none."""
        if not isinstance(frame, list) or len(frame) != 2 or not isinstance(frame[0], str) \
                or not isinstance(frame[1], dict):
            return None, error_reply(ProtocolError("a request is [op, {args}]"))
        name, args = frame
        try:
            op = Op(name)
        except ValueError:
            op = None
        handler = self._handlers.get(op)
        if handler is None:
            return None, error_reply(InvalidArgument(f"unknown op {name!r}"))
        self.recorder.begin()
        started = time.perf_counter()
        try:
            request = REQUESTS[op].decode(args)
            result = handler(conn, request)
        except KVStoreError as exc:
            self.recorder.end(op.value, 0.0, None, failed=True)
            return op, error_reply(exc)
        except Exception as exc:  # a bug must not take the agent down; the client gets the message
            self.recorder.end(op.value, 0.0, None, failed=True)
            log.exception("op %s failed", op)
            return op, error_reply(KVStoreError(f"internal error in {op}: {exc}"))
        self._record(op, request, result, time.perf_counter() - started)
        return op, ["ok", result.to_wire() if isinstance(result, Message) else result]

    def run_op(self, op: str, args: dict) -> list:
        """The wire reply of one operator op on behalf of the control plane (on_members, here or for a
        peer), as no connection: what it acquires it releases, what it pins belongs to no connection."""
        if op not in MEMBER_OPS:
            return error_reply(InvalidArgument(f"{op!r} cannot be run on a member"))
        return self.dispatch(PIN_CONN, [op, args])[1]

    def disconnect(self, conn: int) -> None:
        self.store.disconnect(conn)

    def stats(self) -> dict:
        """The store's statistics, plus this agent's requests (by op, latency, tokens, in flight)."""
        stats = {**self.store.stats(), "metrics_port": self.metrics_port,
                 "requests": {**self.recorder.snapshot(), "connections": self.connections()}}
        if self.peers is not None:
            stats["cluster"] = self.peers.stats()
        return stats

    # ---- handlers: argument checks beyond types, then the store ---------------------------------
    def _keys(self, blob: bytes) -> bytes:
        """A key blob checked for shape and batch size."""
        if len(blob) % KEY_BYTES:
            raise InvalidArgument(f"keys must be a binary blob whose length is a multiple of {KEY_BYTES}")
        limit = self.store.cfg.agent.max_batch_chunks
        if key_count(blob) > limit:
            raise InvalidArgument(f"{key_count(blob)} keys exceed agent.max_batch_chunks ({limit})")
        return blob

    def _hello(self, conn: int, request: Hello) -> HelloReply:
        if request.version != PROTOCOL_VERSION:
            raise InvalidArgument(f"protocol version {request.version} not supported "
                                  f"(agent speaks {PROTOCOL_VERSION})")
        store, cfg = self.store, self.store.cfg
        peers = self.peers
        return HelloReply(
            version=PROTOCOL_VERSION, arena_path=store.cpu.arena_path, arena_bytes=store.cpu.capacity,
            lease_ttl_s=cfg.agent.lease_ttl_s, chunk_tokens=cfg.chunk_tokens, pid=os.getpid(),
            prefault=cfg.cpu.prefault, max_batch_chunks=cfg.agent.max_batch_chunks,
            busy_poll_us=cfg.agent.busy_poll_us, directory_path=store.directory.path,
            locations_path=store.cpu.locations.path, cluster=peers is not None,
            node=peers.node if peers is not None else "", members=peers.members() if peers is not None else None)

    def _register(self, conn: int, request: Register) -> int:
        return self.store.register(request.ns, Geometry.from_wire(request.geometry), request.description)

    def _lookup(self, conn: int, request: Lookup) -> LookupReply:
        blob = self._keys(request.keys)
        if request.cluster and self.peers is not None:
            return self.peers.lookup(request.ns, blob)
        return self.store.lookup(request.ns, blob)

    def _contains(self, conn: int, request) -> bytes:
        return self.store.contains(request.ns, self._keys(request.keys))

    def _reserve(self, conn: int, request: Reserve):
        keys = None if request.keys is None else split_keys(self._keys(request.keys))  # None: a credit
        return self.store.reserve(conn, request.ns, keys, request.sizes)

    def _commit(self, conn: int, request: Commit):
        return self.store.commit(conn, request.rid, request.named, request.renew, request.keep)

    def _acquire(self, conn: int, request: Acquire) -> AcquireReply:
        blob = self._keys(request.keys)
        if self.peers is None:
            return self.store.acquire(conn, request.ns, split_keys(blob), request.prefix)
        self.store.namespace(request.ns)  # an unregistered namespace is the caller's error, before any pull
        pulled, failed = self.peers.pull_missing(request.ns, blob, request.prefix)
        reply = self.store.acquire(conn, request.ns, split_keys(blob), request.prefix)
        reasons = dict(reply.reasons)
        for i, reason in failed.items():  # say why a chunk a peer was meant to hold is a miss
            if reasons.get(i) == MissReason.NOT_FOUND:
                reasons[i] = reason
        return AcquireReply(reply.lid, reply.offsets, reply.sizes, reply.ttl, reasons, reply.promoted,
                            sorted(i for i in pulled if reply.offsets[i] >= 0))

    def _touch(self, conn: int, request: Touch) -> int:
        return self.store.touch(request.ns, split_keys(self._keys(request.keys)))

    def _evict(self, conn: int, request: Evict):
        return self.store.evict(request.ns, split_keys(self._keys(request.keys)), tuple(request.tiers))

    def _flush(self, conn: int, request: Flush) -> FlushReply:
        deadline = time.monotonic() + request.timeout
        result = self.store.flush(request.timeout)
        if self.peers is None:
            return result
        synced = self.peers.wait_synced(max(0.0, deadline - time.monotonic()))
        return FlushReply(result.flushed and synced, result.queued)

    def _events(self, conn: int, request: Events):
        if request.since < 0 or not 0 < request.limit <= 100_000:
            raise InvalidArgument("events needs since >= 0 and 0 < limit <= 100000")
        return self.store.events(request.since, request.limit)

    def _chunks(self, conn: int, request: Chunks):
        if request.tier not in (0, *(int(t) for t in BIT_OF_TIER)) or request.start < 0 \
                or not 0 < request.limit <= 100_000:
            raise InvalidArgument("chunks needs a known tier code, start >= 0 and 0 < limit <= 100000")
        return self.store.chunks(request.ns, request.tier, request.start, request.limit, request.pinned)

    def _pin(self, conn: int, request: Pin):
        if request.renew is not None:  # an existing lease: a new TTL, no keys
            return self.store.renew_pin(request.renew, request.ns, request.ttl)
        if request.keys is None:
            raise InvalidArgument("missing argument 'keys'")
        return self.store.pin(request.ns, split_keys(self._keys(request.keys)), request.ttl)

    def _unpin(self, conn: int, request: Unpin):
        return self.store.unpin(request.lease, request.ns)

    def _move(self, conn: int, request: Move):
        return self.store.move(conn, request.ns, split_keys(self._keys(request.keys)), request.tier, request.timeout)

    # a cluster member's
    def _prefetch(self, conn: int, request) -> PrefetchReply:
        self.store.namespace(request.ns)
        return PrefetchReply(self.peers.prefetch(request.ns, self._keys(request.keys)))

    def _pull(self, conn: int, request) -> PullReply:
        """Bring every chunk among the keys that peers hold into this node now (not only a prefix): the
        target side of the control plane's Move to another node."""
        blob = self._keys(request.keys)
        self.store.namespace(request.ns)
        pulled, failed = self.peers.pull_missing(request.ns, blob, prefix=False)
        return PullReply(len(pulled), failed, self.peers.local_tiers(request.ns, blob).tobytes())

    def _on_members(self, conn: int, request: OnMembers) -> dict:
        try:
            op = Op(request.op)
        except ValueError:
            op = None
        if op not in MEMBER_OPS:
            raise InvalidArgument(f"on_members runs only {sorted(str(o) for o in MEMBER_OPS)}, not {request.op!r}")
        calls = request.calls
        if calls is None:  # the same args for every member
            calls = {node: request.args or {} for node in self.peers.members()}
        elif not all(isinstance(n, str) and isinstance(a, dict) for n, a in calls.items()):
            raise InvalidArgument("calls must map node ids to args")
        timeout = self.peers.call_timeout_s if request.timeout is None else request.timeout
        return self.peers.on_members(op, calls, timeout)

    # ---- recording ------------------------------------------------------------------------------
    def _record(self, op: Op, request: Request, result: Any, seconds: float) -> None:
        """Count a request that succeeded; time it by the tier that served it, and add its tokens."""
        observe = self._observers.get(op)
        tier = tokens = None
        if observe is not None:
            try:
                tier, tokens = observe(request, result)
            except Exception:  # metrics never fail a request
                log.exception("recording op %s failed", op)
        self.recorder.end(op.value, seconds, tier, tokens)

    def _chunk_tokens(self, request) -> int:
        """Tokens per chunk of the request's namespace (registered: the request succeeded)."""
        return self.store.namespace(request.ns).geometry.tokens

    def _observe_lookup(self, request: Lookup, result: LookupReply) -> tuple[str, dict]:
        """Tier: the deepest tier in the matched prefix (none: no match). Tokens by tier, none past it."""
        per_chunk = self._chunk_tokens(request)
        counts = [(tier.label, result.tiers.count(tier)) for tier in Tier if tier != Tier.NONE]  # ascending codes
        by_tier = {label: n * per_chunk for label, n in counts if n}
        by_tier["none"] = (key_count(request.keys) - result.matched) * per_chunk
        return next((label for label, n in reversed(counts) if n), "none"), {"lookup": by_tier}

    def _observe_acquire(self, request: Acquire, result: AcquireReply) -> tuple[str, dict]:
        """Tier: the slowest that served any chunk (remote pull > disk promotion > cpu; none: nothing).
        Tokens served by tier, and not served by reason (past a prefix's first miss: that miss's reason)."""
        offsets, reasons = result.offsets, result.reasons
        served = len(offsets) - offsets.count(-1)
        remote, promoted = result.remote or (), result.promoted
        disk = len(set(promoted) - set(remote)) if remote and promoted else len(promoted)
        per_chunk = self._chunk_tokens(request)
        hit = {"cpu": (served - len(remote) - disk) * per_chunk, "disk": disk * per_chunk,
               "remote": len(remote) * per_chunk}
        missed: dict[str, int] = {}
        for reason in reasons.values():  # misses only, usually one: a prefix read stops at the first
            missed[str(reason)] = missed.get(str(reason), 0) + 1
        unexplained = len(offsets) - served - len(reasons)
        if unexplained > 0:
            first = str(reasons[min(reasons)]) if reasons else MissReason.NOT_FOUND.value
            missed[first] = missed.get(first, 0) + unexplained
        tier = "remote" if remote else "disk" if disk else "cpu" if served else "none"
        return tier, {"get_hit": hit, "get_miss": {r: n * per_chunk for r, n in missed.items()}}

    def _observe_touch(self, request: Touch, touched: int) -> tuple[str, dict]:
        """Chunks read in place are arena hits (a miss goes on to `acquire`, which counts it)."""
        return ("cpu" if touched else "none"), {"get_hit": {"cpu": touched * self._chunk_tokens(request)}}


def _observe_put(request, result) -> tuple[str, None]:
    """A reserve or commit: puts land in the arena."""
    return "cpu", None
