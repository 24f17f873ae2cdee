"""The node agent with its SSD tier: write-behind, promotion, corruption, restart, crash, `kvstore serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstore.client import LocalClient

from .support.agents import agent_settings, clean_env, spawn_agent, stop_agent, write_config

from .support.data import small_chunks, SMALL_NS, tokens

pytestmark = pytest.mark.integration


def test_write_behind_then_promotion_from_disk(agent):
    client = agent.client()
    keys = client.keys(tokens(8))
    data = small_chunks(8)
    client.put(keys, data)
    assert client.flush(timeout=30)
    assert agent.store.stats()["tiers"]["disk"]["chunks"] == 8
    assert client.evict(keys, tiers=("cpu",))["cpu"] == 8
    assert client.lookup(keys).tiers == ("disk",) * 8
    got = client.get(keys)
    assert torch.equal(got, data)
    assert client.lookup(keys).tiers == ("cpu",) * 8  # promoted on the hit
    assert client.stats()["counters"]["promoted_chunks"] == 8


def test_arena_pressure_spills_to_disk_and_nothing_is_lost(start_agent):
    agent = start_agent(**{"cpu.arena_bytes": "2MiB", "cpu.slab_bytes": "1MiB"})  # ~240 small chunks
    client = agent.client()
    keys = client.keys(tokens(600))
    data = small_chunks(600, seed=4)
    for i in range(0, 600, 50):
        client.put(keys[i:i + 50], data[i:i + 50])
        client.flush(timeout=30)  # let write-behind keep up, so eviction finds clean chunks
    stats = client.stats()
    assert stats["counters"]["cpu_evicted_chunks"] > 0
    assert client.lookup(keys).chunks == 600
    for i in range(0, 600, 100):  # reads promote through the small arena, batch by batch
        assert torch.equal(client.get(keys[i:i + 100]), data[i:i + 100])


def test_corrupt_chunk_on_disk_is_a_checksum_miss(agent, tmp_path):
    client = agent.client()
    keys = client.keys(tokens(3))
    client.put(keys, small_chunks(3))
    client.flush(timeout=30)
    client.evict(keys, tiers=("cpu",))
    segment = sorted((tmp_path / "disk").glob("seg-*.kvs"))[-1]
    raw = bytearray(segment.read_bytes())
    position = raw.rfind(keys[1])  # the key sits in chunk 1's header; its payload follows
    assert position > 0
    raw[position + 200] ^= 0xFF
    segment.write_bytes(bytes(raw))
    got = client.get(keys)
    assert got.shape[0] == 1  # chunk 0 fine, chunk 1 corrupt: the prefix stops there
    assert torch.equal(got[0], small_chunks(3)[0])
    counters = client.stats()["counters"]
    assert counters["miss_checksum"] == 1
    assert client.lookup(keys).chunks == 1  # the bad record is forgotten


def test_restart_finds_what_disk_holds(start_agent):
    agent = start_agent()
    client = agent.client()
    keys = client.keys(tokens(5))
    data = small_chunks(5, seed=2)
    client.put(keys, data)
    client.flush(timeout=30)
    client.close()
    agent.stop()
    agent = start_agent()
    client = agent.client()
    assert client.lookup(keys).tiers == ("disk",) * 5
    assert torch.equal(client.get(keys), data)


def test_second_use_admission(start_agent):
    agent = start_agent(**{"disk.admission": "second_use"})
    client = agent.client()
    keys = client.keys(tokens(4))
    client.put(keys, small_chunks(4))
    client.flush(timeout=30)
    assert agent.store.stats()["tiers"]["disk"]["chunks"] == 0  # seen once: not admitted
    client.get(keys[:2])  # second use of chunks 0 and 1
    client.flush(timeout=30)
    assert agent.store.stats()["tiers"]["disk"]["chunks"] == 2


def test_clear_removes_a_namespace_everywhere_and_only_it(agent):
    from kvstore.keys import Namespace

    mine = agent.client()
    other = agent.client(Namespace(model="test-model", chunk_tokens=16, tenant="b"))
    mine.put(mine.keys(tokens(4)), small_chunks(4))
    other.put(other.keys(tokens(4)), small_chunks(4))
    mine.flush(timeout=30)
    removed = mine.clear()
    assert removed["cpu"] == 4 and removed["disk"] == 4
    assert mine.lookup(tokens(4)).chunks == 0
    assert other.lookup(tokens(4)).chunks == 4
    mine.flush(timeout=30)
    assert mine.lookup(tokens(4)).chunks == 0  # nothing resurrected by write-behind


CRASH_WRITER = r"""
import sys, numpy as np, torch
from kvstore.client import LocalClient
from kvstore.keys import Namespace
from kvstore.layout import Geometry
g = Geometry(layers=2, heads=2, head_dim=32, tokens=16)
c = LocalClient(Namespace(model="crash", chunk_tokens=16), g, socket_path=sys.argv[1])
for batch in range(10_000):
    toks = np.arange(16 * 8) + batch * 1000
    keys = c.keys(toks)
    data = torch.stack([torch.full(g.shape, float(batch * 8 + i % 200), dtype=torch.bfloat16) for i in range(8)])
    c.put(keys, data)
    if batch % 3 == 0 and c.flush(timeout=30):
        print(batch, flush=True)  # every batch up to here is on disk
"""


def test_sigkill_during_disk_writes_loses_no_flushed_chunk_and_tears_none(tmp_path):
    settings = agent_settings(tmp_path, **{"disk.batch_bytes": "32KiB", "disk.segment_bytes": "1MiB"})
    config = write_config(tmp_path, settings)
    socket_path = settings["agent.socket_path"]
    agent = spawn_agent(config, socket_path)
    writer = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, socket_path], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=clean_env())
    flushed = -1
    try:
        for line in writer.stdout:
            flushed = int(line)
            if flushed >= 45:  # many segments written; writes are still streaming in
                break
        assert flushed >= 45, writer.stderr.read()
        agent.send_signal(signal.SIGKILL)  # mid-stream: write-behind is busy
        agent.wait(timeout=10)
    finally:
        writer.kill()
        writer.wait()
        if agent.poll() is None:
            agent.kill()
    killed = agent.pid
    os.unlink(socket_path)
    agent = spawn_agent(config, socket_path)
    assert not list(Path("/dev/shm").glob(f"kvstore-*-{killed}-*"))  # the dead agent's shared files are swept
    try:
        from kvstore.keys import Namespace
        from kvstore.layout import Geometry

        g = Geometry(layers=2, heads=2, head_dim=32, tokens=16)
        client = LocalClient(Namespace(model="crash", chunk_tokens=16), g, socket_path=socket_path)
        found_beyond = 0
        for batch in range(flushed + 40):
            keys = client.keys(np.arange(16 * 8) + batch * 1000)
            got = client.get(keys)
            if batch <= flushed:
                assert got.shape[0] == 8, f"batch {batch} was flushed before the kill but is missing"
            else:
                found_beyond += got.shape[0]
            for i in range(got.shape[0]):  # every chunk served is whole: never a torn one
                assert (got[i] == float(batch * 8 + i % 200)).all(), f"torn chunk {batch}/{i}"
        assert client.stats()["counters"].get("miss_checksum", 0) == 0
    finally:
        stop_agent(agent)


def test_kvstore_serve_with_no_config_starts_and_stops_cleanly(tmp_path):
    env = clean_env(HOME=str(tmp_path), XDG_RUNTIME_DIR=str(tmp_path / "run"), XDG_CACHE_HOME=str(tmp_path / "cache"),
                    KVSTORE_CPU__ARENA_BYTES="64MiB")  # keep the test light; everything else is the default
    proc = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    socket_path = tmp_path / "run" / "kvstore" / "agent.sock"
    deadline = time.monotonic() + 60
    while not socket_path.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert socket_path.exists(), proc.stderr.read() if proc.poll() is not None else "no socket"
    stats = subprocess.run([sys.executable, "-m", "kvstore.cli", "stats", "--output", "json"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["tiers"]["cpu"]["capacity_bytes"] == 64 << 20
    assert (tmp_path / "cache" / "kvstore").is_dir()  # default disk tier location
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    err = proc.stderr.read()
    assert str(socket_path) in err  # it says where it listens
    assert not socket_path.exists()
    assert not any(Path("/dev/shm").glob(f"kvstore-arena-{proc.pid}-*"))  # arena unlinked


def test_cli_exit_codes(tmp_path):
    env = clean_env(XDG_RUNTIME_DIR=str(tmp_path / "none"))
    run = lambda *args: subprocess.run([sys.executable, "-m", "kvstore.cli", *args], env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=60)
    no_agent = run("stats")
    assert no_agent.returncode == 1 and "kvstore serve" in no_agent.stderr
    bad = run("serve", "--set", "cpu.arena_bytes=4XB")
    assert bad.returncode == 2 and "cpu.arena_bytes" in bad.stderr
    typo = run("config", "show", "--set", "cpu.arena_byte=1GiB")
    assert typo.returncode == 2 and "did you mean cpu.arena_bytes" in typo.stderr
    assert run("config", "show").returncode == 0
    assert run("bench", "nope").returncode == 2  # argparse usage error


def test_shared_directory_agrees_with_the_agent(agent):
    """Lookups are answered from the shared directory; after every kind of change they must equal
    the agent's own answer over the socket."""
    client = agent.client()
    assert client.conn.directory is not None
    keys = client.keys(tokens(6))

    def agrees() -> tuple:
        local = client.lookup(keys)
        remote = client.conn.call("lookup", {"ns": SMALL_NS.digest, "keys": b"".join(keys)})
        assert (local.chunks, local.tier_codes) == (remote["matched"], remote["tiers"])
        return local.tiers

    assert agrees() == ()
    client.put(keys[:4], small_chunks(4))
    assert agrees() == ("cpu",) * 4
    client.flush(timeout=30)
    client.evict(keys[:2], tiers=("cpu",))
    assert agrees() == ("disk", "disk", "cpu", "cpu")
    client.get(keys[:1])  # promotion
    assert agrees() == ("cpu", "disk", "cpu", "cpu")
    client.evict(keys[1:2], tiers=("disk",))
    assert agrees() == ("cpu",)
    client.clear()
    assert agrees() == ()


def test_a_namespace_beyond_what_the_directory_can_name_is_refused_and_the_rest_keep_working(agent, monkeypatch):
    import kvstore.agent.namespaces
    from kvstore.errors import CapacityExhausted
    from kvstore.layout import Geometry

    monkeypatch.setattr(kvstore.agent.namespaces, "MAX_NAMESPACE_ID", 3)  # the real bound is 2^24 - 1
    geometry = Geometry(layers=1, heads=1, head_dim=8, tokens=16, planes=1, dtype="float16")
    ids = [agent.store.register(bytes([i]) * 16, geometry) for i in range(1, 4)]
    with pytest.raises(CapacityExhausted, match="namespaces"):
        agent.store.register(b"\x09" * 16, geometry)
    assert agent.store.register(b"\x01" * 16, geometry) == ids[0]  # known namespaces still resolve
