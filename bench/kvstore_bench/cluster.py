"""`kvstore bench cluster`: remote vs local get throughput and cluster-wide lookup latency.

A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a raylet and an object store
per node, all on loopback) with a kvstore agent actor on each node; disk tiers off, replication 1, so
the figures are about memory and the network path. The client is this process (not an agent): it
talks to agents over their Unix sockets like an engine would.

- local_get_gbps: a client on node A gets chunks stored on A (one copy out of A's arena).
- remote_get_gbps: a client on node B gets the same chunks (same sizes, same run), which B's agent
  first pulls from A (export -> Ray object transfer -> checksum -> B's arena), then the copy out.
  Before each trial B's copies are evicted, so every trial really pulls.
- lookup_p50_us / lookup_p99_us: `cluster_lookup` of a 128-chunk prefix stored on A, from a client on
  the last node: one round trip to its agent, which asks every directory owner in parallel.
Each figure: median over trials; payload bytes / wall time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

from . import log, percentiles_us, timed_calls

PREFIX_CHUNKS = 128
LOOKUP_SAMPLES = 1000
NODE_NAMES = "abcdefgh"


def run(args: argparse.Namespace) -> dict:
    if not 2 <= args.nodes <= len(NODE_NAMES):
        raise ValueError(f"--nodes must be in [2, {len(NODE_NAMES)}]")
    from kvstore.cluster import pin_ray_to_loopback, start_agent, stop_agent

    pin_ray_to_loopback()  # before Ray's first import: every Ray process on 127.0.0.1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.cluster_utils import Cluster

    from kvstore.client import LocalClient
    from kvstore.config import load_config
    from kvstore.keys import Namespace
    from kvstore.layout import Geometry

    geometry = Geometry.parse(args.geometry)
    chunk_bytes = geometry.nbytes
    per_get = args.chunks or max(4, min(32, (96 << 20) // chunk_bytes))
    arena = max(256 << 20, 3 * per_get * (chunk_bytes + 4096))
    workdir = tempfile.mkdtemp(prefix="kvstore-bench-cluster-")
    node_args = dict(num_cpus=1, object_store_memory=max(256 << 20, 3 * per_get * chunk_bytes),
                     node_ip_address="127.0.0.1")
    log(f"{args.nodes} Ray nodes, chunks of {chunk_bytes} bytes, {per_get} per get")
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    handles = []
    try:
        nodes = [cluster.head_node] + [cluster.add_node(**node_args) for _ in range(args.nodes - 1)]
        ray.init(address=cluster.address, namespace="kvstore-bench", log_to_driver=False)
        sockets = []
        for name, node in zip(NODE_NAMES, nodes):
            cfg = load_config(env={}, overrides={
                "agent.socket_path": os.path.join(workdir, name, "agent.sock"), "cpu.arena_bytes": arena,
                "disk.enabled": False, "cluster.enabled": True, "cluster.namespace": "kvstore-bench",
                "cluster.pull_timeout_s": 30})
            handle, info = start_agent(cfg, node.node_id)
            handles.append(handle)
            sockets.append(info["socket_path"])
        _wait_members(handles, args.nodes)
        namespace = Namespace(model="bench-cluster", chunk_tokens=geometry.tokens)
        a, b = (LocalClient(namespace, geometry, socket_path=path, timeout=60) for path in sockets[:2])
        keys = a.keys(np.arange(per_get * geometry.tokens))
        chunks = torch.randn((per_get, *geometry.shape)).to(geometry.torch_dtype)
        a.put(keys, chunks)
        if not a.flush(timeout=60):
            raise RuntimeError("the directory did not settle")
        out = torch.empty_like(chunks)
        payload = per_get * chunk_bytes
        local, remote = [], []
        for _ in range(args.trials + 1):  # the first round warms both paths up and is dropped
            b.evict(keys, tiers=("cpu",))
            b.flush(timeout=60)  # B's eviction reaches the directory before the next pull
            start = time.perf_counter()
            result = b.read(keys, out=out)
            remote.append(time.perf_counter() - start)
            got = result.chunks
            if got.shape[0] != per_get or not torch.equal(got, chunks):
                raise RuntimeError(f"remote get returned {got.shape[0]} chunks: {result.misses}")
            start = time.perf_counter()
            a.get(keys, out=out)
            local.append(time.perf_counter() - start)
        local_gbps = payload / statistics.median(local[1:]) / 1e9
        remote_gbps = payload / statistics.median(remote[1:]) / 1e9
        log(f"get: local {local_gbps:.2f} GB/s, remote {remote_gbps:.2f} GB/s")
        p50, p99 = _lookup_latency(namespace, sockets, LocalClient)
        log(f"cluster lookup of {PREFIX_CHUNKS} chunks: p50 {p50:.0f} us, p99 {p99:.0f} us")
        return {
            "nodes": args.nodes,
            "chunk_bytes": chunk_bytes,
            "chunks_per_get": per_get,
            "local_get_gbps": round(local_gbps, 3),
            "remote_get_gbps": round(remote_gbps, 3),
            "remote_to_local": round(remote_gbps / local_gbps, 3),
            "lookup_p50_us": round(p50, 1),
            "lookup_p99_us": round(p99, 1),
            "lookup_prefix_chunks": PREFIX_CHUNKS,
        }
    finally:
        for handle in handles:
            stop_agent(handle)
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_members(handles, count: int, timeout: float = 60.0) -> None:
    import ray

    deadline = time.monotonic() + timeout
    while any(len(info["members"]) != count for info in ray.get([h.info.remote() for h in handles], timeout=30)):
        if time.monotonic() > deadline:
            raise RuntimeError("the agents did not find each other")
        time.sleep(0.2)


def _lookup_latency(namespace, sockets, client_class) -> tuple[float, float]:
    """p50 and p99 (us) of a cluster-wide lookup of a stored 128-chunk prefix, from the last node."""
    from kvstore.layout import Geometry

    tiny = Geometry(layers=1, heads=1, head_dim=8, tokens=namespace.chunk_tokens, planes=1, dtype="float16")
    writer = client_class(namespace.__class__(model="bench-lookup", chunk_tokens=tiny.tokens), tiny,
                          socket_path=sockets[0])
    keys = writer.keys(np.arange(PREFIX_CHUNKS * tiny.tokens) + 7)
    writer.put(keys, torch.zeros((PREFIX_CHUNKS, *tiny.shape), dtype=tiny.torch_dtype))
    writer.flush(timeout=60)
    reader = client_class(writer.namespace, tiny, socket_path=sockets[-1])

    def found_all(result) -> None:
        if result.chunks != PREFIX_CHUNKS:
            raise RuntimeError(f"lookup found {result.chunks} of {PREFIX_CHUNKS} chunks")

    return percentiles_us(timed_calls(lambda _: reader.cluster_lookup(keys), LOOKUP_SAMPLES, check=found_all))
