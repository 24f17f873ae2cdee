"""`kvstore bench tiers`: CPU arena and SSD tier throughput against memcpy and plain file I/O.

All figures come from one run on the same chunk bytes:
- memcpy_gbps: numpy copy of chunk_bytes between two warm buffers;
- cpu_put_gbps / cpu_get_gbps: a client process (this one) putting / getting chunks through an agent
  process: reserve + copy into the arena + commit, and acquire + copy out + release, round trips included;
- disk_write_gbps: put + write-behind until flush() returns (the data is fsynced on disk);
- disk_read_gbps: chunks evicted from the arena and dropped from the page cache, then read back through
  the agent (promotion from disk into the arena, then copied out);
- disk_raw_*: the same bytes written with the same batch size + fsync, and read back cold, with plain
  file I/O in the same directory.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from kvstore.client import LocalClient
from kvstore.keys import Namespace
from kvstore.layout import Geometry

from . import agent_process, bench_dir, log

GiB = 1 << 30


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def _memcpy_gbps(nbytes: int, repeat: int) -> float:
    src = np.random.randint(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeat):
            np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return _gbps(nbytes * repeat, best)


def _chunks(geometry: Geometry, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn((n, *geometry.shape), generator=gen).to(geometry.torch_dtype)


def _drop_page_cache(directory: str) -> None:
    for path in Path(directory).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _cpu_round(client: LocalClient, geometry: Geometry, data: torch.Tensor, batch: int, rounds: int,
               namespace_seed: int) -> tuple[float, float]:
    """Best-of-`rounds` put and get throughput for `data` in requests of `batch` chunks."""
    n = data.shape[0]
    out = torch.empty_like(data)
    put_best = get_best = float("inf")
    for r in range(rounds):
        tokens = np.arange(n * geometry.tokens) + (namespace_seed + r) * 10_000_000
        keys = client.keys(tokens)
        start = time.perf_counter()
        for i in range(0, n, batch):
            result = client.put(keys[i:i + batch], data[i:i + batch])
            assert result.stored == len(keys[i:i + batch]), result
        put_best = min(put_best, time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(0, n, batch):
            got = client.get(keys[i:i + batch], out=out[i:i + batch])
            assert got.shape[0] == len(keys[i:i + batch])
        get_best = min(get_best, time.perf_counter() - start)
        if r == 0 and not torch.equal(out, data):
            raise AssertionError("bytes read back differ from bytes written")
        client.evict(keys, tiers=("cpu",))
    return put_best, get_best


def run(args) -> dict:
    geometry = Geometry.parse(args.geometry)
    chunk_bytes = geometry.nbytes
    workdir = bench_dir(args)
    try:
        result = {"geometry": args.geometry, "chunk_bytes": chunk_bytes}
        # CPU tier: enough chunks for ~192 MiB per round, in requests of 8 chunks (a 2k-token prompt).
        n_cpu = args.chunks or max(8, min(256, (192 << 20) // chunk_bytes))
        batch = min(8, n_cpu)
        result["memcpy_gbps"] = _memcpy_gbps(chunk_bytes, max(1, (256 << 20) // chunk_bytes))
        data = _chunks(geometry, n_cpu)
        arena = max(512 << 20, 3 * n_cpu * (chunk_bytes + 8192))
        slab = max(64 << 20, 1 << (chunk_bytes + 4096).bit_length())
        namespace = Namespace(model="bench-tiers", chunk_tokens=geometry.tokens, kv_dtype=geometry.dtype)
        with agent_process({"cpu.arena_bytes": arena, "cpu.slab_bytes": slab, "disk.enabled": False},
                           workdir) as (socket_path, _):
            with LocalClient(namespace, geometry, socket_path=socket_path) as client:
                log(f"cpu tier: {n_cpu} chunks of {chunk_bytes} bytes, {batch} per request")
                _cpu_round(client, geometry, data, batch, 1, 1)  # warm-up
                put_s, get_s = _cpu_round(client, geometry, data, batch, 3, 2)
        result["cpu_put_gbps"] = _gbps(n_cpu * chunk_bytes, put_s)
        result["cpu_get_gbps"] = _gbps(n_cpu * chunk_bytes, get_s)

        # Disk tier: ~384 MiB through write-behind, then cold reads through promotion.
        n_disk = args.chunks or max(16, min(512, (384 << 20) // chunk_bytes))
        data = _chunks(geometry, n_disk)
        disk_dir = str(Path(workdir) / "disk")
        batch_bytes = 4 << 20
        settings = {"cpu.arena_bytes": max(512 << 20, 2 * n_disk * (chunk_bytes + 8192)), "cpu.slab_bytes": slab,
                    "disk.path": disk_dir, "disk.capacity_bytes": 4 * n_disk * (chunk_bytes + 8192) + GiB,
                    "disk.batch_bytes": batch_bytes, "disk.queue_bytes": max(256 << 20, 2 * slab),
                    "disk.segment_bytes": max(256 << 20, 2 * slab)}
        with agent_process(settings, workdir) as (socket_path, _):
            with LocalClient(namespace, geometry, socket_path=socket_path) as client:
                keys = client.keys(np.arange(n_disk * geometry.tokens))
                log(f"disk tier: {n_disk} chunks through write-behind")
                start = time.perf_counter()
                for i in range(0, n_disk, batch):
                    client.put(keys[i:i + batch], data[i:i + batch])
                if not client.flush(timeout=600):
                    raise RuntimeError("write-behind did not finish")
                write_s = time.perf_counter() - start
                client.evict(keys, tiers=("cpu",))
                _drop_page_cache(disk_dir)
                out = torch.empty_like(data)
                start = time.perf_counter()
                for i in range(0, n_disk, batch):
                    got = client.get(keys[i:i + batch], out=out[i:i + batch])
                    if got.shape[0] != len(keys[i:i + batch]):
                        raise RuntimeError("chunks missing on the disk tier")
                read_s = time.perf_counter() - start
                if not torch.equal(out, data):
                    raise AssertionError("bytes read back from disk differ from bytes written")
        result["disk_write_gbps"] = _gbps(n_disk * chunk_bytes, write_s)
        result["disk_read_gbps"] = _gbps(n_disk * chunk_bytes, read_s)

        raw_write_s, raw_read_s = _raw_file_io(str(Path(workdir) / "raw.bin"), data, batch_bytes)
        result["disk_raw_write_gbps"] = _gbps(n_disk * chunk_bytes, raw_write_s)
        result["disk_raw_read_gbps"] = _gbps(n_disk * chunk_bytes, raw_read_s)
        result["cpu_put_vs_memcpy"] = round(result["cpu_put_gbps"] / result["memcpy_gbps"], 3)
        result["cpu_get_vs_memcpy"] = round(result["cpu_get_gbps"] / result["memcpy_gbps"], 3)
        result["disk_write_vs_raw"] = round(result["disk_write_gbps"] / result["disk_raw_write_gbps"], 3)
        result["disk_read_vs_raw"] = round(result["disk_read_gbps"] / result["disk_raw_read_gbps"], 3)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _raw_file_io(path: str, data: torch.Tensor, batch_bytes: int) -> tuple[float, float]:
    """Plain sequential write (fsync per batch of >= batch_bytes, as write-behind does) and cold read."""
    chunks = [data[i].view(torch.uint8).reshape(-1).numpy() for i in range(data.shape[0])]
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        pending = 0
        for chunk in chunks:
            os.write(fd, chunk)
            pending += chunk.nbytes
            if pending >= batch_bytes:
                os.fsync(fd)
                pending = 0
        os.fsync(fd)
    finally:
        os.close(fd)
    write_s = time.perf_counter() - start
    _drop_page_cache(str(Path(path).parent))
    buf = np.empty(chunks[0].nbytes, dtype=np.uint8)
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        for _ in chunks:
            os.preadv(fd, [buf], offset)
            offset += buf.nbytes
    finally:
        os.close(fd)
    return write_s, time.perf_counter() - start
