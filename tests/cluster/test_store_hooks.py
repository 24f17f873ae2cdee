"""The NodeStore hooks the cluster layer builds on (no Ray): holdings changes, commits, snapshots."""

from __future__ import annotations

from kvstore.vocab import TierBits

from ..support.data import small_chunks, tokens
import pytest

pytestmark = pytest.mark.integration

CPU, DISK = TierBits.CPU, TierBits.DISK


def test_holdings_changes_and_commits_are_reported(agent):
    changes: dict[bytes, int] = {}
    commits = []
    agent.store.watch_holdings(lambda keys, bits: changes.update(zip(keys, bits)))
    agent.store.watch_commits(lambda conn, digest, keys: commits.append((conn, digest, list(keys))))
    client = agent.client()
    keys = client.keys(tokens(4))
    client.put(keys, small_chunks(4))
    assert len(commits) == 1 and commits[0][2] == keys and commits[0][0] > 0
    assert commits[0][1] == client.namespace.digest
    client.flush(timeout=30)
    assert [changes[k] for k in keys] == [CPU | DISK] * 4
    client.put(keys, small_chunks(4))  # already stored: no new commit reported
    assert len(commits) == 1
    client.evict(keys[:2], tiers=("cpu",))
    assert [changes[k] for k in keys] == [DISK, DISK, CPU | DISK, CPU | DISK]
    client.evict(keys[:1], tiers=("disk",))
    assert changes[keys[0]] == 0  # gone from this node


def test_holdings_snapshot_includes_what_disk_kept_over_a_restart(start_agent):
    agent = start_agent()
    client = agent.client()
    keys = client.keys(tokens(5))
    client.put(keys, small_chunks(5))
    client.flush(timeout=30)
    client.close()
    agent.stop()
    agent = start_agent()
    held, bits = agent.store.holdings()
    assert sorted(held) == sorted(keys)
    assert bits.tolist() == [DISK] * 5
