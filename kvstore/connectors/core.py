"""What every engine connector needs, whatever the engine: a link to the node agent that survives the agent,
and the executor that moves KV between the engine's paged cache and the store.

- `StoreSettings`: the namespace and chunk geometry an engine's configuration comes to (both sides of a
  connector must agree on them, or keys and chunks would not match), and the options shared by engines.
- `AgentLink`: a LocalClient that may not exist yet. It connects lazily, reconnects after a failure, and
  after a failed connect waits before trying again, so an engine without an agent keeps serving (without
  reuse) and is never blocked. Every call has the client's deadline.
- `PagedTransfer`: loads (scatter stored chunks from the arena straight into the engine's blocks, in the
  step or on a thread of their own) and saves (gather computed chunks straight into arena slots in the
  step; their commits run on a background thread, so the step is held only for the copy), with the
  blocks that failed to load (the engine recomputes them) and counts of what it did.

Every failure of the store (agent down, a chunk evicted since the lookup, a checksum mismatch) is a miss:
a failed load reports its blocks, a failed save is only a future miss. Nothing here raises into the engine.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch

from .. import codec as codecs
from ..client import LocalClient
from ..codec import codec_id
from ..errors import AgentUnavailable, InvalidArgument, KVStoreError
from ..keys import Namespace
from ..layout import Geometry, default_chunk_tokens, dtype_name
from ..transfer import PagedLayout, gather, scatter

log = logging.getLogger("kvstore.connectors")
T = TypeVar("T")

RECONNECT_S = 5.0  # how often a connector without an agent tries again
CALL_TIMEOUT_S = 5.0  # deadline of every agent call from inside an engine
_COMMIT_QUEUE = 64  # saves waiting for their commits: bounded, so a slow agent pushes back on the step


@dataclass(frozen=True)
class StoreSettings:
    """What both sides of a connector derive from the engine's configuration."""

    namespace: Namespace
    geometry: Geometry
    block_size: int  # tokens per engine block (page)
    socket_path: str | None
    codec: str
    save: bool  # store computed chunks
    opaque_pages: bool  # engine pages are moved verbatim, whole blocks only (an ISA-specific CPU layout)
    key_source: str = "tokens"  # "tokens" (our hash of token ids) or "block_hashes" (the engine's, folded)

    @property
    def blocks_per_chunk(self) -> int:
        return self.namespace.chunk_tokens // self.block_size

    @classmethod
    def for_engine(cls, *, model_id: str, kv_dtype: str, layout: str, layers: int, kv_heads: int, head_dim: int,
                   mla: bool, block_size: int, chunk_tokens: int = 0, tp_rank: int = 0, tp_size: int = 1,
                   pp_rank: int = 0, pp_size: int = 1, tenant: str = "", socket_path: str | None = None,
                   codec: str = "raw", save: bool = True, opaque_pages: bool = False,
                   key_source: str = "tokens") -> "StoreSettings":
        """The namespace and chunk geometry of an engine's KV, from what the engine's config says. A chunk
        is `chunk_tokens` tokens (0: default_chunk_tokens(block_size)), a whole number of the engine's
        blocks; with MLA, one latent plane of one head. A setup that cannot work is refused here, at
        startup, with a message: never by serving wrong KV later."""
        chunk_tokens = chunk_tokens or default_chunk_tokens(block_size)
        if chunk_tokens <= 0 or chunk_tokens % block_size:
            raise InvalidArgument(f"chunk_tokens ({chunk_tokens}) must be a positive multiple of the engine's "
                                  f"block_size ({block_size})")
        if key_source not in ("block_hashes", "tokens"):
            raise InvalidArgument(f"key_source must be block_hashes or tokens, not {key_source!r}")
        kv_dtype = dtype_name(kv_dtype)
        namespace = Namespace(model=model_id, kv_dtype=kv_dtype, layout=layout, tp_rank=tp_rank, tp_size=tp_size,
                              pp_rank=pp_rank, pp_size=pp_size, tenant=tenant, chunk_tokens=chunk_tokens)
        geometry = Geometry(layers=layers, heads=1 if mla else kv_heads, head_dim=head_dim, tokens=chunk_tokens,
                            planes=1 if mla else 2, dtype=kv_dtype)
        codec_id(codec)  # an unknown codec is refused now, not at the first save
        return cls(namespace, geometry, block_size, socket_path, codec, save, opaque_pages, key_source)


class AgentLink:
    """A LocalClient that may not exist yet (see the module docstring). `role` names the link in logs."""

    def __init__(self, settings: StoreSettings, role: str):
        self.settings, self.role = settings, role
        self._client: LocalClient | None = None
        self._next_try = 0.0
        self._warned = False
        self.failures = 0

    def get(self) -> LocalClient | None:
        """The client, connecting if it is time to try; None while no agent answers."""
        if self._client is not None:
            return self._client
        if time.monotonic() < self._next_try:
            return None
        try:
            self._client = LocalClient(self.settings.namespace, self.settings.geometry, self.settings.codec,
                                       socket_path=self.settings.socket_path, timeout=CALL_TIMEOUT_S)
            if self._warned:
                log.warning("kvstore %s: node agent reachable again", self.role)
            self._warned = False
        except KVStoreError as exc:
            self.failed(exc)
        return self._client

    def failed(self, exc: Exception) -> None:
        """Drop the client after an agent failure; the caller treats the operation as a miss. A connection
        that broke may be retried at once (the agent may have restarted); a failed connect waits."""
        self.failures += 1
        if not self._warned:
            log.warning("kvstore %s: node agent unavailable, serving without reuse (%s)", self.role, exc)
            self._warned = True
        was_connected = self._client is not None
        if was_connected:
            self._client.close()
        self._client = None
        self._next_try = time.monotonic() + (0.0 if was_connected else RECONNECT_S)

    def run(self, operation: Callable[[LocalClient], T]) -> T:
        """`operation(client)`, reconnecting and trying once more if the agent's connection broke, so an
        agent restart costs no request. Raises AgentUnavailable when no agent answers."""
        for _ in range(2):
            client = self.get()
            if client is None:
                break
            try:
                return operation(client)
            except AgentUnavailable as exc:
                self.failed(exc)
        raise AgentUnavailable(f"no node agent for the {self.role} (next try in at most {RECONNECT_S:.0f} s)")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


@dataclass
class LoadSpec:
    """Load tokens [token_start, token_end) of a request from the chunks `keys` (the first being chunk
    number `first_chunk` of the request) into its blocks."""

    req_id: str
    keys: list[bytes]
    first_chunk: int
    token_start: int
    token_end: int
    block_ids: list[int]
    is_async: bool


@dataclass
class SaveSpec:
    """Store chunks `first_chunk ...` of a request (keys given) from its blocks."""

    req_id: str
    keys: list[bytes]
    first_chunk: int
    block_ids: list[int]


STAT_FIELDS = ("loaded_tokens", "load_failed_blocks", "saved_chunks", "agent_unavailable")


class PagedTransfer:
    """Loads into and saves out of one engine process's paged KV cache. Thread-safe."""

    def __init__(self, settings: StoreSettings):
        self.settings = settings
        self.agent = AgentLink(settings, "worker")
        self.layers: list[torch.Tensor] = []
        self.layout: PagedLayout | None = None
        self._lock = threading.Lock()  # load results and counts, shared with the threads below
        self._load_errors: set[int] = set()
        self._finished_loads: list[tuple[str, list[int]]] = []
        self._async_loads: queue.Queue = queue.Queue()
        self._commits: queue.Queue = queue.Queue(maxsize=_COMMIT_QUEUE)
        self._threads: list[threading.Thread] = []
        self._counts = dict.fromkeys(STAT_FIELDS, 0)
        self._links = [self.agent]  # every link to the agent, for the agent_unavailable count
        self._failures_reported = 0

    def register(self, layers: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> None:
        """The engine's per-layer KV tensors (all of one layout, read from their shape and strides); starts
        the commit and async-load threads."""
        s = self.settings
        layers = list(layers)
        # Opaque CPU pages: any bijection between a block's rows and chunk positions restores the block
        # exactly, and the 'vllm' order is one; transfers stay whole-block (ranges are block-aligned).
        layout = PagedLayout.from_tensor(layers[0], block_size=s.block_size, num_kv_heads=s.geometry.heads,
                                         head_size=s.geometry.head_dim, mla=s.geometry.planes == 1,
                                         order="vllm" if s.opaque_pages else None)
        for i, tensor in enumerate(layers):
            try:
                layout.check(tensor)
            except InvalidArgument as exc:
                raise InvalidArgument(f"KV cache of layer {names[i] if names else i}: {exc}") from None
        if len(layers) != s.geometry.layers or dtype_name(layers[0].dtype) != s.geometry.dtype:
            raise InvalidArgument(f"engine registered {len(layers)} KV layers of {layers[0].dtype}; the chunk "
                                  f"geometry expects {s.geometry.layers} of {s.geometry.dtype}")
        self.layers, self.layout = layers, layout
        for target in (self._commit_loop, self._async_load_loop):
            thread = threading.Thread(target=target, name=f"kvstore-{target.__name__[1:]}", daemon=True)
            thread.start()
            self._threads.append(thread)

    # ---- loads ------------------------------------------------------------------------------------
    def start_loads(self, loads: Sequence[LoadSpec]) -> None:
        """Synchronous loads now (the step waits for them); asynchronous ones on their own thread."""
        for spec in loads:
            if spec.is_async:
                self._async_loads.put(spec)
            else:
                failed = self._load(spec, self.agent)
                with self._lock:
                    self._load_errors.update(failed)

    def _load(self, spec: LoadSpec, agent: AgentLink) -> list[int]:
        """Scatter the chunks of `spec` from the arena into the paged cache. Returns the blocks whose tokens
        could not be loaded (the engine recomputes them): from the first chunk missing on."""
        chunk = self.settings.namespace.chunk_tokens
        loaded_until = spec.token_start

        def load(client: LocalClient) -> None:
            nonlocal loaded_until
            loaded_until = spec.token_start  # a retry on a new connection starts over
            step = client.max_batch
            for start in range(0, len(spec.keys), step):
                batch_until = loaded_until
                with client.acquire(spec.keys[start:start + step], prefix=True) as hits:
                    for n, (header, payload) in enumerate(hits):
                        base = (spec.first_chunk + start + n) * chunk
                        lo, hi = max(spec.token_start, base), min(spec.token_end, base + chunk)
                        kv = self._chunk_tensor(header, payload)
                        scatter(kv[:, :, lo - base:hi - base], self.layers, self.layout,
                                self.layout.rows(spec.block_ids, lo, hi - lo))
                        batch_until = hi
                loaded_until = batch_until  # only once the lease held to the end of the reads
                if loaded_until < min(spec.token_end, (spec.first_chunk + start + step) * chunk):
                    return  # a chunk is missing: it and everything after it are recomputed

        try:
            agent.run(load)
        except KVStoreError as exc:
            log.warning("kvstore: load for request %s failed after %d tokens (%s); the rest is recomputed",
                        spec.req_id, loaded_until - spec.token_start, exc)
        block = self.settings.block_size
        failed = [] if loaded_until >= spec.token_end else \
            spec.block_ids[loaded_until // block: -(-spec.token_end // block)]
        with self._lock:
            self._counts["loaded_tokens"] += loaded_until - spec.token_start
            self._counts["load_failed_blocks"] += len(failed)
        return failed

    def _chunk_tensor(self, header, payload: torch.Tensor) -> torch.Tensor:
        geometry = self.settings.geometry
        if header.codec == "raw":
            return payload.view(geometry.torch_dtype).view(geometry.shape)
        return codecs.decode(header, payload)

    def _async_load_loop(self) -> None:
        agent = AgentLink(self.settings, "async loader")  # its own connection: never waits on the step's
        self._links.append(agent)
        while True:
            spec = self._async_loads.get()
            if spec is None:
                agent.close()
                return
            failed = self._load(spec, agent)
            with self._lock:
                self._finished_loads.append((spec.req_id, failed))

    def finished_loads(self) -> set[str]:
        """Requests whose asynchronous load is done; their failed blocks join the load errors reported
        next (an engine asks for those right after)."""
        with self._lock:
            done, self._finished_loads = self._finished_loads, []
            for _, failed in done:
                self._load_errors.update(failed)
        return {req_id for req_id, _ in done}

    def take_load_errors(self) -> set[int]:
        """Blocks that failed to load since the last call."""
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def take_counts(self) -> dict[str, int]:
        """What was done since the last call (STAT_FIELDS; agent_unavailable: failed calls to the agent)."""
        failures = sum(link.failures for link in self._links)
        with self._lock:
            counts, self._counts = self._counts, dict.fromkeys(STAT_FIELDS, 0)
        counts["agent_unavailable"] = failures - self._failures_reported
        self._failures_reported = failures
        return counts

    # ---- saves ------------------------------------------------------------------------------------
    def save(self, saves: Sequence[SaveSpec]) -> None:
        """Copy each new chunk out of the paged cache straight into an arena slot (inside the step); the
        commit of the slots runs on the commit thread."""
        if not saves or self.layout is None:
            return
        client = self.agent.get()
        if client is None:
            return
        chunk = self.settings.namespace.chunk_tokens
        for spec in saves:
            for start in range(0, len(spec.keys), client.max_batch):
                keys = spec.keys[start:start + client.max_batch]
                first = spec.first_chunk + start
                try:
                    if client.codec == "raw":
                        pending = client.begin_put(keys)
                        for i, slot in client.raw_slot_views(pending):
                            gather(self.layers, self.layout, self.layout.rows(spec.block_ids, (first + i) * chunk,
                                                                              chunk), slot)
                        self._commits.put((client, pending))
                    else:  # encoded codecs: copy out now, encode and store on the commit thread
                        out = torch.empty((len(keys), *self.settings.geometry.shape),
                                          dtype=self.settings.geometry.torch_dtype)
                        for i in range(len(keys)):
                            gather(self.layers, self.layout, self.layout.rows(spec.block_ids, (first + i) * chunk,
                                                                              chunk), out[i])
                        self._commits.put((client, (keys, out)))
                except AgentUnavailable as exc:
                    self.agent.failed(exc)
                    return
                except KVStoreError as exc:  # a lost save is only a future miss
                    log.warning("kvstore: save of request %s skipped (%s)", spec.req_id, exc)

    def _commit_loop(self) -> None:
        while True:
            item = self._commits.get()
            if item is None:
                return
            client, work = item
            try:
                stored = client.put(*work).stored if isinstance(work, tuple) else client.commit_put(work)[0]
                with self._lock:
                    self._counts["saved_chunks"] += stored
            except KVStoreError as exc:  # a lost save is only a future miss
                log.warning("kvstore: save failed (%s)", exc)

    def close(self) -> None:
        self._commits.put(None)
        self._async_loads.put(None)
        for thread in self._threads:
            thread.join(timeout=CALL_TIMEOUT_S)
