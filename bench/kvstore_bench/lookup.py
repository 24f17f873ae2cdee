"""`kvstore bench lookup`: prefix-lookup latency from a client process, at 10^3 and 10^6 indexed chunks.

Each index size has its own agent process (disk tier off), and the sizes are measured in turns.
Chunks are really stored (reserve, write, commit) with a tiny geometry so that a million of them fit
in a small arena; the index does not care how big a chunk is. One lookup = `LocalClient.lookup` of
the 128 keys of a stored prompt: the matched prefix and the tier of each chunk, answered from the
agent's shared directory (mapped by the client, no round trip). `rpc_p50_us_*` measure the same
lookup asked of the agent over its socket. Keys are computed before the timed loop (an engine hashes
while it schedules); `hash_us_128` is that cost.

index_bytes_per_chunk = (growth of the agent's anonymous resident memory, RssAnon, from before the
chunks were inserted to steady state 3 s after the last request, when the agent has returned freed
request garbage to the OS: its private index and per-chunk records, not the arena) + (sizes of the shared
directory and locations files), divided by the number of chunks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from typing import NamedTuple

import numpy as np
import torch

from kvstore.client import LocalClient
from kvstore.keys import Namespace
from kvstore.layout import Geometry
from kvstore.wire.framing import PROTOCOL_VERSION
from kvstore.wire.messages import Hello, HelloReply, Lookup, LookupReply

from kvstore.testing.agents import agent_process

from . import bench_dir, log, percentiles_us, timed_calls

PREFIX_CHUNKS = 128
TINY = Geometry(layers=1, heads=1, head_dim=8, tokens=16, planes=1, dtype="float16")  # 256-byte payload
PUT_BATCH = 4096
SAMPLES = 3000  # lookups per index size (and as many over the socket)
ROUNDS = 300  # turns: each size gets SAMPLES / ROUNDS = 10 lookups per turn


class _SizedAgent(NamedTuple):
    """An agent process holding one index size, and the client that fills and times it."""
    size: int
    prompts: int  # stored prompts of PREFIX_CHUNKS chunks each
    client: LocalClient
    proc: subprocess.Popen
    rss_before: int  # the agent's RssAnon before its chunks were stored


def _rss_anon(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc status")


def _populate(client: LocalClient, first_prompt: int, prompts: int) -> None:
    """Store `prompts` distinct 128-chunk prompts (prompt p = tokens p*2^20 ...)."""
    payload = torch.zeros((PUT_BATCH, *TINY.shape), dtype=TINY.torch_dtype)
    per_batch = PUT_BATCH // PREFIX_CHUNKS
    for p in range(first_prompt, first_prompt + prompts, per_batch):
        count = min(per_batch, first_prompt + prompts - p)
        keys = []
        for q in range(p, p + count):
            keys += client.keys(_prompt_tokens(q))
        result = client.put(keys, payload[: len(keys)])
        if result.stored != len(keys):
            raise RuntimeError(f"populate stored {result.stored} of {len(keys)}: {result}")


def _prompt_tokens(p: int) -> np.ndarray:
    return np.arange(PREFIX_CHUNKS * TINY.tokens, dtype=np.int64) + p * PREFIX_CHUNKS * TINY.tokens


def _lookup_samples(client: LocalClient, prompts: int, rng: np.random.Generator, rpc: bool, n: int):
    """`n` timed lookups of random stored prompts; returns their durations in seconds."""
    picks = rng.integers(0, prompts, size=n)
    key_sets = [client.keys(_prompt_tokens(int(p))) for p in picks]
    ns = client.namespace.digest

    def lookup(keys) -> int:
        if rpc:
            return client.conn.request(Lookup(ns, b"".join(keys)), LookupReply).matched
        return client.lookup(keys).chunks

    def found_all(matched: int) -> None:
        if matched != PREFIX_CHUNKS:
            raise AssertionError(f"lookup found {matched} of {PREFIX_CHUNKS} stored chunks")

    return timed_calls(lambda i: lookup(key_sets[i % len(key_sets)]), n, warmup=2, check=found_all)


def run(args) -> dict:
    """One agent per index size, each filled to its size first; then the sizes are measured in turns
    (ROUNDS rounds of SAMPLES / ROUNDS lookups each), so that a machine that speeds up or slows down
    during the run weighs on every size alike and the ratio compares like with like."""
    sizes = sorted({int(float(s)) for s in args.sizes.split(",")})
    workdir = bench_dir(args)
    namespace = Namespace(model="bench-lookup", chunk_tokens=TINY.tokens, kv_dtype=TINY.dtype)
    result: dict = {"prefix_chunks": PREFIX_CHUNKS}
    rng = np.random.default_rng(0)
    try:
        with contextlib.ExitStack() as stack:
            agents = []
            for size in sizes:
                settings = {"cpu.arena_bytes": max(64 << 20, int(size * 448 * 1.1)), "cpu.slab_bytes": 4 << 20,
                            "disk.enabled": False, "agent.max_batch_chunks": PUT_BATCH}
                agent_dir = os.path.join(workdir, _label(size))
                os.makedirs(agent_dir)
                socket_path, proc = stack.enter_context(agent_process(settings, agent_dir))
                client = stack.enter_context(LocalClient(namespace, TINY, socket_path=socket_path, timeout=120))
                rss_before = _rss_anon(proc.pid)
                prompts = size // PREFIX_CHUNKS
                log(f"indexing {prompts * PREFIX_CHUNKS} chunks")
                _populate(client, 0, prompts)
                if client.conn.directory is None:
                    raise RuntimeError("the client could not map the agent's shared directory")
                agents.append(_SizedAgent(size, prompts, client, proc, rss_before))
            for rpc in (False, True):
                samples: dict[int, list[float]] = {size: [] for size in sizes}
                for _ in range(ROUNDS):
                    for agent in agents:
                        samples[agent.size] += _lookup_samples(agent.client, agent.prompts, rng, rpc,
                                                               SAMPLES // ROUNDS)
                for size in sizes:
                    p50, p99 = percentiles_us(samples[size])
                    prefix = "rpc_" if rpc else ""
                    result[f"{prefix}p50_us_{_label(size)}"] = p50
                    result[f"{prefix}p99_us_{_label(size)}"] = p99
                    if not rpc:
                        log(f"{_label(size)}: p50 {p50:.1f} us, p99 {p99:.1f} us")
            for agent in agents:
                result[f"chunks_indexed_{_label(agent.size)}"] = agent.client.stats()["tiers"]["cpu"]["chunks"]
            largest = agents[-1]  # its memory per chunk
            chunks = result[f"chunks_indexed_{_label(largest.size)}"]
            time.sleep(3.0)  # steady state: the agent trims freed request garbage every few seconds
            hello = largest.client.conn.request(Hello(PROTOCOL_VERSION), HelloReply)  # the current files
            directory_bytes = os.path.getsize(hello.directory_path)
            locations_bytes = os.path.getsize(hello.locations_path)
            private = _rss_anon(largest.proc.pid) - largest.rss_before
            result["index_bytes_per_chunk"] = round((private + directory_bytes + locations_bytes) / chunks, 1)
            result["agent_private_bytes_per_chunk"] = round(private / chunks, 1)
            result["directory_bytes_per_chunk"] = round(directory_bytes / chunks, 1)
            result["locations_bytes_per_chunk"] = round(locations_bytes / chunks, 1)
            start = time.perf_counter()
            for p in range(200):
                largest.client.keys(_prompt_tokens(p))
            result["hash_us_128"] = round((time.perf_counter() - start) / 200 * 1e6, 1)
        top = _label(sizes[-1])
        result["p50_us"] = result[f"p50_us_{top}"]
        result["p99_us"] = result[f"p99_us_{top}"]
        if len(sizes) > 1:
            low = _label(sizes[0])
            result["p50_ratio_largest_vs_smallest"] = round(result[f"p50_us_{top}"] / result[f"p50_us_{low}"], 3)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _label(size: int) -> str:
    if size >= 1_000_000 and size % 1_000_000 == 0:
        return f"{size // 1_000_000}m"
    if size >= 1000 and size % 1000 == 0:
        return f"{size // 1000}k"
    return str(size)
