"""Benchmarks run by `kvstore bench NAME` (method: docs/benchmarks.md).

Each one starts its own agent in a separate process (as in production: the client is another process),
measures its baseline in the same run, prints logs on stderr and returns one dict of numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import yaml


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


@contextlib.contextmanager
def agent_process(settings: dict, workdir: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """A `kvstore serve` subprocess with `settings` (dotted keys); yields (socket path, process)."""
    socket_path = str(Path(workdir) / "agent.sock")
    # No gRPC controller unless a benchmark asks for one: it would bind the default ports.
    config = {"agent": {"socket_path": socket_path}, "control": {"enabled": False}}
    for dotted, value in settings.items():
        section, _, key = dotted.rpartition(".")
        (config.setdefault(section, {}) if section else config)[key] = value
    config_path = Path(workdir) / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    proc = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "serve", "--config", str(config_path)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(socket_path):
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited with {proc.returncode}: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise RuntimeError("agent did not start within 120 s")
            time.sleep(0.05)
        yield socket_path, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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
