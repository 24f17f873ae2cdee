"""LocalClient: the engine-side API of the node agent, for one namespace and chunk geometry.

    client = LocalClient(namespace=Namespace(model="SmolLM2-135M"), geometry=SMOLLM2_135M)
    keys = client.keys(tokens)
    client.put(keys, kv_chunks)                 # kv_chunks: [n, layers, planes, tokens, heads, head_dim]
    hit = client.lookup(tokens)                 # longest stored prefix, per-chunk tier
    got = client.get(keys[: hit.chunks])        # or client.get(keys, out=buffer); client.read: and why not

Control goes over the agent's Unix socket (connection.py), one round trip per request, not per chunk;
data moves through the shared-memory arena the client maps: puts (puts.py) copy each chunk into its
slot once, gets (reads.py) copy it out once (or not at all, with `acquire`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Sequence

import torch

from .. import codec
from ..config import KVStoreConfig
from ..errors import InvalidArgument
from ..keys import ChunkKey, Namespace, chunk_keys
from ..layout import Geometry
from ..wire.messages import Clear, Evict, EvictReply, Flush, FlushReply, Register, Stats
from .binding import Binding
from .connection import AgentConnection
from .puts import PendingPut, PutHandle, PutPipeline
from .reads import Reader
from .results import ClusterLookupResult, GetResult, LookupResult, PutResult


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
        self._binding = Binding(None, namespace, geometry, codec_name)  # type: ignore[arg-type]
        self._puts = PutPipeline(self._binding)
        self._reader = Reader(self._binding)
        self.conn = self._binding.conn = AgentConnection(socket_path, timeout, cfg, on_connect=self._register)

    def _register(self, conn: AgentConnection) -> None:
        self._binding.conn = conn
        self._puts.forget_credits()  # a new connection: slots of the old one are gone
        self._binding.ns_id = conn.request(Register(self.namespace.digest, self.geometry.to_wire(),
                                                    _describe(self.namespace)))

    @property
    def ns_id(self) -> int:
        """The agent's id of this client's namespace."""
        return self._binding.ns_id

    @property
    def max_batch(self) -> int:
        return self.conn.max_batch

    def close(self) -> None:
        """Wait for the commits of puts still in flight (so their chunks are published), then close."""
        self._puts.wait_in_flight()
        self.conn.close()

    def __enter__(self) -> "LocalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- keys and lookup --------------------------------------------------------------------------
    def keys(self, tokens) -> list[ChunkKey]:
        """Chunk keys of every full chunk of `tokens` in this client's namespace."""
        return chunk_keys(self.namespace, tokens)

    def _as_keys(self, tokens_or_keys) -> list[bytes]:
        if isinstance(tokens_or_keys, (list, tuple)) and tokens_or_keys and isinstance(tokens_or_keys[0], bytes):
            return list(tokens_or_keys)
        return self.keys(tokens_or_keys)

    def lookup(self, tokens_or_keys) -> LookupResult:
        """Longest run of stored chunks from the start: token ids, or keys from `keys()`. Answered from the
        agent's shared directory when it is mapped (no round trip), else by the agent. It is advice:
        chunks can be evicted before they are read, and every read is verified."""
        return self._reader.lookup(self._as_keys(tokens_or_keys))

    def cluster_lookup(self, tokens_or_keys) -> ClusterLookupResult:
        """The longest prefix held anywhere in the cluster, and every node's own prefix."""
        return self._reader.cluster_lookup(self._as_keys(tokens_or_keys))

    def prefetch(self, keys: Sequence[bytes]) -> int:
        """Ask a cluster agent to start pulling the chunks among `keys` that other nodes hold, so a later
        get finds them local (or waits for the pull in progress). Returns how many are not local yet."""
        return self._reader.prefetch(keys)

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return self._reader.contains(keys)

    # ---- put --------------------------------------------------------------------------------------
    def put(self, keys: Sequence[bytes], chunks: torch.Tensor | Sequence[torch.Tensor]) -> PutResult:
        """Store `chunks[i]` (canonical layout, the geometry's shape and dtype) under `keys[i]`, and return
        once the agent has published them. Chunks already stored are not written again."""
        return self._puts.put(keys, chunks, overlap=False).result()

    def put_async(self, keys: Sequence[bytes], chunks: torch.Tensor | Sequence[torch.Tensor]) -> PutHandle:
        """As `put`, but return once the chunks are copied into the arena and their commits sent: the
        caller may reuse `chunks` at once; the agent publishes the chunks before it answers any later
        request of this client; `result()` of the handle gives the PutResult (or raises the error). A
        stream of puts (an engine saving request after request) so keeps the agent's commit, and the
        wake-up of its process, off the copying thread's path."""
        return self._puts.put(keys, chunks, overlap=True)

    def begin_put(self, keys: Sequence[bytes], sizes: list[int] | None = None, group: int = 0) -> PendingPut:
        """Arena slots for `keys`, to be filled by the caller (`raw_slot_views`) and then published with
        `commit_put`: a put that gathers straight from an engine's paged cache into the arena."""
        return self._puts.begin_put(keys, sizes, group)

    def raw_slot_views(self, pending: PendingPut, slots: list[tuple[int, int]] | None = None
                       ) -> list[tuple[int, torch.Tensor]]:
        return self._puts.raw_slot_views(pending, slots)

    def commit_put(self, pending: PendingPut) -> tuple[int, int, int, list]:
        """Publish the filled slots of `pending`: (stored, existing, no_space, errors)."""
        return self._puts.commit_put(pending)

    # ---- get --------------------------------------------------------------------------------------
    def get(self, keys: Sequence[bytes], out: torch.Tensor | None = None) -> torch.Tensor:
        """The stored prefix of `keys` as a tensor [n, *geometry.shape] (n may be < len(keys)). With `out`
        ([len(keys), *shape]) the chunks are decoded straight into it and out[:n] returned."""
        return self._reader.read(keys, out).chunks

    def read(self, keys: Sequence[bytes], out: torch.Tensor | None = None) -> GetResult:
        """As `get`, with the reason of each miss (by index in `keys`) and the indexes a cluster agent
        pulled from other nodes."""
        return self._reader.read(keys, out)

    def acquire(self, keys: Sequence[bytes], prefix: bool = True) -> AbstractContextManager:
        """Pin the stored chunks among `keys` and yield (header, payload view) for each hit, in order
        (with `prefix`, up to the first miss). The views are only valid inside the `with` block."""
        return self._reader.acquire(keys, prefix)

    # ---- management -------------------------------------------------------------------------------
    def evict(self, keys: Sequence[bytes], tiers: Sequence[str] = ("cpu", "disk")) -> dict:
        reply = self.conn.request(Evict(self.namespace.digest, b"".join(keys), list(tiers)), EvictReply)
        return reply.to_wire()

    def clear(self) -> dict:
        """Remove every chunk of this client's namespace."""
        return self.conn.request(Clear(self.namespace.digest), EvictReply).to_wire()

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until write-behind has put every committed chunk on disk."""
        return self.conn.request(Flush(timeout), FlushReply, timeout=timeout + self.conn.timeout).flushed

    def stats(self) -> dict:
        return self.conn.request(Stats())


def _describe(ns: Namespace) -> dict:
    return {"model": ns.model, "kv_dtype": ns.kv_dtype, "layout": ns.layout, "tp_rank": ns.tp_rank,
            "tp_size": ns.tp_size, "pp_rank": ns.pp_rank, "pp_size": ns.pp_size, "tenant": ns.tenant,
            "chunk_tokens": ns.chunk_tokens}
