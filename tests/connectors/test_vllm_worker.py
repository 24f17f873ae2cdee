"""The connector's worker side against a real agent, without an engine: load failures and its stats."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from kvstore.connectors.vllm import ConnectorSettings, KVStoreConnectorStats, LoadSpec, _WorkerSide  # noqa: E402
from kvstore.transfer import PagedLayout  # noqa: E402

from ..conftest import SMALL, SMALL_NS, small_chunks, tokens  # noqa: E402


def settings(socket_path: str) -> ConnectorSettings:
    return ConnectorSettings(namespace=SMALL_NS, geometry=SMALL, block_size=8, socket_path=socket_path,
                             codec="raw", key_source="tokens", save=True, opaque_pages=False)


def test_a_load_without_an_agent_fails_its_blocks_and_is_counted(tmp_path):
    worker = _WorkerSide(settings(str(tmp_path / "nobody.sock")))
    spec = LoadSpec("req-1", [b"k" * 16, b"l" * 16], 0, 0, 32, list(range(4)), is_async=False)
    assert worker._load(spec, worker.agent) == [0, 1, 2, 3]  # every block: vLLM recomputes them
    stats = worker.take_stats()
    assert stats.data["agent_unavailable"] >= 1 and stats.data["load_failed_blocks"] == 4
    assert worker.take_stats() is None  # counts are per report


def test_a_load_stops_at_the_first_missing_chunk(agent):
    client = agent.client()
    keys = client.keys(tokens(3))
    client.put(keys[:1], small_chunks(1))  # only chunk 0 is stored
    worker = _WorkerSide(settings(agent.socket_path))
    worker.layers = [torch.zeros(2, 10, SMALL.heads, 8, SMALL.head_dim, dtype=SMALL.torch_dtype)
                     for _ in range(SMALL.layers)]  # HND paged caches of 10 blocks of 8 tokens
    worker.layout = PagedLayout.from_tensor(worker.layers[0], block_size=8, num_kv_heads=SMALL.heads,
                                            head_size=SMALL.head_dim)
    spec = LoadSpec("req-2", keys, 0, 0, 48, [4, 5, 0, 1, 2, 3], is_async=False)
    assert worker._load(spec, worker.agent) == [0, 1, 2, 3]  # chunks 1-2 (blocks 2..5 of the table)
    assert worker.take_stats().data == {"loaded_tokens": 16, "load_failed_blocks": 4, "saved_chunks": 0,
                                        "agent_unavailable": 0}


def test_stats_sum_over_workers():
    a = KVStoreConnectorStats(data={"loaded_tokens": 5, "saved_chunks": 1})
    b = KVStoreConnectorStats(data={"loaded_tokens": 7, "agent_unavailable": 2})
    assert a.aggregate(b).reduce() == {"loaded_tokens": 12, "load_failed_blocks": 0, "saved_chunks": 1,
                                       "agent_unavailable": 2}
    assert KVStoreConnectorStats().is_empty()
