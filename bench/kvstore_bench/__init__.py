"""kvstore's benchmarks (`kvstore bench NAME`; method: docs/benchmarks.md) and its demo (`kvstore demo`).

A package of its own, beside the library: it adds those commands to the `kvstore` CLI through the
entry-point group `kvstore.commands` (commands.py), and the library never imports it. Each benchmark
starts its own agent in a separate process (as in production: the client is another process), measures
its baseline in the same run, prints logs on stderr and returns one dict of numbers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def timed_calls(fn: Callable[[int], Any], n: int, warmup: int = 50,
                check: Callable[[Any], None] | None = None) -> list[float]:
    """Seconds taken by each of `n` calls fn(i), after min(warmup, n) untimed ones; `check(result)`
    runs on every timed call's result, outside the timed part."""
    for i in range(min(warmup, n)):
        fn(i)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        result = fn(i)
        samples.append(time.perf_counter() - start)
        if check is not None:
            check(result)
    return samples


def percentiles_us(samples_s) -> tuple[float, float]:
    """(p50, p99) in microseconds, rounded to 0.1, of samples in seconds."""
    us = np.asarray(samples_s, dtype=float) * 1e6
    return round(float(np.percentile(us, 50)), 1), round(float(np.percentile(us, 99)), 1)


def bench_dir(args: argparse.Namespace) -> str:
    """A scratch directory on the filesystem the disk tier uses by default (~/.cache)."""
    from kvstore.config import default_cache_dir

    base = args.dir or str(Path(default_cache_dir()).parent)
    Path(base).mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix="kvstore-bench-", dir=base)


def run_benchmark(name: str, args: argparse.Namespace) -> dict:
    if name == "tiers":
        from .tiers import run
    elif name == "lookup":
        from .lookup import run
    elif name == "e2e":
        from .e2e import run
    elif name == "cluster":
        from .cluster import run
    elif name == "control":
        from .control import run
    else:
        raise ValueError(f"unknown benchmark {name}")
    return run(args)
