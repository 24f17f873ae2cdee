"""`kvstore bench tiers` and `kvstore bench control` run end to end at small sizes: a real agent process
(and controller), real files; each prints one JSON object with every documented field. Sizes are too
small for the figures to mean anything: the benchmarks' own checks (bytes read back equal the bytes
written, every prompt chunk found) are what these runs exercise."""

from __future__ import annotations

import json
import subprocess
import sys

from .support.agents import clean_env
import pytest

pytestmark = pytest.mark.e2e

TIERS_FIELDS = {"chunk_bytes", "memcpy_gbps", "cpu_put_gbps", "cpu_put_sync_gbps", "cpu_get_gbps", "disk_write_gbps",
                "disk_read_gbps", "disk_raw_write_gbps", "disk_raw_read_gbps", "cpu_put_vs_memcpy",
                "cpu_put_sync_vs_memcpy", "cpu_get_vs_memcpy", "disk_write_vs_raw", "disk_read_vs_raw"}
CONTROL_FIELDS = {"lookup_p50_us", "lookup_p99_us", "lookup_hashes_p50_us", "agent_rpc_p50_us", "grpc_floor_p50_us"}


def bench(tmp_path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "kvstore.cli", "bench", *args, "--json", "--dir", str(tmp_path)],
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)  # exactly one JSON object on stdout


def test_bench_tiers_prints_every_field_from_one_run(tmp_path):
    result = bench(tmp_path, "tiers", "--geometry", "layers=2,heads=2,head_dim=64,tokens=256,dtype=bf16",
                   "--chunks", "8", "--trials", "3")
    assert result["chunk_bytes"] == 2 * 2 * 2 * 64 * 256 * 2  # layers x K,V x heads x head_dim x tokens x bf16
    assert TIERS_FIELDS <= set(result)
    assert all(result[field] > 0 for field in TIERS_FIELDS)


def test_bench_control_prints_lookup_latency_and_its_baselines(tmp_path):
    result = bench(tmp_path, "control", "--requests", "50")
    assert result["prefix_chunks"] == 128 and result["requests"] == 50
    assert CONTROL_FIELDS <= set(result)
    assert all(result[field] > 0 for field in CONTROL_FIELDS)
    assert result["meets_target"] == (result["lookup_p50_us"] <= result["target_lookup_p50_us"])
