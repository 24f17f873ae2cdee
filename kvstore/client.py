"""LocalClient: the engine-side API of the node agent.

Control goes over the agent's Unix socket, one round trip per request (not per chunk); data moves
through the shared-memory arena that the client maps: a put is one copy of each chunk into its slot
(a strided source is gathered straight into place; `put_async` returns before the agent has answered
the commit), a get is one copy out of it (read in place with no round trip while the chunks are in
the arena; or no copy, with `acquire`, which hands out views that stay valid until released).

    client = LocalClient(namespace=Namespace(model="SmolLM2-135M"), geometry=SMOLLM2_135M)
    keys = client.keys(tokens)
    client.put(keys, kv_chunks)                 # kv_chunks: [n, layers, planes, tokens, heads, head_dim]
    hit = client.lookup(tokens)                 # longest stored prefix, per-chunk tier
    got = client.get(keys[: hit.chunks])        # or client.get(keys, out=buffer)
"""

from __future__ import annotations

import platform
import socket
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from . import codec
from .bytecopy import as_numpy, byte_rows
from .codec import CODEC_AT, HEADER_BYTES, KEY_AT, NAMESPACE_AT, PAYLOAD_LEN_AT, SERIAL_AT, ChunkHeader
from .config import KVStoreConfig, load_config
from .errors import AgentUnavailable, CorruptChunk, InvalidArgument, KVStoreError, LeaseExpired
from .keys import ChunkKey, Namespace, chunk_keys
from .layout import Geometry
from .node import (DIR_BITS, RESERVE_EXISTS, RESERVE_NO_SPACE, TIER_CPU, TIER_DISK, TIER_GPU, TIER_NAMES,
                   TIER_REMOTE, _geometry_wire)
from .protocol import NO_REPLY, PROTOCOL_VERSION, ConnectionClosed, FrameReader, pack, raise_for_reply
from .tiers.cpu import LOCATION_UNIT, map_arena
from .tiers.index import SharedIndexReader
from .tiers.memory import pack_keys

_RAW = codec.CODEC_IDS["raw"]
# Loads seen in program order (x86-64 keeps them so), which reading a slot without a pin relies on
# (LocalClient._copy_published); other machines pin every chunk they read.
_IN_ORDER_LOADS = platform.machine().lower() in ("x86_64", "amd64")
_LEASE_MARGIN_S = 1.0  # stop touching a slot this long before the agent may reclaim it
_MAX_CREDIT = 64  # slots a client keeps reserved for its next put
# Puts of one client in flight at once (put_async), and so credits it may hold: while the agent commits
# one put, the next is copied into slots reserved by the commit before.
_PUT_WINDOW = 2
_CREDIT_MEMORY = 16  # puts whose sizes the next credit's size is chosen from
# A credit put of at least this many bytes commits all its chunks but the last while it copies the last
# (the agent's ~1 ms commit then overlaps the copy); a smaller one is not worth a second message.
PIPELINE_MIN_BYTES = 8 << 20
_ALIVE_CHECK_S = 1.0  # how long a lookup trusts the shared directory without hearing from the agent


def _lease_deadline(sent: float, ttl: float) -> float:
    """When this client must stop touching slots granted by a request sent at `sent` (monotonic)."""
    return sent + ttl - min(_LEASE_MARGIN_S, ttl / 4)


@dataclass(frozen=True)
class LookupResult:
    chunks: int  # stored chunks from the start of the prompt
    tokens: int  # chunks * chunk_tokens
    tier_codes: bytes  # tier of each matched chunk, as wire codes (docs/local-protocol.md)

    @property
    def tiers(self) -> tuple[str, ...]:
        """Tier name of each matched chunk ('gpu', 'cpu', 'disk', 'remote')."""
        return tuple(TIER_NAMES[t] for t in self.tier_codes)

    @property
    def remote(self) -> bool:
        """Some matched chunks are on other nodes: a get pulls them first (wait for it, or prefetch)."""
        return TIER_REMOTE in self.tier_codes


@dataclass(frozen=True)
class ClusterLookupResult(LookupResult):
    """A lookup across the cluster: the prefix held anywhere, and every node's own prefix."""

    nodes: tuple[tuple[str, int, tuple[str, ...]], ...] = ()  # (node id, chunks from the first, tiers)
    node: str = ""  # the node of the agent this client talks to


@dataclass(frozen=True)
class PutResult:
    stored: int  # newly stored chunks
    existing: int  # already stored (or being stored by another client): nothing written
    no_space: int  # dropped: nothing evictable in the arena
    errors: tuple[tuple[int, str, str], ...] = ()  # (index, code, message) of rejected chunks


@dataclass
class PendingPut:
    """Arena slots granted to one put (`LocalClient.begin_put`), filled by the caller, then committed."""

    rid: int
    keys: list[bytes]
    offsets: list[int]  # slot offset of each key, or RESERVE_EXISTS / RESERVE_NO_SPACE
    sizes: list[int]  # chunk sizes, header included
    group: int  # quantisation group of the codec (0 for raw)
    named: dict[int, bytes] | None  # credit slot -> key, when the slots came from a credit
    deadline: float  # monotonic time after which the slots may no longer be touched
    credit: dict | None = None  # the credit the slots came from (kept if nothing is written)

    def slots(self) -> list[tuple[int, int]]:
        """(index, offset) of each chunk that must be written."""
        return [(i, offset) for i, offset in enumerate(self.offsets) if offset >= 0]


@dataclass
class _Commits:
    """The commits sent for one PendingPut; its outcome reads their replies."""

    pending: PendingPut
    replies: list["Reply"]

    def outcome(self) -> tuple[int, int, int, list]:
        """(stored, existing, no_space, errors); raises a commit's typed error."""
        return _put_outcome(self.pending, [reply.result() for reply in self.replies])


class PutHandle:
    """A put whose chunks are in the arena and whose commits are on their way to the agent
    (LocalClient.put_async)."""

    def __init__(self, batches: list[tuple[int, _Commits]]):
        self._batches = batches  # (index of the batch's first key in the put, its commits)

    def _replies(self) -> Iterator["Reply"]:
        return (reply for _, commits in self._batches for reply in commits.replies)

    def done(self) -> bool:
        """Every commit is answered: result() returns without waiting."""
        return all(reply.done() for reply in self._replies())

    def wait(self) -> None:
        """Wait until every commit is answered (errors are kept for result())."""
        for reply in self._replies():
            reply.wait()

    def result(self) -> PutResult:
        """The put's outcome, once the agent has published its chunks; raises a commit's typed error."""
        totals = [0, 0, 0]
        errors: list[tuple[int, str, str]] = []
        for start, commits in self._batches:
            stored, existing, no_space, errs = commits.outcome()
            totals = [totals[0] + stored, totals[1] + existing, totals[2] + no_space]
            errors.extend((start + i, code, msg) for i, code, msg in errs)
        return PutResult(*totals, errors=tuple(errors))


class Reply:
    """The reply to a request sent with `AgentConnection.submit`. It is read off the socket when
    `result()` asks for it, or earlier, when a later request needs the socket: the agent answers a
    connection's requests in order, so every reply before one's own is read first."""

    __slots__ = ("op", "_conn", "_on_result", "_done", "_value", "_error")

    def __init__(self, conn: "AgentConnection", op: str, on_result: Callable[[dict], None] | None = None):
        self.op = op
        self._conn = conn
        self._on_result = on_result  # called with the result once read (under the connection's lock)
        self._done = False
        self._value = None
        self._error: Exception | None = None

    def _settle(self, frame=None, error: Exception | None = None) -> None:
        if error is None:
            try:
                self._value = raise_for_reply(frame)
            except KVStoreError as exc:
                error = exc
        self._error = error
        self._done = True
        if error is None and self._on_result is not None:
            self._on_result(self._value)

    def done(self) -> bool:
        return self._done

    def wait(self) -> None:
        """Read up to this reply; an error (a lost connection too) is kept for result()."""
        if not self._done:
            try:
                self._conn.read_until(self)
            except AgentUnavailable:
                pass  # the connection closed: every unread reply is settled with that error

    def result(self):
        """The reply's result; raises its typed error (AgentUnavailable if the connection was lost)."""
        if not self._done:
            self._conn.read_until(self)
        if self._error is not None:
            raise self._error
        return self._value


class AgentConnection:
    """The socket to the node agent and the arena mapping; knows nothing of namespaces.

    Every call has a deadline (`timeout`); a transport failure closes the connection, raises
    AgentUnavailable, and the next call reconnects.
    """

    def __init__(self, socket_path: str | None = None, timeout: float = 10.0, cfg: KVStoreConfig | None = None,
                 on_connect=None):
        self.socket_path = socket_path or (cfg or load_config()).socket_path
        self.timeout = timeout
        self.on_connect = on_connect  # called after every (re)connect, e.g. to register namespaces
        self._sock: socket.socket | None = None
        self._arena_path: str | None = None
        self._lock = threading.RLock()  # one request/reply exchange at a time on the socket
        self._unread: deque[Reply] = deque()  # submitted requests whose replies are not read yet
        self.connect()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(f"no kvstore agent at {self.socket_path} ({exc}); start one with "
                                   f"`kvstore serve`") from None
        self._sock = sock
        self._frames = FrameReader(sock, 1 << 30)
        hello = self.call("hello", {"version": PROTOCOL_VERSION})
        self._frames.busy_poll_s = hello.get("busy_poll_us", 0) / 1e6  # the agent's setting, both ends
        if self._arena_path != hello["arena_path"]:
            self._mmap = map_arena(hello["arena_path"], hello["arena_bytes"], populate=hello["prefault"])
            self.arena = torch.frombuffer(self._mmap, dtype=torch.uint8)
            self.arena_np = np.frombuffer(self._mmap, dtype=np.uint8)  # cheaper to slice per chunk
            self.arena_words = np.frombuffer(self._mmap, dtype=np.uint64, count=hello["arena_bytes"] // 8)
            self._arena_path = hello["arena_path"]
        self.directory = self._shared_index(hello, "directory_path")  # lookups without a round trip
        self.locations = self._shared_index(hello, "locations_path")  # gets without a round trip
        self.lease_ttl_s = hello["lease_ttl_s"]
        self.arena_bytes = hello["arena_bytes"]
        self.max_batch = hello["max_batch_chunks"]
        self.agent_pid = hello["pid"]
        self.cluster = bool(hello.get("cluster"))  # the agent is a cluster member: misses may be remote hits
        self.node = hello.get("node", "")  # a cluster member's Ray node id
        self._alive_at = time.monotonic()
        if self.on_connect is not None:
            self.on_connect(self)

    def ensure_alive(self, every_s: float = _ALIVE_CHECK_S) -> None:
        """At most once every `every_s`, one round trip to the agent. The shared directory's mapping
        outlives an agent that was killed, so lookups answered from it alone would trust a dead
        agent's index forever; this makes them notice (AgentUnavailable) within a second."""
        now = time.monotonic()
        if now - self._alive_at >= every_s:
            self.call("hello", {"version": PROTOCOL_VERSION})
            self._alive_at = now

    def _shared_index(self, hello: dict, field: str) -> SharedIndexReader | None:
        """A reader of the shared index the agent names in `field`, or None: another host's or a vanished
        file (and an older agent's hello has no such field); what it serves then goes over the socket."""
        if not hello.get(field):
            return None
        try:
            return SharedIndexReader(hello[field],
                                     resolve=lambda: self.call("hello", {"version": PROTOCOL_VERSION})[field])
        except OSError:
            return None

    def call(self, op: str, args: dict, timeout: float | None = None):
        """One round trip (or a one-way message for NO_REPLY ops). Thread-safe."""
        with self._lock:
            return self._call(op, args, timeout)

    def _call(self, op: str, args: dict, timeout: float | None):
        if self._sock is None:
            self.connect()
        if timeout is not None:
            self._sock.settimeout(timeout)
        self._send(op, args)
        if op in NO_REPLY:
            return None
        self._read_unread()
        reply = self._read(op)
        if timeout is not None and self._sock is not None:
            self._sock.settimeout(self.timeout)
        return raise_for_reply(reply)

    def submit(self, op: str, args: dict, on_result: Callable[[dict], None] | None = None) -> Reply:
        """Send a request now and read its reply later (Reply.result), so the agent works on it while
        the caller goes on. `on_result` sees the result as soon as it is read. Thread-safe."""
        with self._lock:
            self._send(op, args)
            reply = Reply(self, op, on_result)
            self._unread.append(reply)
            return reply

    def read_until(self, reply: Reply) -> None:
        """Read replies off the socket, in order, until `reply`'s."""
        with self._lock:
            while not reply.done() and self._unread:
                self._read_next()

    def _read_unread(self) -> None:
        while self._unread:
            self._read_next()

    def _read_next(self) -> None:
        reply = self._unread.popleft()
        try:
            frame = self._read(reply.op)
        except AgentUnavailable as exc:
            reply._settle(error=exc)
            raise
        reply._settle(frame)

    def _send(self, op: str, args: dict) -> None:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(pack([op, args]))
        except OSError as exc:
            self._fail(op, exc)

    def _read(self, op: str):
        try:
            return self._frames.read()
        except (OSError, ConnectionClosed) as exc:
            self._fail(op, exc)

    def _fail(self, op: str, exc: Exception):
        self.close()
        kind = "timed out" if isinstance(exc, socket.timeout) else f"failed ({exc})"
        raise AgentUnavailable(f"agent call {op} {kind}") from None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
        while self._unread:  # their replies went with the socket
            reply = self._unread.popleft()
            reply._settle(error=AgentUnavailable(f"connection to the agent closed before the reply to {reply.op}"))


class LocalClient:
    """The node agent, seen from one namespace and chunk geometry."""

    def __init__(self, namespace: Namespace, geometry: Geometry, codec_name: str = "raw",
                 socket_path: str | None = None, timeout: float = 10.0, cfg: KVStoreConfig | None = None):
        if geometry.tokens != namespace.chunk_tokens:
            raise InvalidArgument(f"geometry.tokens ({geometry.tokens}) must equal namespace.chunk_tokens "
                                  f"({namespace.chunk_tokens})")
        codec.codec_id(codec_name)  # unknown codec: fail now, not at the first put
        if codec_name in ("int8", "int4") and geometry.dtype not in ("float32", "float16", "bfloat16"):
            raise InvalidArgument(f"codec {codec_name} needs a floating KV dtype, not {geometry.dtype}")
        self.namespace = namespace
        self.geometry = geometry
        self.codec = codec_name
        # Arena slots reserved by earlier commits for the next puts (at most _PUT_WINDOW), and the
        # commits sent that reserve more. Lock order: the connection's lock, then this one.
        self._credits: deque[dict] = deque()
        self._renewals: deque[Reply] = deque()
        self._in_flight: deque[PutHandle] = deque()  # puts whose commits may be unanswered
        self._credit_lock = threading.Lock()  # begin_put and commit_put may run on different threads
        self._recent_puts: deque[int] = deque(maxlen=_CREDIT_MEMORY)  # chunks in each recent put
        self._header_packers: dict[tuple[int, int], Callable[[bytes], bytes]] = {}
        self.conn = AgentConnection(socket_path, timeout, cfg, on_connect=self._register)

    def _register(self, conn: AgentConnection) -> None:
        with self._credit_lock:  # a new connection: slots of the old one are gone
            self._credits.clear()
            self._renewals.clear()
        self.ns_id = conn.call("register", {"ns": self.namespace.digest, "geometry": _geometry_wire(self.geometry),
                                            "description": _describe(self.namespace)})

    @property
    def _arena(self) -> torch.Tensor:
        return self.conn.arena

    @property
    def max_batch(self) -> int:
        return self.conn.max_batch

    def _call(self, op: str, args: dict, timeout: float | None = None):
        return self.conn.call(op, args, timeout)

    def close(self) -> None:
        """Wait for the commits of puts still in flight (so their chunks are published), then close."""
        for handle in self._in_flight:
            handle.wait()
        self._in_flight.clear()
        self.conn.close()

    def __enter__(self) -> "LocalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- keys and lookup -------------------------------------------------------------------------
    def keys(self, tokens) -> list[ChunkKey]:
        """Chunk keys of every full chunk of `tokens` in this client's namespace."""
        return chunk_keys(self.namespace, tokens)

    def _key_batches(self, keys: Sequence[bytes]) -> Iterator[tuple[int, bytes]]:
        for start in range(0, len(keys), self.max_batch):
            yield start, b"".join(keys[start:start + self.max_batch])

    def lookup(self, tokens_or_keys) -> LookupResult:
        """Longest run of stored chunks from the start: token ids, or keys from `keys()`.

        Answered from the agent's shared directory when it is mapped (no round trip; one a second checks
        that the agent is alive), else by the agent.
        It is advice: chunks can be evicted before they are read, and every read is verified."""
        keys = _as_keys(self, tokens_or_keys)
        if self.conn.directory is not None and keys:
            self.conn.ensure_alive()
            try:
                local = self._lookup_directory(keys)
                if local.chunks == len(keys) or not self.conn.cluster:
                    return local
                return self.cluster_lookup(keys)  # the rest of the prefix may be on other nodes
            except (OSError, ValueError):
                self.conn.directory = None  # unusable now: fall back to asking the agent
        if self.conn.cluster and keys:
            return self.cluster_lookup(keys)
        matched, tiers = 0, b""
        for _, blob in self._key_batches(keys):
            reply = self._call("lookup", {"ns": self.namespace.digest, "keys": blob})
            matched += reply["matched"]
            tiers += reply["tiers"]
            if reply["matched"] * 16 < len(blob):
                break
        return LookupResult(matched, matched * self.geometry.tokens, tiers)

    def cluster_lookup(self, tokens_or_keys) -> ClusterLookupResult:
        """The longest prefix held anywhere in the cluster (tier code remote for chunks only other
        nodes hold) and, for every node holding a prefix, its length and tiers. One round trip to the
        local agent, which asks the directory owners (with a deadline: an owner that does not answer
        makes its chunks misses)."""
        keys = _as_keys(self, tokens_or_keys)
        if not self.conn.cluster:
            local = self.lookup(keys)
            return ClusterLookupResult(local.chunks, local.tokens, local.tier_codes,
                                       (("local", local.chunks, local.tiers),) if local.chunks else ())
        if len(keys) > self.max_batch:
            raise InvalidArgument(f"a cluster lookup takes at most {self.max_batch} keys at once")
        reply = self._call("lookup", {"ns": self.namespace.digest, "keys": b"".join(keys), "cluster": True})
        nodes = tuple(sorted((node, n["chunks"], tuple(TIER_NAMES[t] for t in n["tiers"]))
                             for node, n in reply["nodes"].items()))
        return ClusterLookupResult(reply["matched"], reply["matched"] * self.geometry.tokens, reply["tiers"],
                                   nodes, reply["self"])

    def prefetch(self, keys: Sequence[bytes]) -> int:
        """Ask a cluster agent to start pulling the chunks among `keys` that other nodes hold, so a later
        get finds them local (or waits for the pull in progress). Returns how many are not local yet."""
        if not self.conn.cluster or not keys:
            return 0
        return sum(self._call("prefetch", {"ns": self.namespace.digest, "keys": blob})["missing"]
                   for _, blob in self._key_batches(keys))

    def _lookup_directory(self, keys: Sequence[bytes]) -> LookupResult:
        matched, codes = stored_prefix(self._directory_bits(keys))
        return LookupResult(matched, matched * self.geometry.tokens, codes)

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        out: list[bool] = []
        for _, blob in self._key_batches(keys):
            out.extend(t != 0 for t in self._call("contains", {"ns": self.namespace.digest, "keys": blob}))
        return out

    # ---- put -------------------------------------------------------------------------------------
    def put(self, keys: Sequence[bytes], chunks: torch.Tensor | Sequence[torch.Tensor]) -> PutResult:
        """Store `chunks[i]` (canonical layout, the geometry's shape and dtype) under `keys[i]`, and return
        once the agent has published them. Chunks already stored are not written again."""
        return self._put(keys, chunks, overlap=False).result()

    def put_async(self, keys: Sequence[bytes], chunks: torch.Tensor | Sequence[torch.Tensor]) -> PutHandle:
        """As `put`, but return once the chunks are copied into the arena and their commits sent: the
        caller may reuse `chunks` at once; the agent publishes the chunks before it answers any later
        request of this client; `result()` of the handle gives the PutResult (or raises the error).
        A stream of puts (an engine saving request after request) so keeps the agent's commit, and
        the wake-up of its process, off the copying thread's path. At most _PUT_WINDOW puts are in
        flight: the next one first waits for the oldest."""
        return self._put(keys, chunks, overlap=True)

    def _put(self, keys: Sequence[bytes], chunks: torch.Tensor | Sequence[torch.Tensor], overlap: bool) -> PutHandle:
        """Copy the chunks in and send their commits; `overlap`: the caller goes on before the replies."""
        if isinstance(chunks, torch.Tensor):
            if chunks.dim() == len(self.geometry.shape):
                chunks = chunks.unsqueeze(0)
            self._check_chunks(tuple(chunks.shape[1:]), chunks.dtype, chunks.device)  # all at once
        else:
            for chunk in chunks:
                self._check_chunks(tuple(chunk.shape), chunk.dtype, chunk.device)
        if len(chunks) != len(keys):
            raise InvalidArgument(f"{len(keys)} keys but {len(chunks)} chunks")
        self._wait_for_window()
        handle = PutHandle([(start, self._put_batch(keys[start:start + self.max_batch],
                                                    chunks[start:start + self.max_batch], overlap))
                            for start in range(0, len(keys), self.max_batch)])
        with self._credit_lock:
            self._in_flight.append(handle)
        return handle

    def _wait_for_window(self) -> None:
        """Forget answered puts; with _PUT_WINDOW still in flight, wait for the oldest."""
        while True:
            with self._credit_lock:
                if not self._in_flight:
                    return
                oldest = self._in_flight[0]
                if not oldest.done() and len(self._in_flight) < _PUT_WINDOW:
                    return
                self._in_flight.popleft()
            oldest.wait()

    def _check_chunks(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
        if shape != self.geometry.shape or dtype != self.geometry.torch_dtype:
            raise InvalidArgument(f"chunk of shape {shape} {dtype}; this namespace "
                                  f"holds {self.geometry.shape} {self.geometry.torch_dtype}")
        if device.type != "cpu":
            raise InvalidArgument("LocalClient.put takes CPU tensors (the GPU tier has its own path)")

    def _put_batch(self, keys, chunks, overlap: bool) -> _Commits:
        if self.codec == "raw":
            pending = self.begin_put(keys)
            rows = byte_rows(chunks) if isinstance(chunks, torch.Tensor) else None
            arena = self.conn.arena_np

            def write(slots: list[tuple[int, int]]) -> None:
                if rows is not None:  # contiguous chunks: each is one flat copy into its slot
                    for i, offset in slots:
                        np.copyto(arena[offset + HEADER_BYTES:offset + HEADER_BYTES + rows.shape[1]], rows[i])
                    return
                for i, slot in self.raw_slot_views(pending, slots):
                    # gather the (possibly strided) chunk straight into its slot, in its own dtype's width
                    np.copyto(as_numpy(slot), as_numpy(chunks[i]), casting="no")

            slots = pending.slots()
            if (pending.named is not None and len(slots) > 1
                    and sum(pending.sizes[i] for i, _ in slots) >= PIPELINE_MIN_BYTES):
                return self._commit_ahead(pending, slots, write, overlap)
            write(slots)
            return self._commit(pending, overlap)
        encoded = [codec.encode(chunk, self.codec) for chunk in chunks]
        pending = self.begin_put(keys, [HEADER_BYTES + payload.numel() for payload, _ in encoded],
                                 group=encoded[0][1] if encoded else 0)
        arena = self.conn.arena_np
        for i, offset in pending.slots():
            payload = as_numpy(encoded[i][0])
            arena[offset + HEADER_BYTES:offset + HEADER_BYTES + payload.size] = payload
        return self._commit(pending, overlap)

    def begin_put(self, keys: Sequence[bytes], sizes: list[int] | None = None, group: int = 0) -> "PendingPut":
        """Arena slots for `keys` (chunk sizes `sizes`, header included; raw chunks by default), to be
        filled by the caller and then published with `commit_put`. Keys the shared directory shows as
        stored get no slot. Costs no round trip when an earlier commit left a credit that fits.
        Safe to call from one thread while another commits."""
        if len(keys) > self.max_batch:
            raise InvalidArgument(f"a put takes at most {self.max_batch} keys at once")
        keys = list(keys)
        if sizes is None:
            sizes = [HEADER_BYTES + self.geometry.nbytes] * len(keys)
        credit = self._next_credit(sizes)
        if credit is not None:
            # Write into slots reserved by an earlier commit and name the keys at commit.
            # Chunks the shared directory shows as stored are skipped (the agent re-checks at commit).
            free = iter(enumerate(credit["offsets"]))
            offsets, named = [], {}
            for key, skip in zip(keys, self._stored(keys)):
                if skip:
                    offsets.append(RESERVE_EXISTS)
                    continue
                slot, offset = next(free)
                offsets.append(offset)
                named[slot] = key
            return PendingPut(credit["rid"], keys, offsets, sizes, group, named, credit["deadline"], credit)
        sent = time.monotonic()
        reply = self._call("reserve", {"ns": self.namespace.digest, "keys": b"".join(keys), "sizes": sizes})
        return PendingPut(reply["rid"], keys, reply["offsets"], sizes, group, None,
                          _lease_deadline(sent, reply["ttl"]))

    def _next_credit(self, sizes: list[int]) -> dict | None:
        """A held credit that serves a put of `sizes` (waiting, if none is held, for a commit already sent
        that reserves one), or None. Credits too small or expired are given back."""
        while True:
            unfit, credit, renewal = [], None, None
            with self._credit_lock:
                while self._credits and credit is None:
                    candidate = self._credits.popleft()
                    if credit_fits(candidate, sizes):
                        credit = candidate
                    else:
                        unfit.append(candidate)
                while self._renewals and self._renewals[0].done():
                    self._renewals.popleft()
                if credit is None and self._renewals:
                    renewal = self._renewals[0]
            for stale in unfit:
                self._call("abort", {"rid": stale["rid"]})
            if renewal is None:
                return credit
            renewal.wait()

    def _commit_ahead(self, pending: "PendingPut", slots: list[tuple[int, int]], write, overlap: bool) -> _Commits:
        """Write and commit a credit put in two parts: the agent publishes every chunk but the last, and
        reserves the next put's credit, while this process copies the last chunk; so only the last
        chunk's commit is left to wait for. (Measured with the credit still renewed by the last commit,
        8 chunks of 5.9 MB per put: 38.2 ms per 32 chunks, against 39.4 ms committing the first half
        ahead and 41.7 ms all at the end; moving the renewal ahead took bench tiers' put from
        0.743-0.771 to 0.772-0.778 x memcpy.)"""
        ahead = len(slots) - 1
        named = list(pending.named.items())  # (credit slot, key) in the order of `slots`
        renew = self._credit_sizes(pending.sizes)
        replies = []
        for part, extra in ((slice(0, ahead), {"keep": True, "renew": renew}), (slice(ahead, None), {})):
            write(slots[part])
            self._write_headers(pending, slots[part])
            self._abort_if_expired(pending)
            replies.append(self._submit_commit({"rid": pending.rid, "named": dict(named[part]), **extra},
                                               pending.sizes[0]))
        if overlap:
            self._top_up_credits(renew, pending.sizes[0])
        return _Commits(pending, replies)

    def _top_up_credits(self, sizes: list[int], size: int) -> None:
        """For puts that overlap (put_async): while fewer credits are held or coming than puts may be in
        flight, reserve one more without waiting, so the next put need not wait for this one's reply."""
        with self._credit_lock:
            short = len(self._credits) + sum(not r.done() for r in self._renewals) < _PUT_WINDOW
        if sizes and short:
            self._credit_reply("reserve", {"ns": self.namespace.digest, "sizes": sizes},
                               lambda result: result, size)

    def _submit_commit(self, args: dict, size: int) -> "Reply":
        """Send a commit of chunks of `size` bytes; with a `renew` it reserves a credit, kept when its
        reply is read."""
        if not args.get("renew"):
            args.pop("renew", None)
            return self.conn.submit("commit", args)
        return self._credit_reply("commit", args, lambda result: result.get("next"), size)

    def _credit_reply(self, op: str, args: dict, granted: Callable[[dict], dict | None], size: int):
        """Send a request that reserves a credit (`granted` picks it from the result) and keep the credit
        when the reply is read; until then, begin_put may wait for it."""
        sent = time.monotonic()
        reply = self.conn.submit(op, args, on_result=lambda result: self._take_credit(granted(result), size, sent))
        with self._credit_lock:
            self._renewals.append(reply)
        return reply

    def _abort_if_expired(self, pending: "PendingPut") -> None:
        """Past its deadline the agent may hand the slots to someone else: give them back and raise
        LeaseExpired instead of committing what they hold."""
        if time.monotonic() > pending.deadline:
            self._call("abort", {"rid": pending.rid})
            raise LeaseExpired("reservation expired before the chunks were written")

    def _write_headers(self, pending: "PendingPut", slots: list[tuple[int, int]]) -> None:
        arena = self.conn.arena_np
        for i, offset in slots:
            pack = self._header_packer(pending.sizes[i] - HEADER_BYTES, pending.group)
            arena[offset:offset + HEADER_BYTES] = np.frombuffer(pack(pending.keys[i]), dtype=np.uint8)

    def _header_packer(self, payload_len: int, group: int):
        """Packs this client's chunk header for a key (ChunkHeader.key_packer), one per payload size and
        quantisation group: a namespace's raw chunks all share one."""
        packer = self._header_packers.get((payload_len, group))
        if packer is None:
            if len(self._header_packers) >= 64:  # sizes of encoded chunks vary: keep the cache small
                self._header_packers.clear()
            packer = self._header_packers[payload_len, group] = ChunkHeader(
                codec=self.codec, geometry=self.geometry, payload_len=payload_len,
                namespace=self.namespace.digest, group=group).key_packer()
        return packer

    def _take_credit(self, granted: dict | None, size: int, sent: float) -> None:
        """Keep the credit a commit reserved for a later put, or give back one the arena could not fill."""
        if granted and all(o >= 0 for o in granted["offsets"]):
            self._keep_credit({"rid": granted["rid"], "offsets": granted["offsets"], "size": size,
                               "deadline": _lease_deadline(sent, granted["ttl"])})
        elif granted:
            self._call("abort", {"rid": granted["rid"]})

    def raw_slot_views(self, pending: "PendingPut", slots: list[tuple[int, int]] | None = None
                       ) -> list[tuple[int, torch.Tensor]]:
        """(index, chunk-shaped tensor view of the arena slot) of each raw chunk `pending` must write
        (or of `slots`, some of pending.slots())."""
        shape, dtype = self.geometry.shape, self.geometry.torch_dtype
        arena = self._arena
        return [(i, arena[offset + HEADER_BYTES:offset + pending.sizes[i]].view(dtype).view(shape))
                for i, offset in (pending.slots() if slots is None else slots)]

    def commit_put(self, pending: "PendingPut") -> tuple[int, int, int, list]:
        """Write the chunk headers and publish the filled slots of `pending`:
        (stored, existing, no_space, errors)."""
        return self._commit(pending).outcome()

    def _commit(self, pending: "PendingPut", overlap: bool = False) -> _Commits:
        """Write the chunk headers of `pending` and send its commit (renewing the credit); `overlap`: the
        caller goes on before the reply (put_async)."""
        if pending.credit is not None and not pending.named:
            self._keep_credit(pending.credit)  # nothing written: the slots serve the next put
            return _Commits(pending, [])
        if not pending.slots():  # every key stored already or without space
            return _Commits(pending, [])
        self._abort_if_expired(pending)
        self._write_headers(pending, pending.slots())
        renew = self._credit_sizes(pending.sizes)
        args = {"rid": pending.rid, "renew": renew}
        if pending.named is not None:
            args["named"] = pending.named
        commits = _Commits(pending, [self._submit_commit(args, pending.sizes[0])])
        if overlap:
            self._top_up_credits(renew, pending.sizes[0])
        return commits

    def _keep_credit(self, credit: dict) -> None:
        """Hold `credit` for a later put; past _PUT_WINDOW held, the oldest is given back."""
        with self._credit_lock:
            self._credits.append(credit)
            extra = self._credits.popleft() if len(self._credits) > _PUT_WINDOW else None
        if extra is not None:
            self._call("abort", {"rid": extra["rid"]})

    def _credit_sizes(self, sizes: list[int]) -> list[int]:
        """Sizes of the credit to reserve for the next put, if this one's chunks have one size: as many
        slots as the largest of the last _CREDIT_MEMORY puts (so a short put, such as the tail of a
        prompt, does not leave a credit too small for the next full one), at most _MAX_CREDIT (bigger
        puts amortise their round trips) and 1/16 of the arena."""
        if not sizes or any(size != sizes[0] for size in sizes) or len(sizes) > _MAX_CREDIT:
            return []
        self._recent_puts.append(len(sizes))
        return [sizes[0]] * min(max(self._recent_puts), max(1, self.conn.arena_bytes // 16 // sizes[0]))

    def _stored(self, keys: Sequence[bytes]) -> list[bool]:
        """Which keys the shared directory shows as stored in this namespace (all False without it)."""
        if self.conn.directory is None:
            return [False] * len(keys)
        try:
            values = self.conn.directory.lookup(pack_keys(keys)).tolist()
        except (OSError, ValueError):
            return [False] * len(keys)
        # per key in Python, as begin_put's own loop: a put's few keys cost less so than numpy calls
        ns_id = self.ns_id
        return [value >> 8 == ns_id and value & 0xFF != 0 for value in values]  # absent: -1 >> 8 == -1

    def _directory_bits(self, keys: Sequence[bytes]) -> np.ndarray:
        """Tier bits of each key in the shared directory; 0 where absent or in another namespace."""
        return namespace_bits(self.conn.directory.lookup(pack_keys(keys)), self.ns_id)

    # ---- get -------------------------------------------------------------------------------------
    @contextmanager
    def _pinned_slots(self, keys: Sequence[bytes], prefix: bool, first: int = 0
                      ) -> Iterator[list[tuple[int, int, int]]]:
        """Pin the stored chunks among `keys`; yield (index, offset, size) of each hit, valid inside the
        block. Each slot's header must name its key (the agent validated the header at commit).
        Miss reasons and remote hits are noted by index in the caller's request, keys[0] being `first`."""
        if len(keys) > self.max_batch:
            raise InvalidArgument(f"acquire takes at most {self.max_batch} keys at once")
        sent = time.monotonic()
        reply = self._call("acquire", {"ns": self.namespace.digest, "keys": b"".join(keys), "prefix": prefix})
        self.last_miss_reasons = {first + i: reason for i, reason in reply["reasons"].items()}
        # indexes a cluster agent pulled from peers first
        self.last_remote_hits = [first + i for i in reply.get("remote", [])]
        arena = self.conn.arena_np
        try:
            slots = []
            for i, (offset, size) in enumerate(zip(reply["offsets"], reply["sizes"])):
                if offset < 0:
                    continue
                if arena[offset + KEY_AT:offset + KEY_AT + 16].tobytes() != keys[i]:
                    raise CorruptChunk(f"arena slot of chunk {i} holds another chunk")
                slots.append((i, offset, size))
            yield slots
            if time.monotonic() > _lease_deadline(sent, reply["ttl"]):
                raise LeaseExpired("lease expired while the chunks were being read; data discarded")
        finally:
            if self.conn.connected:
                self._call("release", {"lid": reply["lid"]})

    @contextmanager
    def acquire(self, keys: Sequence[bytes], prefix: bool = True) -> Iterator[list[tuple[ChunkHeader, torch.Tensor]]]:
        """Pin the stored chunks among `keys` and yield (header, payload view) for each hit, in order
        (with `prefix`, up to the first miss). The views are only valid inside the `with` block."""
        with self._pinned_slots(keys, prefix) as slots:
            views = []
            for i, offset, size in slots:
                header = ChunkHeader.unpack(self._arena[offset:offset + HEADER_BYTES].numpy())
                if header.total_len != size:
                    raise CorruptChunk(f"arena slot of chunk {i} holds a chunk of another size")
                views.append((header, self._arena[offset + HEADER_BYTES:offset + size]))
            yield views

    def get(self, keys: Sequence[bytes], out: torch.Tensor | None = None) -> torch.Tensor:
        """The stored prefix of `keys` as a tensor [n, *geometry.shape] (n may be < len(keys)).
        With `out` ([len(keys), *shape]) the chunks are decoded straight into it and out[:n] returned.

        Chunks the arena holds are copied out of their slots with no round trip (`_copy_published`);
        from the first that is not there on, one `acquire` per batch pins the rest (bringing disk and
        remote hits into the arena first) and they are copied or decoded from their pinned slots."""
        if out is not None and (tuple(out.shape[1:]) != self.geometry.shape or out.shape[0] < len(keys)
                                or out.dtype != self.geometry.torch_dtype):
            raise InvalidArgument(f"out must be [>= {len(keys)}, *{self.geometry.shape}] "
                                  f"{self.geometry.torch_dtype}")
        self.last_miss_reasons, self.last_remote_hits = {}, []
        results = []
        for start in range(0, len(keys), self.max_batch):
            batch = keys[start:start + self.max_batch]
            if out is None:
                target = torch.empty((len(batch), *self.geometry.shape), dtype=self.geometry.torch_dtype)
            else:
                target = out[start:start + len(batch)]
            got = self._copy_published(batch, target)
            if got < len(batch):
                got += self._copy_pinned(batch[got:], target[got:], start + got)
            results.append(target[:got])
            if got < len(batch):
                break
        if out is not None:
            return out[: sum(len(r) for r in results)]
        if not results:
            return torch.empty((0, *self.geometry.shape), dtype=self.geometry.torch_dtype)
        return results[0] if len(results) == 1 else torch.cat(results)

    def _copy_published(self, keys: Sequence[bytes], target: torch.Tensor) -> int:
        """Copy the leading chunks of `keys` that the arena holds, raw, into target's rows without pinning
        them; returns how many (the first one missing, of another codec or changed meanwhile ends it).

        The agent stamps a published slot's header with a fresh nonzero serial and zeroes it before the
        slot can be freed (tiers/cpu.py), and a writer only gets the slot after that. So when the serial
        reads the same before and after the copy, and the header still names this namespace and key, no
        byte of the copy came from anyone else's write. That needs the CPU to keep loads in program order
        (x86-64 does); elsewhere every get pins. One message, not waited for, tells the agent of the hits
        (eviction order, hit counts)."""
        locations = self.conn.locations
        if locations is None or not _IN_ORDER_LOADS or not keys:
            return 0
        try:
            places = locations.lookup(pack_keys(keys)).tolist()
        except (OSError, ValueError):  # the agent stopped (or moved the index away): pin instead
            return 0
        arena, words = self.conn.arena_np, self.conn.arena_words
        nbytes = self.geometry.nbytes
        end = HEADER_BYTES + nbytes
        digest = self.namespace.digest
        rows = byte_rows(target)
        copied = 0
        for key, place in zip(keys, places):
            offset = place * LOCATION_UNIT
            if place < 0 or offset + end > arena.size:
                break
            stamp = (offset + SERIAL_AT) >> 3
            serial = int(words[stamp])
            names = arena[offset + NAMESPACE_AT:offset + KEY_AT + 16]  # the header's namespace, then key
            expected = digest + key
            if (serial == 0 or names.tobytes() != expected or arena[offset + CODEC_AT] != _RAW
                    or int(words[(offset + PAYLOAD_LEN_AT) >> 3]) != nbytes):
                break
            _copy_raw(arena[offset + HEADER_BYTES:offset + end], rows, target, copied)
            if int(words[stamp]) != serial or names.tobytes() != expected:
                break  # unpublished during the copy: pinned and copied again below
            copied += 1
        if copied:
            self.conn.call("touch", {"ns": digest, "keys": b"".join(keys[:copied])})
        return copied

    def _copy_pinned(self, keys: Sequence[bytes], target: torch.Tensor, first: int) -> int:
        """Pin the stored prefix of `keys` with one acquire and copy (or decode) it into target's rows;
        returns how many. `first`: the index of keys[0] in the caller's request."""
        raw_size = HEADER_BYTES + self.geometry.nbytes
        arena = self.conn.arena_np
        with self._pinned_slots(keys, True, first) as slots:
            rows = byte_rows(target)
            for n, (_, offset, size) in enumerate(slots):
                if size == raw_size and arena[offset + CODEC_AT] == _RAW:  # raw: one copy straight out
                    _copy_raw(arena[offset + HEADER_BYTES:offset + size], rows, target, n)
                else:
                    header = ChunkHeader.unpack(arena[offset:offset + HEADER_BYTES])
                    codec.decode(header, self._arena[offset + HEADER_BYTES:offset + size], out=target[n])
            return len(slots)

    # ---- management ------------------------------------------------------------------------------
    def evict(self, keys: Sequence[bytes], tiers: Sequence[str] = ("cpu", "disk")) -> dict:
        return self._call("evict", {"ns": self.namespace.digest, "keys": b"".join(keys), "tiers": list(tiers)})

    def clear(self) -> dict:
        """Remove every chunk of this client's namespace."""
        return self._call("clear", {"ns": self.namespace.digest})

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until write-behind has put every committed chunk on disk."""
        return self._call("flush", {"timeout": timeout}, timeout=timeout + self.conn.timeout)["flushed"]

    def stats(self) -> dict:
        return self._call("stats", {})


def _copy_raw(payload: np.ndarray, rows: np.ndarray | None, target: torch.Tensor, n: int) -> None:
    """Copy a raw chunk's payload bytes into target[n]: one flat copy into `rows` (byte_rows(target))
    when target is contiguous, else into the strided view in its dtype's width."""
    if rows is not None:
        np.copyto(rows[n], payload)
    else:
        dst = as_numpy(target[n])
        np.copyto(dst, payload.view(dst.dtype).reshape(dst.shape), casting="no")


def namespace_bits(values: np.ndarray, ns_id: int) -> np.ndarray:
    """Tier bits from shared-directory values (ns_id << 8 | bits, -1 if absent); 0 where absent or in
    another namespace (-1 >> 8 is -1, never a namespace id)."""
    return np.where(values >> 8 == ns_id, values & 0xFF, 0)


# The wire tier code of every combination of tier bits: the fastest tier holding the chunk (0: none).
_CODE_OF_BITS = np.array([TIER_GPU if bits & DIR_BITS[TIER_GPU] else TIER_CPU if bits & DIR_BITS[TIER_CPU]
                          else TIER_DISK if bits & DIR_BITS[TIER_DISK] else 0 for bits in range(256)], dtype=np.uint8)


def stored_prefix(bits: np.ndarray) -> tuple[int, bytes]:
    """(chunks stored from the first, wire tier code of each: the fastest tier holding it) from tier bits."""
    codes = _CODE_OF_BITS[bits]
    misses = np.flatnonzero(codes == 0)
    matched = int(misses[0]) if misses.size else len(codes)
    return matched, codes[:matched].tobytes()


def _put_outcome(pending: PendingPut, results: list[dict]) -> tuple[int, int, int, list]:
    """(stored, existing, no_space, errors) of a put from its reservation and its commits' results."""
    existing = sum(1 for o in pending.offsets if o == RESERVE_EXISTS)
    no_space = sum(1 for o in pending.offsets if o == RESERVE_NO_SPACE)
    return (sum(r["stored"] for r in results), existing + sum(r.get("existing", 0) for r in results), no_space,
            [tuple(e) for r in results for e in r["errors"]])


def credit_fits(credit: dict, sizes: list[int]) -> bool:
    """A credit serves a put if it is still valid, has enough slots, and they are the right size."""
    return (time.monotonic() < credit["deadline"] and len(credit["offsets"]) >= len(sizes)
            and all(size == credit["size"] for size in sizes))


def _as_keys(client: LocalClient, tokens_or_keys) -> list[bytes]:
    if isinstance(tokens_or_keys, (list, tuple)) and tokens_or_keys and isinstance(tokens_or_keys[0], bytes):
        return list(tokens_or_keys)
    return client.keys(tokens_or_keys)


def _describe(ns: Namespace) -> dict:
    return {"model": ns.model, "kv_dtype": ns.kv_dtype, "layout": ns.layout, "tp_rank": ns.tp_rank,
            "tp_size": ns.tp_size, "pp_rank": ns.pp_rank, "pp_size": ns.pp_size, "tenant": ns.tenant,
            "chunk_tokens": ns.chunk_tokens}
