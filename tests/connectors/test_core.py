"""The engine-agnostic connector core against a real agent, without an engine: load failures, counts."""

from __future__ import annotations

import pytest
import torch

from kvstore.connectors.core import LoadSpec, PagedTransfer, StoreSettings
from kvstore.transfer import PagedLayout, gather

from ..support.data import SMALL, SMALL_NS, small_chunks, tokens

pytestmark = pytest.mark.integration


def settings(socket_path: str) -> StoreSettings:
    return StoreSettings(namespace=SMALL_NS, geometry=SMALL, block_size=8, socket_path=socket_path, codec="raw",
                         save=True, opaque_pages=False)


def test_a_load_without_an_agent_fails_its_blocks_and_is_counted(tmp_path):
    transfer = PagedTransfer(settings(str(tmp_path / "nobody.sock")))
    spec = LoadSpec("req-1", [b"k" * 16, b"l" * 16], 0, 0, 32, list(range(4)), is_async=False)
    assert transfer._load(spec, transfer.agent) == [0, 1, 2, 3]  # every block: the engine recomputes them
    counts = transfer.take_counts()
    assert counts["agent_unavailable"] >= 1 and counts["load_failed_blocks"] == 4
    assert not any(transfer.take_counts().values())  # counts are per report


def test_a_load_stops_at_the_first_missing_chunk(agent):
    client = agent.client()
    keys = client.keys(tokens(3))
    client.put(keys[:1], small_chunks(1))  # only chunk 0 is stored
    transfer = PagedTransfer(settings(agent.socket_path))
    layers = [torch.zeros(2, 10, SMALL.heads, 8, SMALL.head_dim, dtype=SMALL.torch_dtype)
              for _ in range(SMALL.layers)]  # HND paged caches of 10 blocks of 8 tokens
    transfer.register(layers)
    spec = LoadSpec("req-2", keys, 0, 0, 48, [4, 5, 0, 1, 2, 3], is_async=False)
    assert transfer._load(spec, transfer.agent) == [0, 1, 2, 3]  # chunks 1-2 (blocks 2..5 of the table)
    assert transfer.take_counts() == {"loaded_tokens": 16, "load_failed_blocks": 4, "saved_chunks": 0,
                                      "agent_unavailable": 0}
    layout = PagedLayout.from_tensor(layers[0], block_size=8, num_kv_heads=SMALL.heads, head_size=SMALL.head_dim)
    got = torch.empty((SMALL.layers, 2, 16, SMALL.heads, SMALL.head_dim), dtype=SMALL.torch_dtype)
    gather(layers, layout, layout.rows([4, 5], 0, 16), got)
    assert torch.equal(got, small_chunks(1)[0])  # chunk 0 landed in blocks 4 and 5, byte for byte
    transfer.close()
