"""`kvstore top` as a real subprocess against a real controller and agent (tests/control/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from ..support.agents import clean_env

from ..support.data import small_chunks, tokens

from ..support.control import ADMIN, NS_A
import pytest

pytestmark = pytest.mark.integration


def top(address: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "kvstore.cli", "top", "--address", address, "--token", ADMIN, *args]


def test_top_json_one_object_per_refresh_with_rates_between_them(control):
    client = control.agent.client(NS_A)
    keys = client.keys(tokens(6))
    client.put(keys[:2], small_chunks(2))
    proc = subprocess.Popen(top(control.server.address, "--count", "2", "--interval", "3", "--output", "json"),
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        client.put(keys[2:6], small_chunks(4, seed=1))  # between the two refreshes
        client.get(keys[:6])
        second = json.loads(proc.stdout.readline())
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        proc.kill()
    assert proc.stdout.read() == ""  # --count 2: exactly two refreshes
    (node1,), (node2,) = first["nodes"], second["nodes"]
    assert node1["rates"] is None and node1["interval_s"] is None  # nothing to compare with yet
    cpu1, cpu2 = ({t["tier"]: t for t in n["tiers"]}["cpu"] for n in (node1, node2))
    assert (cpu1["chunks"], cpu2["chunks"]) == (2, 6)
    assert cpu2["used_bytes"] > cpu1["used_bytes"] and cpu2["capacity_bytes"] == 16 << 20
    rates = node2["rates"]
    assert 2.5 < node2["interval_s"] < 10
    assert rates["stored_chunks_per_s"] == 4 / node2["interval_s"]
    assert rates["served_chunks_per_s"] == 6 / node2["interval_s"]
    assert rates["get_hit_rate"] == 1.0 and rates["missed_chunks_per_s"] == 0
    assert cpu2["evictions_per_s"] == 0
    client.close()


def test_top_table_and_bad_arguments(control):
    client = control.agent.client(NS_A)
    client.put(client.keys(tokens(3)), small_chunks(3))
    table = subprocess.run(top(control.server.address, "--count", "2", "--interval", "0.2"), env=clean_env(),
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("kvstore top") == 2 and "cpu" in table.stdout and "evictions/s" in table.stdout
    assert "chunks served 0.0/s" in table.stdout  # the second refresh has rates
    bad = subprocess.run(top(control.server.address, "--interval", "0"), env=clean_env(), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--interval" in bad.stderr
    client.close()
