"""The controller: `kvstore.v1.ControlService` over gRPC, in front of the node agent (docs/control.md).

Stateless: every answer comes from the agent over its Unix socket (a small pool of AgentConnections,
each call with a deadline: the smaller of `control.call_timeout_s` and what is left of the RPC's own
deadline), so several controllers may run side by side. The only cache is namespace descriptions
(digest -> model, tenant, chunk size), refreshed from the agent on a miss.
"""

from __future__ import annotations

import functools
import logging
import queue
import socket
import threading
import time
from collections import Counter
from concurrent import futures
from typing import Any, Callable, NoReturn

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..client import AgentConnection, namespace_bits, stored_prefix
from ..config import KVStoreConfig
from ..errors import ERRORS_BY_CODE, AgentUnavailable, CapacityExhausted, InvalidArgument, KVStoreError, NotFound
from ..keys import Namespace, chunk_keys
from ..metrics import ControllerMetrics
from ..node import DIR_BITS, TIER_CPU, TIER_DISK, TIER_GPU, TIER_NAMES, TIER_NONE, TIER_REMOTE
from ..proto import kvstore_pb2 as pb
from ..protocol import PROTOCOL_VERSION, error_reply, pick_keys
from ..tiers.memory import pack_keys
from ..proto import kvstore_pb2_grpc as pb_grpc
from .auth import ANYONE, AuthFailed, Principal, TokenAuth
from .tls import server_credentials, server_scheme

log = logging.getLogger("kvstore.control")

# Agent tier codes <-> proto Tier values (equal today; kept explicit so either side may change).
TIER_TO_PB = {TIER_NONE: pb.TIER_UNSPECIFIED, TIER_GPU: pb.TIER_GPU, TIER_CPU: pb.TIER_CPU,
              TIER_DISK: pb.TIER_DISK, TIER_REMOTE: pb.TIER_REMOTE}
PB_TO_TIER = {v: k for k, v in TIER_TO_PB.items()}
_PB_TIER_OF_CODE = bytes(TIER_TO_PB.get(code, pb.TIER_UNSPECIFIED) for code in range(256))  # for bytes.translate
# the proto tiers of every combination of node-directory tier bits (ListChunks: a lookup per row)
_PB_TIERS_OF_BITS = [[TIER_TO_PB[t] for t, bit in DIR_BITS.items() if bits & bit] for bits in range(256)]
_LOCAL_TIERS = {pb.TIER_CPU: "cpu", pb.TIER_DISK: "disk"}  # what Evict and Move name on the agent
MAX_PAGE = 10_000
_WATCH_POLL_S = 0.05  # how often a watcher asks the agent for new events when there were none
_TIER_BY_NAME = {name: code for code, name in TIER_NAMES.items()}
_DEADLINE_MARGIN_S = 0.1  # the agent stops waiting (disk writes, other members) this long before the call's deadline
_HEALTH_CHECK_S = 1.0  # how often the grpc.health.v1 status is refreshed from the agent
CONTROL_SERVICE = pb.DESCRIPTOR.services_by_name["ControlService"].full_name  # "kvstore.v1.ControlService"


class PermissionDenied(Exception):
    """The token is valid but not for this tenant: PERMISSION_DENIED."""


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception raised while serving a call."""
    if isinstance(exc, AuthFailed):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, AgentUnavailable):
        return grpc.StatusCode.DEADLINE_EXCEEDED if "timed out" in str(exc) else grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, CapacityExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


class AgentPool:
    """Up to `size` connections to the agent, each used by one call at a time."""

    def __init__(self, socket_path: str, size: int):
        self.socket_path = socket_path
        self._idle: queue.LifoQueue[AgentConnection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._directory_lock = threading.Lock()
        self._directory_conn: AgentConnection | None = None
        self._ns_ids: dict[bytes, int] = {}  # namespace ids as the directory connection's agent numbers them

    def call(self, op: str, args: dict, timeout: float) -> Any:
        if timeout <= 0:
            raise AgentUnavailable(f"agent call {op} timed out (no time left in the RPC's deadline)")
        if not self._slots.acquire(timeout=timeout):
            raise AgentUnavailable(f"agent call {op} timed out waiting for a free connection")
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = AgentConnection(self.socket_path, timeout=timeout)
            try:
                result = conn.call(op, args, timeout=timeout)
            except AgentUnavailable:
                conn.close()
                raise
            self._idle.put(conn)
            return result
        finally:
            self._slots.release()

    def is_cluster(self, timeout: float) -> bool:
        """Whether the agent is a cluster member (its hello says so): lookups then ask the cluster."""
        with self._directory_lock:
            return self._directory(timeout).cluster

    def node(self, timeout: float) -> str:
        """The agent's cluster node id, as its hello said ("" off a cluster)."""
        with self._directory_lock:
            return self._directory(timeout).node

    def _directory(self, timeout: float) -> AgentConnection:
        """The connection whose mapping of the node directory lookups read (caller holds the lock)."""
        if self._directory_conn is None:
            self._directory_conn = AgentConnection(self.socket_path, timeout=timeout)
            self._ns_ids = {}  # another agent (or the same restarted) may number namespaces otherwise
        return self._directory_conn

    def directory_tiers(self, digest: bytes, packed: np.ndarray, timeout: float,
                        resolve_ns_id: Callable[[bytes], int]) -> np.ndarray | None:
        """Tier bits of each key from the agent's shared node directory (the map LocalClient reads: no
        round trip; once a second one checks that the agent is alive), 0 where absent or in another
        namespace. None when the directory cannot be mapped here (then ask the agent)."""
        with self._directory_lock:
            conn = self._directory(timeout)
            try:
                conn.ensure_alive()
                if conn.directory is None:
                    return None
                ns_id = self._ns_ids.get(digest)
                if ns_id is None:
                    ns_id = self._ns_ids[digest] = resolve_ns_id(digest)
                values = conn.directory.lookup(packed)
            except AgentUnavailable:
                conn.close()
                self._directory_conn = None
                raise
            except (OSError, ValueError):  # e.g. the agent stopped and closed it: start over next time
                conn.close()
                self._directory_conn = None
                return None
        return namespace_bits(values, ns_id)

    def close(self) -> None:
        with self._directory_lock:
            if self._directory_conn is not None:
                self._directory_conn.close()
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


def _rpc(method: Callable) -> Callable:
    """Auth, deadline, error mapping and latency metrics around one unary RPC."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: "ControlServicer", request, context: grpc.ServicerContext):
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            principal = ANYONE if name == "Health" else self.auth.check(context.invocation_metadata())
            return method(self, request, context, principal)
        except Exception as exc:
            code = status_of(exc)
            _abort(name, code, exc, context)
        finally:
            self.metrics.rpc_seconds.labels(name, code.name).observe(time.perf_counter() - started)

    return wrapper


def _abort(name: str, code: grpc.StatusCode, exc: Exception, context: grpc.ServicerContext) -> NoReturn:
    """End a failed call with `code` and a message naming the RPC; an INTERNAL one (a bug, not bad
    input) is logged with its traceback. context.abort raises."""
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", name)
    context.abort(code, f"{name}: {exc}")


def _parse_page_token(token: str, nodes: list[str]) -> tuple[str, int]:
    """(node, position in its listing) of a ListChunks page token; ("", 0) for the first page."""
    if not token:
        return "", 0
    node, _, start = token.rpartition(":")
    if node not in nodes or not start.isdigit():
        raise InvalidArgument(f"bad page_token {token!r}")
    return node, int(start)


def _answers(replies: dict[str, list], tolerate: tuple[str, ...] = ("not_found",)) -> dict[str, Any]:
    """node -> result of the nodes whose reply is ok. An error whose code is in `tolerate` leaves its
    node out (not_found: the node does not know the namespace, so holds nothing of it). Any other error
    is raised as its own type, naming the node (and how many nodes did answer)."""
    ok: dict[str, Any] = {}
    for node, reply in sorted(replies.items()):
        if reply[0] == "ok":
            ok[node] = reply[1]
        elif reply[1] not in tolerate:
            answered = sum(1 for r in replies.values() if r[0] == "ok")
            done = f" ({answered} of {len(replies)} nodes answered)" if len(replies) > 1 else ""
            raise ERRORS_BY_CODE.get(reply[1], KVStoreError)(f"node {node}: {reply[2]}{done}")
    return ok


def _summed(results: dict[str, dict]) -> Counter:
    """Per-node count dicts added up."""
    total: Counter = Counter()
    for counts in results.values():
        total.update({k: v for k, v in counts.items() if isinstance(v, int)})
    return total


def _tier_counts(tiers: bytes) -> np.ndarray:
    """How many chunks each tier code holds among tier codes."""
    return np.bincount(np.frombuffer(tiers, dtype=np.uint8), minlength=len(TIER_NAMES) + 1)


def _node_match(node: str, chunks: int, tiers: bytes, chunk_tokens: int) -> pb.NodeMatch:
    counts = _tier_counts(tiers)
    return pb.NodeMatch(node=node, matched_chunks=chunks, matched_tokens=chunks * chunk_tokens,
                        tiers=list(tiers.translate(_PB_TIER_OF_CODE)),  # in C, not a loop per chunk
                        per_tier=[pb.TierCount(tier=TIER_TO_PB[c], chunks=int(counts[c]))
                                  for c in TIER_NAMES if counts[c]])


def _node_stats(node: str, stats: dict, namespaces: list) -> pb.NodeStats:
    """One node's NodeStats from its agent's stats reply."""
    counters = stats["counters"]
    hits, misses = counters.get("lookup_hit_chunks", 0), counters.get("lookup_miss_chunks", 0)
    tiers = [pb.TierStats(tier=TIER_TO_PB[_TIER_BY_NAME[name]], chunks=t.get("chunks", 0),
                          used_bytes=t.get("used_bytes", t.get("bytes_used", 0)),
                          capacity_bytes=t.get("capacity_bytes", 0), pinned_bytes=t.get("pinned_bytes", 0),
                          evictions=t.get("evictions", t.get("evicted_chunks", 0)))
             for name, t in stats["tiers"].items()]
    return pb.NodeStats(node=node, tiers=tiers, counters={k: int(v) for k, v in counters.items()},
                        namespaces=namespaces, hit_rate=hits / (hits + misses) if hits + misses else 0.0)


class ControlServicer(pb_grpc.ControlServiceServicer):
    def __init__(self, cfg: KVStoreConfig, socket_path: str, auth: TokenAuth, metrics: ControllerMetrics):
        self.cfg = cfg
        self.auth = auth
        self.metrics = metrics
        self.node = socket.gethostname()
        self.agent = AgentPool(socket_path, max(2, cfg.control.workers))
        self._namespaces: dict[bytes, dict] = {}
        self._hashers: dict[bytes, Namespace] = {}
        self._geometries: dict[bytes, list] = {}

    # ---- helpers ---------------------------------------------------------------------------------
    def timeout(self, context: grpc.ServicerContext | None) -> float:
        left = context.time_remaining() if context is not None else None
        return self.cfg.control.call_timeout_s if left is None else min(self.cfg.control.call_timeout_s, left)

    def call(self, op: str, args: dict, context: grpc.ServicerContext | None) -> Any:
        return self.agent.call(op, args, self.timeout(context))

    def on_nodes(self, op: str, context, args: dict | None = None, calls: dict[str, dict] | None = None
                 ) -> dict[str, list]:
        """Run agent op `op` on the nodes this controller speaks for, at once: with `calls` (node ->
        args) on those nodes, else with `args` on every node: each cluster member (the agent's
        `on_members`, within what is left of the deadline), or this node. Node -> wire reply
        (["ok", result] or ["err", code, message]); a node that is not a member: not_found."""
        timeout = self.timeout(context)
        if self.agent.is_cluster(timeout):
            request = {"op": op, "timeout": max(0.0, timeout - _DEADLINE_MARGIN_S)}
            request.update({"calls": calls} if calls is not None else {"args": args or {}})
            return self.agent.call("on_members", request, timeout)
        replies = {}
        for node, node_args in (calls if calls is not None else {self.node: args or {}}).items():
            if node != self.node:
                replies[node] = error_reply(NotFound(f"not this controller's node ({self.node})"))
                continue
            try:
                replies[node] = ["ok", self.agent.call(op, node_args, timeout)]
            except AgentUnavailable:  # our own agent is gone: the call fails, as any call to it does
                raise
            except KVStoreError as exc:  # the node's answer
                replies[node] = error_reply(exc)
        return replies

    def nodes(self, context) -> list[str]:
        """The nodes this controller speaks for, sorted: every cluster member (as the agent knows them
        now), or this node."""
        if not self.agent.is_cluster(self.timeout(context)):
            return [self.node]
        return self.call("hello", {"version": PROTOCOL_VERSION}, context)["members"]

    def namespaces(self, context, refresh: bool = False) -> dict[bytes, dict]:
        """Every namespace registered on a node this controller speaks for: digest -> description."""
        if refresh or not self._namespaces:
            answered = _answers(self.on_nodes("list", context), tolerate=("not_found", "unavailable"))
            listed = [ns for namespaces in answered.values() for ns in namespaces]
            self._geometries = {ns["digest"]: ns["geometry"] for ns in listed}
            self._namespaces = {ns["digest"]: ns["description"] for ns in listed}
        return self._namespaces

    def ns_id(self, digest: bytes, context) -> int:
        """The agent's id of a namespace (what the node directory stores), by re-registering it with its
        own geometry: a no-op on the agent."""
        return self.call("register", {"ns": digest, "geometry": self._geometries[digest]}, context)

    def prefix(self, digest: bytes, blob: bytes, context) -> tuple[int, bytes]:
        """(matched chunks from the first key of a key blob, tier code of each matched chunk)."""
        if not blob:
            return 0, b""
        bits = self.agent.directory_tiers(digest, pack_keys(blob), self.timeout(context),
                                          lambda d: self.ns_id(d, context))
        if bits is None:
            reply = self.call("lookup", {"ns": digest, "keys": blob}, context)
            return reply["matched"], reply["tiers"]
        return stored_prefix(bits)

    def describe(self, digest: bytes, principal: Principal, context) -> dict:
        """The namespace's description, if it exists and the caller may see its tenant."""
        if len(digest) != 16:
            raise InvalidArgument(f"namespace must be a 16-byte digest, got {len(digest)} bytes")
        description = self.namespaces(context).get(digest)
        if description is None:
            description = self.namespaces(context, refresh=True).get(digest)
        if description is None:
            raise NotFound(f"namespace {digest.hex()} is not registered on node {self.node}")
        if not principal.may_see(str(description.get("tenant", ""))):
            raise PermissionDenied(f"namespace {digest.hex()} belongs to a tenant this token is not scoped to")
        return description

    def visible(self, principal: Principal, context) -> dict[bytes, dict]:
        return {d: desc for d, desc in self.namespaces(context, refresh=True).items()
                if principal.may_see(str(desc.get("tenant", "")))}

    def keys_of(self, query: pb.ChunkQuery, principal: Principal, context) -> tuple[bytes, bytes, int]:
        """(namespace digest, the chunk keys as one blob of 16-byte keys, chunk tokens) of a query,
        validated: the blob is what the agent takes, so nothing splits and re-joins it."""
        description = self.describe(query.namespace, principal, context)
        limit = self.cfg.control.max_request_chunks
        chunk_tokens = int(description.get("chunk_tokens") or 0)
        # the fields set (non-empty), each read out of the message once (a bytes field is copied per read)
        fields = {field.name: value for field, value in query.ListFields() if field.name != "namespace"}
        given = sorted(fields)
        if len(given) != 1:
            raise InvalidArgument("give exactly one of token_ids, token_ids_le32, chunk_hashes, chunk_hashes_packed"
                                  + (f" (got {', '.join(given)})" if given else ""))
        value = fields[given[0]]
        if given[0] in ("chunk_hashes", "chunk_hashes_packed"):
            if given[0] == "chunk_hashes":
                if any(len(k) != 16 for k in value):
                    raise InvalidArgument("every chunk hash must be 16 bytes")
                blob = b"".join(value)
            else:
                blob = value
                if len(blob) % 16:
                    raise InvalidArgument("chunk_hashes_packed must be a multiple of 16 bytes long")
            if len(blob) // 16 > limit:
                raise InvalidArgument(f"{len(blob) // 16} chunk hashes exceed control.max_request_chunks ({limit})")
            return query.namespace, blob, chunk_tokens
        if given[0] == "token_ids_le32":
            if len(value) % 4:
                raise InvalidArgument("token_ids_le32 must be a multiple of 4 bytes long")
            n_tokens = len(value) // 4
        else:
            n_tokens = len(value)
        if not chunk_tokens:
            raise InvalidArgument(f"namespace {query.namespace.hex()} has no description to hash tokens with "
                                  f"(recovered from disk?); send chunk hashes")
        if n_tokens > limit * chunk_tokens:
            raise InvalidArgument(f"{n_tokens} tokens exceed control.max_request_chunks ({limit}) "
                                  f"chunks of {chunk_tokens}")
        namespace = self._hasher(query.namespace, description)
        tokens = np.frombuffer(value, dtype="<u4") if given[0] == "token_ids_le32" else np.array(value, dtype=np.uint32)
        return query.namespace, b"".join(chunk_keys(namespace, tokens)), chunk_tokens

    def _hasher(self, digest: bytes, description: dict) -> Namespace:
        """The Namespace whose digest is `digest`, rebuilt from its description (cached)."""
        namespace = self._hashers.get(digest)
        if namespace is None:
            fields = {k: v for k, v in description.items() if k in Namespace.__dataclass_fields__}
            try:
                namespace = Namespace(**fields)
            except (TypeError, KVStoreError):
                namespace = None
            if namespace is None or namespace.digest != digest:
                raise InvalidArgument("the namespace's description does not hash to its digest; send chunk hashes")
            self._hashers[digest] = namespace
        return namespace

    # ---- RPCs ------------------------------------------------------------------------------------
    def match(self, digest: bytes, blob: bytes, context) -> tuple[int, bytes, dict[str, tuple[int, bytes]]]:
        """(matched chunks anywhere, tier code of each, {node: (its prefix in chunks, tier codes)}).
        In front of a cluster agent: its cluster lookup (every holder node; tier `remote` for chunks only
        other nodes hold); else this node's directory."""
        if blob and self.agent.is_cluster(self.timeout(context)):
            reply = self.call("lookup", {"ns": digest, "keys": blob, "cluster": True}, context)
            nodes = {node: (int(held["chunks"]), held["tiers"]) for node, held in reply["nodes"].items()
                     if held["chunks"]}
            return reply["matched"], reply["tiers"], nodes
        matched, tiers = self.prefix(digest, blob, context)
        return matched, tiers, ({self.node: (matched, tiers)} if matched else {})

    @_rpc
    def Lookup(self, request, context, principal):
        digest, blob, chunk_tokens = self.keys_of(request.query, principal, context)
        matched, tiers, nodes = self.match(digest, blob, context)
        n_keys = len(blob) // 16
        counts = _tier_counts(tiers)
        for code, name in TIER_NAMES.items():
            if counts[code]:
                self.metrics.lookup_chunks.labels(name).inc(int(counts[code]))
        if n_keys > matched:
            self.metrics.lookup_chunks.labels("none").inc(n_keys - matched)
        return pb.LookupResponse(query_chunks=n_keys, matched_chunks=matched,
                                 matched_tokens=matched * chunk_tokens, chunk_tokens=chunk_tokens,
                                 nodes=[_node_match(node, run, node_tiers, chunk_tokens)
                                        for node, (run, node_tiers) in sorted(nodes.items(), key=lambda n: -n[1][0])])

    @_rpc
    def Score(self, request, context, principal):
        digest, blob, chunk_tokens = self.keys_of(request.query, principal, context)
        _, _, nodes = self.match(digest, blob, context)
        return pb.ScoreResponse(matched_tokens_by_node={node: run * chunk_tokens for node, (run, _) in nodes.items()})

    def node_stats(self, context) -> dict[str, dict]:
        """Agent stats by node: every cluster member's (a member that did not answer: {"error": why}),
        or this node's."""
        replies = self.on_nodes("stats", context)
        return {node: reply[1] if reply[0] == "ok" else {"error": reply[2]} for node, reply in replies.items()}

    @_rpc
    def Stats(self, request, context, principal):
        visible = self.visible(principal, context)
        namespaces = [pb.NamespaceInfo(digest=d, description={k: str(v) for k, v in desc.items()})
                      for d, desc in visible.items()]
        answered = [(node, stats) for node, stats in self.node_stats(context).items() if "error" not in stats]
        # the namespaces are those the agent in front of us knows (its node comes first)
        return pb.StatsResponse(nodes=[_node_stats(node, stats, namespaces if i == 0 else [])
                                       for i, (node, stats) in enumerate(answered)])

    @_rpc
    def Health(self, request, context, principal):
        reason = self.agent_problem(self.timeout(context))
        if reason:
            return pb.HealthResponse(status=pb.HealthResponse.NOT_SERVING, message=reason, nodes={self.node: reason})
        if not self.agent.is_cluster(self.timeout(context)):
            return pb.HealthResponse(status=pb.HealthResponse.SERVING, nodes={self.node: "serving"})
        hellos = self.on_nodes("hello", context, {"version": PROTOCOL_VERSION})  # not every member's full stats
        nodes = {node: "serving" if reply[0] == "ok" else reply[2] for node, reply in hellos.items()}
        down = sorted(node for node, state in nodes.items() if state != "serving")
        # The controller serves while its own agent does; members that did not answer are named.
        return pb.HealthResponse(status=pb.HealthResponse.SERVING, nodes=nodes,
                                 message=f"{len(down)} of {len(nodes)} nodes not answering" if down else "")

    def agent_problem(self, timeout: float) -> str:
        """Why the agent is not serving ("" if it answers `hello` within `timeout`): what Health and the
        grpc.health.v1 status report."""
        try:
            self.agent.call("hello", {"version": PROTOCOL_VERSION}, timeout)
        except KVStoreError as exc:
            return str(exc) or type(exc).__name__
        return ""

    @_rpc
    def ListChunks(self, request, context, principal):
        if request.tier not in PB_TO_TIER:
            raise InvalidArgument(f"unknown tier {request.tier}")
        page_size = request.page_size or 1000
        if page_size > MAX_PAGE:
            raise InvalidArgument(f"page_size {page_size} exceeds {MAX_PAGE}")
        args: dict = {"tier": PB_TO_TIER[request.tier], "pinned": request.pinned_only}
        if request.namespace:
            self.describe(request.namespace, principal, context)
            args["ns"] = request.namespace
        # Nodes are listed one after another, in node order; the page token is "<node>:<position>".
        nodes = self.nodes(context)
        if request.node:
            if request.node not in nodes:
                raise NotFound(f"node {request.node} is not a node this controller serves ({', '.join(nodes)})")
            nodes = [request.node]
        node, start = _parse_page_token(request.page_token, nodes)
        nodes = nodes[nodes.index(node):] if node else nodes
        visible = self.visible(principal, context) if principal.tenants is not None else None
        # a node that does not know the namespace holds none of it; one that is down is left out of a
        # listing of every node, and is an error when asked for by name
        tolerate = ("not_found",) if request.node else ("not_found", "unavailable")
        chunks: list[pb.ChunkInfo] = []
        for i, n in enumerate(nodes):
            # One node at a time, for the room left: a node's listing scans what it holds, so a node
            # whose rows could not fit on this page is not asked.
            first = start if n == node else 0
            call = {**args, "start": first, "limit": page_size - len(chunks)}
            reply = _answers(self.on_nodes("chunks", context, calls={n: call}), tolerate).get(n)
            if reply is None:
                continue
            chunks += [pb.ChunkInfo(hash=key, namespace=ns, node=n, tiers=_PB_TIERS_OF_BITS[bits])
                       for key, ns, bits in reply["chunks"] if visible is None or ns in visible]
            if reply["next"]:  # rows left on this node: the next page goes on from there
                return pb.ListChunksResponse(chunks=chunks, next_page_token=f"{n}:{reply['next']}")
            if len(chunks) == page_size:  # full, this node done: the next page starts at the next node
                later = nodes[i + 1:]
                return pb.ListChunksResponse(chunks=chunks, next_page_token=f"{later[0]}:0" if later else "")
        return pb.ListChunksResponse(chunks=chunks)

    @_rpc
    def Evict(self, request, context, principal):
        digest, blob, _ = self.keys_of(request.query, principal, context)
        unknown = [t for t in request.tiers if t not in _LOCAL_TIERS]
        if unknown:
            raise InvalidArgument(f"Evict takes tiers TIER_CPU and TIER_DISK, not {unknown}")
        tiers = [_LOCAL_TIERS[t] for t in request.tiers] or ["cpu", "disk"]
        counts = _summed(_answers(self.on_nodes("evict", context, {"ns": digest, "keys": blob, "tiers": tiers})))
        return pb.EvictResponse(cpu_chunks=counts["cpu"], disk_chunks=counts["disk"], pinned_chunks=counts["pinned"])

    @_rpc
    def Clear(self, request, context, principal):
        target = request.WhichOneof("target")
        if target == "namespace":
            self.describe(request.namespace, principal, context)
            digests = [request.namespace]
        elif target == "tenant":
            if not principal.may_see(request.tenant):
                raise PermissionDenied(f"this token is not scoped to tenant {request.tenant!r}")
            digests = [d for d, desc in self.namespaces(context, refresh=True).items()
                       if str(desc.get("tenant", "")) == request.tenant]
        else:
            raise InvalidArgument("Clear needs a namespace or a tenant")
        cpu = disk = 0
        for digest in digests:
            counts = _summed(_answers(self.on_nodes("clear", context, {"ns": digest})))
            cpu, disk = cpu + counts["cpu"], disk + counts["disk"]
        return pb.ClearResponse(namespaces=len(digests), cpu_chunks=cpu, disk_chunks=disk)

    @_rpc
    def Pin(self, request, context, principal):
        if request.lease:
            return self._renew(request, context, principal)
        digest, blob, _ = self.keys_of(request.query, principal, context)
        replies = self.on_nodes("pin", context, {"ns": digest, "keys": blob, "ttl": request.ttl_s})
        leases = {node: reply[1]["lease"] for node, reply in replies.items() if reply[0] == "ok" and reply[1]["lease"]}
        failed = {node: reply for node, reply in replies.items() if reply[0] != "ok" and reply[1] != "not_found"}
        if failed:  # all or nothing, as on one agent: what did pin is unpinned, then the error is raised
            self.on_nodes("unpin", context, calls={node: {"ns": digest, "lease": lid} for node, lid in leases.items()})
            _answers(failed)
        return pb.PinResponse(pinned_chunks=sum(replies[node][1]["pinned"] for node in leases),
                              lease=self._lease(digest, leases, context))

    def _renew(self, request, context, principal):
        """Pin with `lease`: that lease, on every node it holds chunks on, lasts `ttl_s` from now."""
        digest, leases = self._parse_lease(request.lease, context)
        self.describe(digest, principal, context)
        renewed = self._on_lease("pin", request.lease, digest, leases, context, key="renew", ttl=request.ttl_s)
        return pb.PinResponse(pinned_chunks=sum(reply["pinned"] for reply in renewed.values()),
                              lease=self._lease(digest, {node: leases[node] for node in renewed}, context))

    @_rpc
    def Unpin(self, request, context, principal):
        digest, leases = self._parse_lease(request.lease, context)
        self.describe(digest, principal, context)
        self._on_lease("unpin", request.lease, digest, leases, context, key="lease")
        return pb.UnpinResponse()

    def _on_lease(self, op: str, lease: str, digest: bytes, leases: dict[str, int], context, key: str,
                  **args) -> dict[str, dict]:
        """Agent op `op` on every node of a lease, with that node's lease id as arg `key`: the replies of
        the nodes where it is still live (NotFound if none)."""
        live = _answers(self.on_nodes(op, context, calls={node: {"ns": digest, key: lid, **args}
                                                          for node, lid in leases.items()}))
        if not live:
            raise NotFound(f"pin lease {lease} is unknown, expired or released")
        return live

    def _lease(self, digest: bytes, leases: dict[str, int], context) -> str:
        """The lease string of per-node agent leases: "<namespace hex>-<id>@<node>+..." in a cluster,
        "<namespace hex>-<id>" on one node; "" when nothing was pinned."""
        if not leases:
            return ""
        if not self.agent.is_cluster(self.timeout(context)):
            return f"{digest.hex()}-{leases[self.node]}"
        return f"{digest.hex()}-" + "+".join(f"{lid}@{node}" for node, lid in sorted(leases.items()))

    def _parse_lease(self, lease: str, context) -> tuple[bytes, dict[str, int]]:
        """(namespace digest, node -> agent lease id) of a lease string from Pin (see _lease)."""
        ns_hex, _, parts = lease.partition("-")
        leases: dict[str, int] = {}
        try:
            digest = bytes.fromhex(ns_hex)
            for part in parts.split("+"):
                lid, _, node = part.partition("@")
                if not lid.isdigit() or node in leases:
                    raise ValueError(part)
                leases[node] = int(lid)
        except ValueError:
            digest = b""
        if len(digest) != 16 or not leases:
            raise InvalidArgument(f"{lease!r} is not a lease from Pin (<namespace hex>-<id>[@<node>][+...])")
        if "" in leases:  # "<id>" alone: a lease of the node this controller fronts
            leases[self.own_node(context)] = leases.pop("")
        return digest, leases

    def own_node(self, context) -> str:
        """The node of the agent this controller fronts: its Ray node id in a cluster, else the host name."""
        return self.agent.node(self.timeout(context)) or self.node

    @_rpc
    def Move(self, request, context, principal):
        digest, blob, _ = self.keys_of(request.query, principal, context)
        if request.to_tier not in _LOCAL_TIERS:
            raise InvalidArgument(f"Move takes to_tier TIER_CPU or TIER_DISK, not {request.to_tier}")
        if request.to_node and request.to_node != self.own_node(context):
            return self._move_to_node(request.to_node, digest, blob, _LOCAL_TIERS[request.to_tier], context)
        timeout = self.timeout(context)  # the agent answers with what is on disk by then, not an error
        reply = self.agent.call("move", {"ns": digest, "keys": blob, "tier": _LOCAL_TIERS[request.to_tier],
                                         "timeout": max(0.0, timeout - _DEADLINE_MARGIN_S)}, timeout)
        return pb.MoveResponse(moved_chunks=reply["moved"])

    def _move_to_node(self, target: str, digest: bytes, blob: bytes, tier: str, context) -> pb.MoveResponse:
        """Move to another cluster member: it pulls every chunk of the prompt some node holds, moves them
        into `tier` there; then the other nodes drop the chunks the target holds (pinned ones stay)."""
        # the namespace is known here (keys_of described it): register it on the target, a no-op if it is
        register = {"ns": digest, "geometry": self._geometries[digest], "description": self._namespaces[digest]}
        _answers(self.on_nodes("register", context, calls={target: register}), tolerate=())
        pulled = _answers(self.on_nodes("pull", context, calls={target: {"ns": digest, "keys": blob}}), tolerate=())
        held = np.flatnonzero(np.frombuffer(pulled[target]["tiers"], dtype=np.uint8) != TIER_NONE)
        if not held.size:
            return pb.MoveResponse()
        held_blob = pick_keys(blob, held)
        left = max(0.0, self.timeout(context) - 2 * _DEADLINE_MARGIN_S)
        moved = _answers(self.on_nodes("move", context, calls={target: {"ns": digest, "keys": held_blob, "tier": tier,
                                                                        "timeout": left}}), tolerate=())
        others = [node for node in self.nodes(context) if node != target]
        # a node that is down keeps its copies (no harm: the target's are the same bytes)
        _answers(self.on_nodes("evict", context, calls={node: {"ns": digest, "keys": held_blob} for node in others}),
                 tolerate=("not_found", "unavailable"))
        return pb.MoveResponse(moved_chunks=moved[target]["moved"])

    @_rpc
    def Prefetch(self, request, context, principal):
        digest, blob, _ = self.keys_of(request.query, principal, context)
        if self.agent.is_cluster(self.timeout(context)):
            self.call("prefetch", {"ns": digest, "keys": blob}, context)  # pulls from peers start in the background
        reply = self.call("move", {"ns": digest, "keys": blob, "tier": "cpu"}, context)
        return pb.PrefetchResponse(missing_chunks=len(blob) // 16 - reply["moved"])

    def WatchEvents(self, request, context):
        started = time.perf_counter()
        try:
            principal = self.auth.check(context.invocation_metadata())
            if request.namespace:
                self.describe(request.namespace, principal, context)
            since = request.since or self.agent.call("events", {"since": 0, "limit": 1},
                                                     self.cfg.control.call_timeout_s)["last"]
            while context.is_active():
                reply = self.agent.call("events", {"since": since, "limit": 1000}, self.cfg.control.call_timeout_s)
                dropped = reply["dropped"]
                for event in reply["events"]:
                    message = self._event(event, request.namespace, principal, dropped)
                    if message is not None:
                        dropped = 0
                        yield message
                since = reply["next"]
                if not reply["events"]:
                    time.sleep(_WATCH_POLL_S)
        except Exception as exc:
            code = status_of(exc)
            self.metrics.rpc_seconds.labels("WatchEvents", code.name).observe(time.perf_counter() - started)
            _abort("WatchEvents", code, exc, context)

    def _event(self, event: dict, only: bytes, principal: Principal, dropped: int) -> pb.Event | None:
        digest = event["ns"]
        if only and digest != only:
            return None
        description = self._namespaces.get(digest)
        if description is None and digest:
            description = self.namespaces(None, refresh=True).get(digest)
        if description is None or not principal.may_see(str(description.get("tenant", ""))):
            return None
        message = pb.Event(seq=event["seq"], timestamp=event["time"], node=self.node, namespace=digest,
                           dropped=dropped)
        blob = event["keys"]
        hashes = [blob[i:i + 16] for i in range(0, len(blob), 16)]
        medium = TIER_NAMES.get(event["tier"], "").upper()
        if event["kind"] == "stored":
            message.stored.CopyFrom(pb.BlockStored(block_hashes=hashes, medium=medium,
                                                   block_size=int(description.get("chunk_tokens") or 0)))
        elif event["kind"] == "removed":
            message.removed.CopyFrom(pb.BlockRemoved(block_hashes=hashes, medium=medium))
        else:
            message.cleared.SetInParent()
        return message

    def close(self) -> None:
        self.agent.close()


class ControlServer:
    """A gRPC server with the ControlService (and its metrics endpoint) for the agent at `socket_path`.

    Beside it, without a token: the standard grpc.health.v1 Health service, whose status for "" and
    for kvstore.v1.ControlService a background thread keeps equal to whether the agent answers (checked
    every _HEALTH_CHECK_S), and server reflection (v1alpha). Plaintext, or TLS / mTLS (control.tls_*).
    """

    def __init__(self, cfg: KVStoreConfig, socket_path: str | None = None, auth: TokenAuth | None = None):
        self.cfg = cfg
        self.auth = auth or TokenAuth.from_config(cfg)
        socket_path = socket_path or cfg.socket_path
        self.metrics = ControllerMetrics(lambda: self.servicer.agent.call("stats", {}, cfg.control.call_timeout_s))
        self.servicer = ControlServicer(cfg, socket_path, self.auth, self.metrics)
        # so_reuseport off: a second controller on a taken port must fail, not share it silently
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.control.workers,
                                                              thread_name_prefix="kvstore-control"),
                                   options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ControlServiceServicer_to_server(self.servicer, self._server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((CONTROL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self._server)
        self._health_status: int | None = None
        self._stopping = threading.Event()
        self._health_thread = threading.Thread(target=self._watch_agent, name="kvstore-control-health", daemon=True)
        self.scheme = server_scheme(cfg.control)  # "plaintext", "TLS" or "mTLS"
        self.port = 0
        self.metrics_port = 0

    def start(self) -> "ControlServer":
        """Bind and serve; raises OSError if the address (or the metrics address) cannot be bound, and
        ConfigError naming the key if a TLS file (control.tls_*) cannot be read."""
        address = self.cfg.control.address
        host, _, _ = address.rpartition(":")
        credentials = server_credentials(self.cfg.control)
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        if self.cfg.control.metrics_address:
            self.metrics_port = self.metrics.serve(self.cfg.control.metrics_address)
        self._refresh_health()  # the first Check already tells the truth
        self._server.start()
        self._health_thread.start()
        self.address = f"{host}:{self.port}"
        return self

    def _refresh_health(self) -> None:
        """Set the grpc.health.v1 status of "" and of ControlService from the agent (only on a change,
        so that Watch streams see changes, not every check)."""
        try:
            problem = self.servicer.agent_problem(self.cfg.control.call_timeout_s)
        except Exception as exc:  # not a known agent failure, but not health either
            log.exception("health check failed")
            problem = f"health check failed: {exc!r}"
        status = health_pb2.HealthCheckResponse.NOT_SERVING if problem else health_pb2.HealthCheckResponse.SERVING
        if status != self._health_status:
            if problem:
                log.warning("agent not serving: %s", problem)
            self._health_status = status
            for service in ("", CONTROL_SERVICE):
                self.health.set(service, status)

    def _watch_agent(self) -> None:
        while not self._stopping.wait(_HEALTH_CHECK_S):
            self._refresh_health()

    def stop(self, grace: float = 1.0) -> None:
        self._stopping.set()
        self.health.enter_graceful_shutdown()  # NOT_SERVING to Check and Watch while draining
        self._server.stop(grace).wait(grace + 1)
        if self._health_thread.is_alive():
            self._health_thread.join(self.cfg.control.call_timeout_s + 1)
        self.metrics.close()
        self.servicer.close()
