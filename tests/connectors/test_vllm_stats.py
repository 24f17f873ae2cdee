"""The vLLM connector's stats, as vLLM's stats logger sums them over workers (the transfers themselves:
test_core.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvstore.connectors.vllm import KVStoreConnectorStats  # noqa: E402

pytestmark = pytest.mark.unit


def test_stats_sum_over_workers():
    a = KVStoreConnectorStats(data={"loaded_tokens": 5, "saved_chunks": 1})
    b = KVStoreConnectorStats(data={"loaded_tokens": 7, "agent_unavailable": 2})
    assert a.aggregate(b).reduce() == {"loaded_tokens": 12, "load_failed_blocks": 0, "saved_chunks": 1,
                                       "agent_unavailable": 2}
    assert KVStoreConnectorStats().is_empty()
