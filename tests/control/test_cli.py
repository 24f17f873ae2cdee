"""`kvstore serve` with its controller, driven by the `kvstore` CLI over gRPC (real subprocesses)."""

from __future__ import annotations

import json

from ..support.data import small_chunks, tokens

from ..support.control import kvstore, NS_A
import pytest

pytestmark = pytest.mark.integration

def test_cli_status_lookup_ls_watch_clear_and_exit_codes(served):
    from kvstore.client import LocalClient
    from ..support.data import SMALL

    socket_path, address = served
    client = LocalClient(NS_A, SMALL, socket_path=socket_path)
    t = tokens(6)
    keys = client.keys(t)
    client.put(keys[:4], small_chunks(4))
    ids = [str(i) for i in t.tolist()]

    status = kvstore("status", "--address", address)
    assert status.returncode == 0, status.stderr
    assert "cpu" in status.stdout and "test-model" in status.stdout and "serving" in status.stdout

    table = kvstore("lookup", "--address", address, *ids)
    assert table.returncode == 0 and "matched 64 tokens = 4 of 6 chunks" in table.stdout, table.stdout
    reply = json.loads(kvstore("lookup", "--address", address, "--output", "json", "-n", NS_A.digest.hex(),
                               *ids).stdout)
    assert reply["matched_chunks"] == 4 and reply["nodes"][0]["per_tier"] == [{"tier": "TIER_CPU", "chunks": 4}]

    listing = json.loads(kvstore("ls", "--address", address, "--output", "json").stdout)
    assert sorted(c["hash"] for c in listing["chunks"]) == sorted(bytes(k).hex() for k in keys[:4])

    watch = kvstore("watch", "--address", address, "--output", "json", "--since", "1", "--count", "1")
    event = json.loads(watch.stdout.splitlines()[0])
    # seq 1 is the put's commit (one event per commit); what follows is its write-behind to disk
    assert event["namespace"] == NS_A.digest.hex() and event["stored"]["medium"] in ("CPU", "DISK")
    assert set(event["stored"]["block_hashes"]) <= {bytes(k).hex() for k in keys[:4]}
    cleared = kvstore("clear", "--address", address, "-n", NS_A.digest.hex())
    assert cleared.returncode == 0 and "cleared 1 namespace(s): 4 chunks from cpu" in cleared.stdout

    assert kvstore("status", "--address", address, token="wrong").returncode == 3
    bad = kvstore("lookup", "--address", address, "-n", NS_A.digest.hex(), "--hashes", "abcd")
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr
    missing = kvstore("lookup", "--address", address, "-n", "00" * 16, "1", "2")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    client.close()


def test_cli_unreachable_controller_is_exit_1():
    result = kvstore("status", "--address", "127.0.0.1:1", "--timeout", "1")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
