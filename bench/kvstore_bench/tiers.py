"""`kvstore bench tiers`: CPU arena and SSD tier throughput against memcpy and plain file I/O.

All figures come from one run on the same chunk bytes. This machine's throughput drifts between seconds
(shared hosts), so each figure is the median of several trials, and every store trial is interleaved
with its baseline trial so both see the same conditions:
- memcpy_gbps: numpy copy of the same chunks (the same working set, chunk by chunk) into a second buffer;
- cpu_put_gbps: a client process (this one) streaming chunks into an agent process with put_async:
  copies into slots its earlier commits reserved, and commits whose replies it reads while it copies
  the next put (at most two puts in flight), every reply read before the clock stops;
- cpu_put_sync_gbps: the same with put, which waits for each put's last commit before the next;
- cpu_get_gbps: the chunks copied out of the arena with get, read in place (serial-checked) and
  reported by a one-way touch;
- disk_write_gbps: put + write-behind until flush() returns (the data is fsynced on disk);
- disk_read_gbps: chunks evicted from the arena and dropped from the page cache, then acquired through
  the agent: read from disk into arena slots the client maps, checksum-verified, pinned, readable in
  place (copying them onward is the CPU tier's get, measured above);
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

from kvstore.testing.agents import agent_process

from . import bench_dir, log

GiB = 1 << 30
CPU_TRIALS_PER_TRIAL = 3


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def _memcpy_seconds(data: torch.Tensor, dst: np.ndarray) -> float:
    """Copy every chunk of `data` into `dst` with numpy, chunk by chunk (what a store copy does)."""
    src = data.view(torch.uint8).reshape(data.shape[0], -1).numpy()
    start = time.perf_counter()
    for i in range(src.shape[0]):
        np.copyto(dst[i], src[i])
    return time.perf_counter() - start


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


def _cpu_trials(client: LocalClient, geometry: Geometry, data: torch.Tensor, batch: int, trials: int):
    """Per trial: (memcpy s, put_async stream s, put s, get s) for all of `data`, in requests of `batch`
    chunks. The two kinds of put take turns going first."""
    n = data.shape[0]
    out = torch.empty_like(data)
    scratch = np.empty((n, geometry.nbytes), dtype=np.uint8)
    scratch.fill(0)  # fault its pages in: the store's arena is pre-faulted too
    results = []
    for trial in range(trials):
        streamed, waited = (client.keys(np.arange(n * geometry.tokens) + (2 * trial + side) * n * geometry.tokens)
                            for side in (0, 1))
        memcpy_s = _memcpy_seconds(data, scratch)
        if trial % 2:
            put_s = _timed_put(client, waited, data, batch, stream=False)
            stream_s = _timed_put(client, streamed, data, batch, stream=True)
        else:
            stream_s = _timed_put(client, streamed, data, batch, stream=True)
            put_s = _timed_put(client, waited, data, batch, stream=False)
        out.zero_()
        get_s = _timed_get(client, streamed, data, out, batch)
        client.evict(streamed + waited, tiers=("cpu",))
        results.append((memcpy_s, stream_s, put_s, get_s))
    return results


def _timed_put(client: LocalClient, keys, data: torch.Tensor, batch: int, stream: bool) -> float:
    """Seconds to store every chunk, `batch` per request, until every commit is answered: with
    put_async (`stream`) or with put."""
    start = time.perf_counter()
    if stream:
        handles = [client.put_async(keys[i:i + batch], data[i:i + batch]) for i in range(0, len(keys), batch)]
        results = [handle.result() for handle in handles]
    else:
        results = [client.put(keys[i:i + batch], data[i:i + batch]) for i in range(0, len(keys), batch)]
    seconds = time.perf_counter() - start
    stored = sum(result.stored for result in results)
    if stored != len(keys):
        raise RuntimeError(f"put stored {stored} of {len(keys)} chunks")
    return seconds


def _timed_get(client: LocalClient, keys, data: torch.Tensor, out: torch.Tensor, batch: int) -> float:
    """Seconds to get every chunk into `out`, `batch` per request; then check they equal `data`."""
    start = time.perf_counter()
    for i in range(0, len(keys), batch):
        if client.get(keys[i:i + batch], out=out[i:i + batch]).shape[0] != len(keys[i:i + batch]):
            raise RuntimeError("chunks missing from the store")
    seconds = time.perf_counter() - start
    if not torch.equal(out.view(torch.uint8), data.view(torch.uint8)):
        raise AssertionError("bytes read back differ from bytes written")
    return seconds


def _median(values) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


def _figures(nbytes: int, trials: list[tuple], names: tuple[str, ...], ratios: dict[str, tuple[int, int]]) -> dict:
    """From per-trial seconds (one column per name): `{name}_gbps`, the median seconds' throughput; and
    each ratio (baseline column, store column) as the median of the per-trial ratios."""
    columns = list(zip(*trials))
    figures = {f"{name}_gbps": _gbps(nbytes, _median(column)) for name, column in zip(names, columns)}
    for field, (base, store) in ratios.items():
        figures[field] = round(_median([b / s for b, s in zip(columns[base], columns[store])]), 3)
    return figures


def run(args) -> dict:
    geometry = Geometry.parse(args.geometry)
    chunk_bytes = geometry.nbytes
    trials = max(3, args.trials)
    workdir = bench_dir(args)
    try:
        result: dict = {"geometry": args.geometry, "chunk_bytes": chunk_bytes, "trials": trials,
                        "cpu_trials": CPU_TRIALS_PER_TRIAL * trials}
        namespace = Namespace(model="bench-tiers", chunk_tokens=geometry.tokens, kv_dtype=geometry.dtype)
        slab = max(64 << 20, 1 << (chunk_bytes + 4096).bit_length())
        batch = 8  # chunks per request: a 2k-token prompt at 256 tokens per chunk

        # CPU tier: ~192 MiB per trial (well beyond the CPU caches, like a real prompt's KV).
        n_cpu = args.chunks or max(batch, min(256, (192 << 20) // chunk_bytes))
        data = _chunks(geometry, n_cpu)
        # Big enough that a client's credit (at most 1/16 of the arena) holds a whole batch with room
        # to spare, as with the default arena (25% of memory, up to 8 GiB: 5.9 GB on the CI machine
        # type). In a 602 MB arena every put fell back to reserve + commit: two round trips.
        arena = max(512 << 20, 3 * n_cpu * (chunk_bytes + 8192), 32 * batch * (chunk_bytes + 8192))
        with agent_process({"cpu.arena_bytes": arena, "cpu.slab_bytes": slab, "disk.enabled": False},
                           workdir) as (socket_path, _):
            with LocalClient(namespace, geometry, socket_path=socket_path) as client:
                # A CPU trial takes ~0.15 s, against seconds for a disk one: three times the trials, so
                # the median is steadier against this machine's drift at the same cost.
                cpu_trials = CPU_TRIALS_PER_TRIAL * trials
                log(f"cpu tier: {n_cpu} chunks of {chunk_bytes} bytes, {batch} per request, {cpu_trials} trials")
                _cpu_trials(client, geometry, data, batch, 1)  # warm-up
                cpu = _cpu_trials(client, geometry, data, batch, cpu_trials)
        result.update(_figures(n_cpu * chunk_bytes, cpu, ("memcpy", "cpu_put", "cpu_put_sync", "cpu_get"),
                               {"cpu_put_vs_memcpy": (0, 1), "cpu_put_sync_vs_memcpy": (0, 2),
                                "cpu_get_vs_memcpy": (0, 3)}))
        del data

        # Disk tier: ~256 MiB per trial through write-behind, then cold reads through promotion.
        n_disk = args.chunks or max(batch, min(512, (256 << 20) // chunk_bytes))
        data = _chunks(geometry, n_disk)
        disk_dir = str(Path(workdir) / "disk")
        batch_bytes = 4 << 20
        settings = {"cpu.arena_bytes": max(512 << 20, 2 * n_disk * (chunk_bytes + 8192)), "cpu.slab_bytes": slab,
                    "disk.path": disk_dir, "disk.capacity_bytes": 2 * trials * n_disk * (chunk_bytes + 8192) + GiB,
                    "disk.batch_bytes": batch_bytes, "disk.queue_bytes": max(256 << 20, 2 * slab),
                    "disk.segment_bytes": max(256 << 20, 2 * slab)}
        disk = []
        with agent_process(settings, workdir) as (socket_path, _):
            with LocalClient(namespace, geometry, socket_path=socket_path) as client:
                log(f"disk tier: {n_disk} chunks through write-behind, {trials} trials")
                for trial in range(trials):
                    keys = client.keys(np.arange(n_disk * geometry.tokens) + trial * n_disk * geometry.tokens)
                    raw_path = str(Path(workdir) / "raw.bin")
                    # Which side goes first alternates: the device's throughput drifts within seconds,
                    # and neither side should always meet it as the other left it.
                    if trial % 2:
                        write_s, read_s = _disk_trial(client, keys, data, batch, disk_dir)
                        raw_w, raw_r = _raw_file_io(raw_path, data, batch_bytes)
                    else:
                        raw_w, raw_r = _raw_file_io(raw_path, data, batch_bytes)
                        write_s, read_s = _disk_trial(client, keys, data, batch, disk_dir)
                    disk.append((raw_w, raw_r, write_s, read_s))
        result.update(_figures(n_disk * chunk_bytes, disk,
                               ("disk_raw_write", "disk_raw_read", "disk_write", "disk_read"),
                               {"disk_write_vs_raw": (0, 2), "disk_read_vs_raw": (1, 3)}))
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _disk_trial(client: LocalClient, keys, data: torch.Tensor, batch: int, disk_dir: str) -> tuple[float, float]:
    """Seconds to put `data` and have write-behind fsync it; then seconds to read it back cold."""
    n = data.shape[0]
    start = time.perf_counter()
    for i in range(0, n, batch):
        client.put(keys[i:i + batch], data[i:i + batch])
    if not client.flush(timeout=600):
        raise RuntimeError("write-behind did not finish")
    write_s = time.perf_counter() - start
    client.evict(keys, tiers=("cpu",))
    _drop_page_cache(disk_dir)
    read_s = 0.0
    raw = data.view(torch.uint8).reshape(n, -1)
    for i in range(0, n, batch):
        start = time.perf_counter()
        with client.acquire(keys[i:i + batch]) as views:  # promoted, verified, mapped: readable in place
            read_s += time.perf_counter() - start
            if len(views) != len(keys[i:i + batch]):
                raise RuntimeError("chunks missing on the disk tier")
            for j, (_, payload) in enumerate(views):  # checked outside the timed part
                if not torch.equal(payload, raw[i + j]):
                    raise AssertionError("bytes read back from disk differ from bytes written")
    client.evict(keys, tiers=("cpu",))
    return write_s, read_s


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
