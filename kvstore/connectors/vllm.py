"""vLLM KV connector (KV connector API v1): vLLM reuses the KV kvstore holds and saves what it computes.

    vllm serve <model> --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.connectors.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"chunk_tokens": 256}}'

vLLM builds two connector objects. The scheduler-side one (engine core process) asks the node agent how
much of a prompt is stored — from the agent's shared directory, no round trip — and plans, for every
engine step, which chunks the workers load and save. The worker-side one (each worker process) hands
those plans to the engine-agnostic core (core.py: PagedTransfer), which scatters stored chunks from the
agent's arena straight into the paged KV cache before the forward pass, and after it gathers newly
computed chunks out of the paged cache straight into arena slots; the commit of those slots runs on a
background thread, so the step is held only for the copy. This module is the vLLM adapter: settings
from vLLM's config, the scheduler's plans, and vLLM's connector API.

Chunk keys are folded from vLLM's own block hashes, so separate engine instances hit each other's chunks
when their hash settings agree (checked at startup, see `hash_settings_problem`). Every failure of the
store — agent down, a chunk evicted since the lookup, a checksum mismatch — is a miss: loads that fail are
reported through `get_block_ids_with_load_errors` and vLLM recomputes those blocks (with
`kv_load_failure_policy: "recompute"`; vLLM's default "fail" fails the request instead). Options
(`kv_connector_extra_config`) are listed in docs/vllm.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                               KVConnectorRole)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from ..errors import InvalidArgument, KVStoreError
from ..keys import chunk_keys, fold_block_hashes
from ..layout import dtype_name, torch_dtype
from .core import STAT_FIELDS, AgentLink, LoadSpec, PagedTransfer, SaveSpec, StoreSettings

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvstore.vllm")


# ---- settings shared by both sides ---------------------------------------------------------------
def hash_settings_problem(vllm_config: "VllmConfig") -> str | None:
    """Why vLLM's block hashes would differ between processes (so that engines could not share chunks
    keyed by them), or None when they agree. The 'sha256' family is seeded deterministically; the
    'xxhash' family draws a random seed per process unless PYTHONHASHSEED is set."""
    algo = vllm_config.cache_config.prefix_caching_hash_algo
    if algo.startswith("xxhash") and os.getenv("PYTHONHASHSEED") is None:
        return (f"prefix_caching_hash_algo={algo!r} seeds block hashes randomly per process unless "
                f"PYTHONHASHSEED is set; set PYTHONHASHSEED to one value for every engine, or use sha256_cbor")
    return None


def settings_from_vllm(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> StoreSettings:
    """Namespace, chunk geometry and options from the engine's config; unsupported setups are refused here,
    at startup, with a message — never by serving wrong KV later."""
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    known = {"socket_path", "chunk_tokens", "codec", "tenant", "model_id", "key_source"}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise InvalidArgument(f"unknown kv_connector_extra_config keys {unknown}; known: {sorted(known)}")
    model_config, cache_config, parallel = (vllm_config.model_config, vllm_config.cache_config,
                                            vllm_config.parallel_config)
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise InvalidArgument(f"KVStoreConnector supports models with one KV cache group (full attention); "
                              f"this model has {len(groups)}")
    block_size = cache_config.block_size
    cache_dtype = cache_config.cache_dtype
    kv_dtype = dtype_name(model_config.dtype if cache_dtype == "auto" else cache_dtype)
    key_source = str(extra.get("key_source", "auto"))
    problem = hash_settings_problem(vllm_config)
    if key_source == "auto":
        if problem:
            log.warning("kvstore: vLLM block hashes are not reproducible across processes (%s); keying chunks "
                        "by token ids instead (requests with images, LoRA or a cache salt are then not cached)",
                        problem)
        key_source = "tokens" if problem else "block_hashes"
    elif key_source == "block_hashes" and problem:
        log.warning("kvstore: %s; other engine processes will not hit this one's chunks", problem)
    head_dim = model_config.get_head_size()
    page_format = cpu_page_format(vllm_config, kv_dtype, block_size, head_dim)
    return StoreSettings.for_engine(
        model_id=str(extra.get("model_id") or model_config.model), kv_dtype=kv_dtype,
        layout=page_format or "canonical", layers=len(groups[0].layer_names),
        kv_heads=model_config.get_num_kv_heads(parallel), head_dim=head_dim,
        mla=bool(getattr(model_config, "use_mla", False)), block_size=block_size,
        chunk_tokens=int(extra.get("chunk_tokens") or 0),
        tp_rank=parallel.rank % max(parallel.tensor_parallel_size, 1) if hasattr(parallel, "rank") else 0,
        tp_size=parallel.tensor_parallel_size, pp_size=parallel.pipeline_parallel_size,
        tenant=str(extra.get("tenant", "")), socket_path=extra.get("socket_path"),
        codec=str(extra.get("codec", "raw")), save=bool(vllm_config.kv_transfer_config.is_kv_producer),
        opaque_pages=page_format is not None, key_source=key_source)


def cpu_page_format(vllm_config: "VllmConfig", kv_dtype: str, block_size: int, head_size: int) -> str | None:
    """The name of vLLM's CPU attention page format, or None on other backends.

    vLLM's CPU kernel packs each (block, head) page in an ISA-specific order (K transposed, or AMX tiles),
    so its pages cannot be read as per-token K and V. The connector then moves whole pages verbatim —
    exact, but only meaningful to engines with the same format, which the namespace's layout names."""
    if vllm_config.device_config.device_type != "cpu":
        return None
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(torch_dtype(kv_dtype), block_size, head_size, vllm_config.cache_config.cache_dtype)
    except (ImportError, NotImplementedError, AttributeError) as exc:
        raise InvalidArgument(f"cannot tell vLLM's CPU attention page format ({exc})") from None
    return f"vllm-cpu-pages:{isa}:block{block_size}"


# ---- metadata from the scheduler to the workers ----------------------------------------------------
@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class KVStoreConnectorStats(KVConnectorStats):
    """What the workers did since the last report, summed over workers: vLLM's stats logger prints it and
    its `kv_connector_stats` carry it. `agent_unavailable` counts failed calls to the node agent."""

    FIELDS = STAT_FIELDS

    def __post_init__(self) -> None:
        for name in self.FIELDS:
            self.data.setdefault(name, 0)

    def reset(self) -> None:
        self.data = {name: 0 for name in self.FIELDS}

    def aggregate(self, other: KVConnectorStats) -> "KVStoreConnectorStats":
        for name in self.FIELDS:
            self.data[name] += other.data.get(name, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


@dataclass
class _Tracked:
    """Scheduler-side state of one live request."""

    request: "Request"
    keys: list[bytes] = field(default_factory=list)  # of the full chunks so far (_SchedulerSide.keys)
    block_ids: list[int] = field(default_factory=list)
    stored_chunks: int = 0  # chunks known stored or handed to a save, from the start of the request
    load: tuple[int, int, bool] | None = None  # (token_start, token_end, async) planned, not yet sent


class KVStoreConnector(KVConnectorBase_V1):
    """vLLM's view of kvstore. See the module docstring."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config, role, kv_cache_config)
        self.settings = settings_from_vllm(vllm_config, kv_cache_config)
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = _SchedulerSide(self.settings)
            self._worker = None
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                log.warning("kvstore: kv_load_failure_policy is %r, so a chunk that fails to load (evicted "
                            "meanwhile, or failing its checksum) fails its request; set it to 'recompute'",
                            self._kv_transfer_config.kv_load_failure_policy)
        else:
            self._scheduler = None
            self._worker = PagedTransfer(self.settings)
        log.info("kvstore connector (%s): namespace %s, chunk %s, keys from %s", role.name,
                 self.settings.namespace.digest.hex()[:12], self.settings.geometry, self.settings.key_source)

    # ---- scheduler side ----
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        self._scheduler.after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self._scheduler.build_meta(scheduler_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Saves copy out of the paged cache inside the step (wait_for_save), so blocks can be freed now.
        self._scheduler.finished(request.request_id)
        return False, None

    # ---- worker side ----
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._worker.register(list(kv_caches.values()), list(kv_caches))

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        self._worker.start_loads(self._get_connector_metadata().loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv (arena -> paged cache is one memcpy per layer and chunk)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        return  # all layers are gathered at once in wait_for_save: one pass per chunk instead of per layer

    def wait_for_save(self):
        if self.has_connector_metadata():
            self._worker.save(self._get_connector_metadata().saves)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, self._worker.finished_loads() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """What the worker did since the last report (None when nothing happened)."""
        if self._worker is None:
            return None
        stats = KVStoreConnectorStats(data=self._worker.take_counts())
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KVStoreConnectorStats(data=dict(data or {}))

    def shutdown(self):
        if self._worker is not None:
            self._worker.close()


# ---- scheduler side -------------------------------------------------------------------------------
class _SchedulerSide:
    def __init__(self, settings: StoreSettings):
        self.settings = settings
        self.agent = AgentLink(settings, "scheduler")
        self.requests: dict[str, _Tracked] = {}

    def keys(self, tracked: _Tracked) -> list[bytes]:
        """Chunk keys of every full chunk of the request's tokens so far; computed again only when the
        request has grown by a chunk (lookups and load and save plans all ask)."""
        s, request = self.settings, tracked.request
        if s.key_source == "block_hashes":
            available = len(request.block_hashes) // s.blocks_per_chunk
        elif request.mm_features or request.lora_request is not None or request.cache_salt:
            return []  # token ids alone do not identify this KV
        else:
            available = len(request.all_token_ids) // s.namespace.chunk_tokens
        if len(tracked.keys) != available:
            tracked.keys = (fold_block_hashes(s.namespace, request.block_hashes, s.blocks_per_chunk)
                            if s.key_source == "block_hashes" else chunk_keys(s.namespace, request.all_token_ids))
        return tracked.keys

    def matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        tracked = self.requests.setdefault(request.request_id, _Tracked(request))
        chunk = self.settings.namespace.chunk_tokens
        # The last prompt token is always computed (its logits give the first output token); the
        # scheduler expects block-aligned counts.
        limit = (request.num_tokens - 1) // self.settings.block_size * self.settings.block_size
        keys = self.keys(tracked)[: -(-limit // chunk)]
        try:
            hit = self.agent.run(lambda client: client.lookup(keys)) if keys else None
        except KVStoreError:
            return 0, False  # no agent (warned once): computed normally
        stored = hit.chunks if hit else 0
        tracked.stored_chunks = max(tracked.stored_chunks, stored)
        matched = min(stored * chunk, limit)
        if matched <= num_computed_tokens:
            return 0, False
        # Chunks on disk (or on another node) must come up first: load them asynchronously.
        must_fetch = any(t not in ("cpu", "gpu") for t in hit.tiers[num_computed_tokens // chunk:])
        tracked.load = (num_computed_tokens, matched, must_fetch)
        return matched - num_computed_tokens, must_fetch

    def after_alloc(self, request: "Request", block_ids: list[int], num_external_tokens: int) -> None:
        tracked = self.requests.setdefault(request.request_id, _Tracked(request))
        tracked.block_ids = list(block_ids)
        if num_external_tokens == 0:
            tracked.load = None
        elif tracked.load is not None:
            start, _, is_async = tracked.load
            tracked.load = (start, start + num_external_tokens, is_async)

    def build_meta(self, out: "SchedulerOutput") -> KVStoreConnectorMetadata:
        meta = KVStoreConnectorMetadata()
        chunk = self.settings.namespace.chunk_tokens
        for req_id, tracked in self.requests.items():
            if tracked.load is None or not tracked.block_ids:
                continue
            start, end, is_async = tracked.load
            tracked.load = None
            first, last = start // chunk, -(-end // chunk)
            keys = self.keys(tracked)[first:last]
            meta.loads.append(LoadSpec(req_id, keys, first, start, end, list(tracked.block_ids), is_async))
        if not self.settings.save:
            return meta
        computed_after: dict[str, int] = {}
        for new in out.scheduled_new_reqs:
            tracked = self.requests.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = list(new.block_ids[0])
                computed_after[new.req_id] = new.num_computed_tokens + out.num_scheduled_tokens[new.req_id]
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self.requests.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                if req_id in cached.resumed_req_ids:
                    tracked.block_ids = list(new_blocks[0])
                else:
                    tracked.block_ids.extend(new_blocks[0])
            computed_after[req_id] = cached.num_computed_tokens[i] + out.num_scheduled_tokens[req_id]
        for req_id, computed in computed_after.items():
            tracked = self.requests[req_id]
            full = min(computed // chunk, len(tracked.block_ids) * self.settings.block_size // chunk)
            if full <= tracked.stored_chunks:
                continue
            keys = self.keys(tracked)[tracked.stored_chunks:full]
            if keys:
                meta.saves.append(SaveSpec(req_id, keys, tracked.stored_chunks, list(tracked.block_ids)))
                tracked.stored_chunks += len(keys)
        return meta

    def finished(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
