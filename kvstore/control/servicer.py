"""`kvstore.v1.ControlService`: each RPC as the agent ops it takes (docs/control.md).

Stateless: every answer comes from the agents (fanout.py), through the controller's own node agent; the
only cache is the namespaces' descriptions (catalog.py). A query's keys are parsed once (queries.py); a
Pin's per-node leases travel as one string (leases.py); WatchEvents polls the agent's feed (events.py).
"""

from __future__ import annotations

import time

import numpy as np

from ..config import KVStoreConfig
from ..errors import InvalidArgument, KVStoreError, NotFound, PermissionDenied
from ..metrics import ControllerMetrics
from ..proto import kvstore_pb2 as pb
from ..proto import kvstore_pb2_grpc as pb_grpc
from ..proto.tiers import FROM_PB, TO_PB
from ..vocab import BIT_OF_TIER, Tier, key_count, pack_keys, pick_keys, stored_prefix
from ..wire.framing import PROTOCOL_VERSION
from ..wire.messages import (Chunks, ChunksReply, Clear, Evict, EvictReply, Hello, Lookup, LookupReply, Move,
                             MoveReply, Pin, PinReply, Prefetch, Pull, PullReply, Stats, Unpin, UnpinReply)
from .auth import Principal, TokenAuth
from .catalog import Catalog
from .events import watch
from .fanout import Nodes, answers, summed
from .leases import lease_string, parse_lease
from .pool import AgentPool
from .queries import Keys, query_keys
from .status import abort, rpc, status_of

MAX_PAGE = 10_000
_PB_TIER_OF_CODE = bytes(TO_PB.get(code, pb.TIER_UNSPECIFIED) for code in range(256))  # for bytes.translate
# the proto tiers of every combination of node-directory tier bits (ListChunks: a lookup per row)
_PB_TIERS_OF_BITS = [[TO_PB[tier] for tier, bit in BIT_OF_TIER.items() if bits & bit] for bits in range(256)]
_LOCAL_TIERS = {pb.TIER_CPU: "cpu", pb.TIER_DISK: "disk"}  # what Evict and Move name on the agent
_NODE_TIERS = [tier for tier in Tier if tier != Tier.NONE]


class ControlServicer(pb_grpc.ControlServiceServicer):
    def __init__(self, cfg: KVStoreConfig, socket_path: str, auth: TokenAuth, metrics: ControllerMetrics):
        self.cfg = cfg
        self.auth = auth
        self.metrics = metrics
        self.agent = AgentPool(socket_path, max(2, cfg.control.workers))
        self.nodes = Nodes(cfg, self.agent)
        self.catalog = Catalog(self.nodes)

    def keys(self, query: pb.ChunkQuery, principal: Principal, context) -> Keys:
        return query_keys(query, self.catalog, principal, context, self.cfg.control.max_request_chunks)

    # ---- lookups ----------------------------------------------------------------------------------
    def match(self, digest: bytes, blob: bytes, context) -> tuple[int, bytes, dict[str, tuple[int, bytes]]]:
        """(matched chunks anywhere, tier code of each, {node: (its prefix in chunks, tier codes)}). In front
        of a cluster agent: its cluster lookup (every holder node; tier `remote` for chunks only other
        nodes hold); else this node's directory."""
        if blob and self.nodes.is_cluster(context):
            reply = self.nodes.request(Lookup(digest, blob, cluster=True), LookupReply, context)
            nodes = {node: (int(held["chunks"]), held["tiers"]) for node, held in reply.nodes.items()
                     if held["chunks"]}
            return reply.matched, reply.tiers, nodes
        matched, tiers = self.prefix(digest, blob, context)
        return matched, tiers, ({self.nodes.host: (matched, tiers)} if matched else {})

    def prefix(self, digest: bytes, blob: bytes, context) -> tuple[int, bytes]:
        """(matched chunks from the first key of a key blob, tier code of each matched chunk)."""
        if not blob:
            return 0, b""
        bits = self.agent.directory_tiers(digest, pack_keys(blob), self.nodes.timeout(context),
                                          lambda d: self.catalog.ns_id(d, context))
        if bits is None:
            reply = self.nodes.request(Lookup(digest, blob), LookupReply, context)
            return reply.matched, reply.tiers
        return stored_prefix(bits)

    @rpc
    def Lookup(self, request, context, principal):
        digest, blob, chunk_tokens = self.keys(request.query, principal, context)
        matched, tiers, nodes = self.match(digest, blob, context)
        counts = _tier_counts(tiers)
        for tier in _NODE_TIERS:
            if counts[tier]:
                self.metrics.lookup_chunks.labels(tier.label).inc(int(counts[tier]))
        if key_count(blob) > matched:
            self.metrics.lookup_chunks.labels("none").inc(key_count(blob) - matched)
        return pb.LookupResponse(query_chunks=key_count(blob), matched_chunks=matched,
                                 matched_tokens=matched * chunk_tokens, chunk_tokens=chunk_tokens,
                                 nodes=[_node_match(node, run, node_tiers, chunk_tokens)
                                        for node, (run, node_tiers) in sorted(nodes.items(), key=lambda n: -n[1][0])])

    @rpc
    def Score(self, request, context, principal):
        digest, blob, chunk_tokens = self.keys(request.query, principal, context)
        _, _, nodes = self.match(digest, blob, context)
        return pb.ScoreResponse(matched_tokens_by_node={node: run * chunk_tokens for node, (run, _) in nodes.items()})

    # ---- state of the nodes -----------------------------------------------------------------------
    @rpc
    def Stats(self, request, context, principal):
        visible = self.catalog.visible(principal, context)
        namespaces = [pb.NamespaceInfo(digest=d, description={k: str(v) for k, v in desc.items()})
                      for d, desc in visible.items()]
        answered = [(node, reply[1]) for node, reply in self.nodes.run(context, Stats()).items() if reply[0] == "ok"]
        # the namespaces are those the agent in front of us knows (its node comes first)
        return pb.StatsResponse(nodes=[_node_stats(node, stats, namespaces if i == 0 else [])
                                       for i, (node, stats) in enumerate(answered)])

    @rpc
    def Health(self, request, context, principal):
        timeout = self.nodes.timeout(context)
        reason = self.agent_problem(timeout)
        if reason:
            return pb.HealthResponse(status=pb.HealthResponse.NOT_SERVING, message=reason,
                                     nodes={self.nodes.host: reason})
        if not self.nodes.is_cluster(context):
            return pb.HealthResponse(status=pb.HealthResponse.SERVING, nodes={self.nodes.host: "serving"})
        hellos = self.nodes.run(context, Hello(PROTOCOL_VERSION))  # not every member's whole stats
        nodes = {node: "serving" if reply[0] == "ok" else reply[2] for node, reply in hellos.items()}
        down = sorted(node for node, state in nodes.items() if state != "serving")
        # The controller serves while its own agent does; members that did not answer are named.
        return pb.HealthResponse(status=pb.HealthResponse.SERVING, nodes=nodes,
                                 message=f"{len(down)} of {len(nodes)} nodes not answering" if down else "")

    def agent_problem(self, timeout: float) -> str:
        """Why the agent is not serving ("" if it answers `hello` within `timeout`): what Health and the
        grpc.health.v1 status report."""
        try:
            self.agent.request(Hello(PROTOCOL_VERSION), None, timeout)
        except KVStoreError as exc:
            return str(exc) or type(exc).__name__
        return ""

    @rpc
    def ListChunks(self, request, context, principal):
        if request.tier not in FROM_PB:
            raise InvalidArgument(f"unknown tier {request.tier}")
        page_size = request.page_size or 1000
        if page_size > MAX_PAGE:
            raise InvalidArgument(f"page_size {page_size} exceeds {MAX_PAGE}")
        if request.namespace:
            self.catalog.describe(request.namespace, principal, context)
        tier, namespace = int(FROM_PB[request.tier]), request.namespace or None
        # Nodes are listed one after another, in node order; the page token is "<node>:<position>".
        nodes = self.nodes.names(context)
        if request.node:
            if request.node not in nodes:
                raise NotFound(f"node {request.node} is not a node this controller serves ({', '.join(nodes)})")
            nodes = [request.node]
        node, start = _parse_page_token(request.page_token, nodes)
        nodes = nodes[nodes.index(node):] if node else nodes
        visible = self.catalog.visible(principal, context) if principal.tenants is not None else None
        # a node that does not know the namespace holds none of it; one that is down is left out of a
        # listing of every node, and is an error when asked for by name
        tolerate = ("not_found",) if request.node else ("not_found", "unavailable")
        chunks: list[pb.ChunkInfo] = []
        for i, n in enumerate(nodes):
            # One node at a time, for the room left: a node's listing scans what it holds, so a node
            # whose rows could not fit on this page is not asked.
            first = start if n == node else 0
            call = Chunks(namespace, tier, first, page_size - len(chunks), request.pinned_only)
            reply = answers(self.nodes.run(context, calls={n: call}), ChunksReply, tolerate).get(n)
            if reply is None:
                continue
            chunks += [pb.ChunkInfo(hash=key, namespace=ns, node=n, tiers=_PB_TIERS_OF_BITS[bits])
                       for key, ns, bits in reply.chunks if visible is None or ns in visible]
            if reply.next:  # rows left on this node: the next page goes on from there
                return pb.ListChunksResponse(chunks=chunks, next_page_token=f"{n}:{reply.next}")
            if len(chunks) == page_size:  # full, this node done: the next page starts at the next node
                later = nodes[i + 1:]
                return pb.ListChunksResponse(chunks=chunks, next_page_token=f"{later[0]}:0" if later else "")
        return pb.ListChunksResponse(chunks=chunks)

    # ---- removal ----------------------------------------------------------------------------------
    @rpc
    def Evict(self, request, context, principal):
        digest, blob, _ = self.keys(request.query, principal, context)
        unknown = [t for t in request.tiers if t not in _LOCAL_TIERS]
        if unknown:
            raise InvalidArgument(f"Evict takes tiers TIER_CPU and TIER_DISK, not {unknown}")
        tiers = [_LOCAL_TIERS[t] for t in request.tiers] or ["cpu", "disk"]
        counts = summed(answers(self.nodes.run(context, Evict(digest, blob, tiers)), EvictReply))
        return pb.EvictResponse(cpu_chunks=counts["cpu"], disk_chunks=counts["disk"], pinned_chunks=counts["pinned"])

    @rpc
    def Clear(self, request, context, principal):
        target = request.WhichOneof("target")
        if target == "namespace":
            self.catalog.describe(request.namespace, principal, context)
            digests = [request.namespace]
        elif target == "tenant":
            if not principal.may_see(request.tenant):
                raise PermissionDenied(f"this token is not scoped to tenant {request.tenant!r}")
            digests = [d for d, desc in self.catalog.namespaces(context, refresh=True).items()
                       if str(desc.get("tenant", "")) == request.tenant]
        else:
            raise InvalidArgument("Clear needs a namespace or a tenant")
        cpu = disk = 0
        for digest in digests:
            counts = summed(answers(self.nodes.run(context, Clear(digest)), EvictReply))
            cpu, disk = cpu + counts["cpu"], disk + counts["disk"]
        return pb.ClearResponse(namespaces=len(digests), cpu_chunks=cpu, disk_chunks=disk)

    # ---- pins -------------------------------------------------------------------------------------
    @rpc
    def Pin(self, request, context, principal):
        if request.lease:
            return self._renew(request, context, principal)
        digest, blob, _ = self.keys(request.query, principal, context)
        replies = self.nodes.run(context, Pin(digest, request.ttl_s, keys=blob))
        pins = {node: PinReply.decode(reply[1]) for node, reply in replies.items() if reply[0] == "ok"}
        leases = {node: pin.lease for node, pin in pins.items() if pin.lease}
        failed = {node: reply for node, reply in replies.items() if reply[0] != "ok" and reply[1] != "not_found"}
        if failed:  # all or nothing, as on one agent: what did pin is unpinned, then the error is raised
            self.nodes.run(context, calls={node: Unpin(lid, digest) for node, lid in leases.items()})
            answers(failed)
        return pb.PinResponse(pinned_chunks=sum(pins[node].pinned for node in leases),
                              lease=self._lease(digest, leases, context))

    def _renew(self, request, context, principal):
        """Pin with `lease`: that lease, on every node it holds chunks on, lasts `ttl_s` from now."""
        digest, leases = parse_lease(request.lease, lambda: self.nodes.own_node(context))
        self.catalog.describe(digest, principal, context)
        renewed = self._on_lease(request.lease, leases, context, PinReply,
                                 lambda lid: Pin(digest, request.ttl_s, renew=lid))
        return pb.PinResponse(pinned_chunks=sum(reply.pinned for reply in renewed.values()),
                              lease=self._lease(digest, {node: leases[node] for node in renewed}, context))

    @rpc
    def Unpin(self, request, context, principal):
        digest, leases = parse_lease(request.lease, lambda: self.nodes.own_node(context))
        self.catalog.describe(digest, principal, context)
        self._on_lease(request.lease, leases, context, UnpinReply, lambda lid: Unpin(lid, digest))
        return pb.UnpinResponse()

    def _on_lease(self, lease: str, leases: dict[str, int], context, reply: type, request) -> dict:
        """`request(lid)` on every node of a lease, with that node's lease id: the replies of the nodes
        where it is still live (NotFound if none)."""
        live = answers(self.nodes.run(context, calls={node: request(lid) for node, lid in leases.items()}), reply)
        if not live:
            raise NotFound(f"pin lease {lease} is unknown, expired or released")
        return live

    def _lease(self, digest: bytes, leases: dict[str, int], context) -> str:
        if not leases:
            return ""
        cluster = self.nodes.is_cluster(context)
        return lease_string(digest, leases, cluster, "" if cluster else self.nodes.host)

    # ---- moves ------------------------------------------------------------------------------------
    @rpc
    def Move(self, request, context, principal):
        digest, blob, _ = self.keys(request.query, principal, context)
        if request.to_tier not in _LOCAL_TIERS:
            raise InvalidArgument(f"Move takes to_tier TIER_CPU or TIER_DISK, not {request.to_tier}")
        tier = _LOCAL_TIERS[request.to_tier]
        if request.to_node and request.to_node != self.nodes.own_node(context):
            return self._move_to_node(request.to_node, digest, blob, tier, context)
        # the agent answers with what is on disk by then, not an error
        reply = self.nodes.request(Move(digest, blob, tier, self.nodes.margin(context)), MoveReply, context)
        return pb.MoveResponse(moved_chunks=reply.moved)

    def _move_to_node(self, target: str, digest: bytes, blob: bytes, tier: str, context) -> pb.MoveResponse:
        """Move to another cluster member: it pulls every chunk of the prompt some node holds, moves them
        into `tier` there; then the other nodes drop the chunks the target holds (pinned ones stay)."""
        # the namespace is known here (described by keys()): register it on the target, a no-op if it is
        answers(self.nodes.run(context, calls={target: self.catalog.registration(digest)}), tolerate=())
        pulled = answers(self.nodes.run(context, calls={target: Pull(digest, blob)}), PullReply, tolerate=())
        held = np.flatnonzero(np.frombuffer(pulled[target].tiers, dtype=np.uint8) != Tier.NONE)
        if not held.size:
            return pb.MoveResponse()
        held_blob = pick_keys(blob, held)
        left = max(0.0, self.nodes.margin(context) - 0.1)
        moved = answers(self.nodes.run(context, calls={target: Move(digest, held_blob, tier, left)}), MoveReply,
                        tolerate=())
        others = [node for node in self.nodes.names(context) if node != target]
        # a node that is down keeps its copies (no harm: the target's are the same bytes)
        answers(self.nodes.run(context, calls={node: Evict(digest, held_blob) for node in others}),
                tolerate=("not_found", "unavailable"))
        return pb.MoveResponse(moved_chunks=moved[target].moved)

    @rpc
    def Prefetch(self, request, context, principal):
        digest, blob, _ = self.keys(request.query, principal, context)
        if self.nodes.is_cluster(context):  # pulls from peers start in the background
            self.nodes.request(Prefetch(digest, blob), None, context)
        reply = self.nodes.request(Move(digest, blob, "cpu"), MoveReply, context)
        return pb.PrefetchResponse(missing_chunks=key_count(blob) - reply.moved)

    # ---- events -----------------------------------------------------------------------------------
    def WatchEvents(self, request, context):
        started = time.perf_counter()
        try:
            principal = self.auth.check(context.invocation_metadata())
            if request.namespace:
                self.catalog.describe(request.namespace, principal, context)
            yield from watch(self.nodes, self.catalog, principal, request.namespace, request.since, context.is_active)
        except Exception as exc:
            code = status_of(exc)
            self.metrics.rpc_seconds.labels("WatchEvents", code.name).observe(time.perf_counter() - started)
            abort("WatchEvents", exc, context)

    def close(self) -> None:
        self.agent.close()


def _parse_page_token(token: str, nodes: list[str]) -> tuple[str, int]:
    """(node, position in its listing) of a ListChunks page token; ("", 0) for the first page."""
    if not token:
        return "", 0
    node, _, start = token.rpartition(":")
    if node not in nodes or not start.isdigit():
        raise InvalidArgument(f"bad page_token {token!r}")
    return node, int(start)


def _tier_counts(tiers: bytes) -> np.ndarray:
    """How many chunks each tier code holds among tier codes."""
    return np.bincount(np.frombuffer(tiers, dtype=np.uint8), minlength=len(Tier))


def _node_match(node: str, chunks: int, tiers: bytes, chunk_tokens: int) -> pb.NodeMatch:
    counts = _tier_counts(tiers)
    return pb.NodeMatch(node=node, matched_chunks=chunks, matched_tokens=chunks * chunk_tokens,
                        tiers=list(tiers.translate(_PB_TIER_OF_CODE)),  # in C, not a loop per chunk
                        per_tier=[pb.TierCount(tier=TO_PB[tier], chunks=int(counts[tier]))
                                  for tier in _NODE_TIERS if counts[tier]])


def _node_stats(node: str, stats: dict, namespaces: list) -> pb.NodeStats:
    """One node's NodeStats from its agent's stats reply."""
    counters = stats["counters"]
    hits, misses = counters.get("lookup_hit_chunks", 0), counters.get("lookup_miss_chunks", 0)
    tiers = [pb.TierStats(tier=TO_PB[Tier.named(name)], chunks=t.get("chunks", 0),
                          used_bytes=t.get("used_bytes", t.get("bytes_used", 0)),
                          capacity_bytes=t.get("capacity_bytes", 0), pinned_bytes=t.get("pinned_bytes", 0),
                          evictions=t.get("evictions", t.get("evicted_chunks", 0)))
             for name, t in stats["tiers"].items()]
    return pb.NodeStats(node=node, tiers=tiers, counters={k: int(v) for k, v in counters.items()},
                        namespaces=namespaces, hit_rate=hits / (hits + misses) if hits + misses else 0.0)
