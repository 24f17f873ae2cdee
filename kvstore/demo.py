"""`kvstore demo` (what `make run` runs): a synthetic multi-round chat workload through a real agent.

It starts `kvstore serve` as a separate process with an arena smaller than the workload's working set
(so chunks spill to the SSD tier and come back by promotion), then plays users that share a system
prompt and grow their own histories round after round. Each request looks up its prompt, loads the
stored prefix, "computes" the rest (synthetic KV derived from the tokens, so a wrong byte would be
caught) and stores the new chunks. The final table shows the hit rate, bytes per tier and throughput.

Until the vLLM connector lands this stands in for the engine; the store under it is the real one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .client import LocalClient
from .keys import Namespace
from .layout import SMOLLM2_135M
from .stats import human_bytes

SYSTEM_PROMPT_TOKENS = 1024
TURN_TOKENS = 384  # user message + model reply added per round


def synthetic_kv(tokens: np.ndarray, chunk_tokens: int, geometry) -> torch.Tensor:
    """Deterministic KV for full chunks of `tokens` (a stand-in for prefill), one seed per chunk."""
    n = len(tokens) // chunk_tokens
    out = torch.empty((n, *geometry.shape), dtype=geometry.torch_dtype)
    for i in range(n):
        seed = int(tokens[(i + 1) * chunk_tokens - 1]) * 7919 + i
        out[i] = torch.from_numpy(np.random.default_rng(seed).standard_normal(geometry.shape, dtype=np.float32))
    return out


def _start_agent(workdir: Path, arena: str) -> tuple[subprocess.Popen, str]:
    socket_path = str(workdir / "agent.sock")
    config = {"agent": {"socket_path": socket_path}, "cpu": {"arena_bytes": arena},
              "disk": {"path": str(workdir / "disk"), "capacity_bytes": "4GiB"}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    proc = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "serve", "--config", str(workdir / "config.yaml")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(socket_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"agent did not start: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    return proc, socket_path


def run_demo(args) -> int:
    console = Console(stderr=False)
    geometry = SMOLLM2_135M
    chunk_tokens = geometry.tokens
    namespace = Namespace(model="SmolLM2-135M-Instruct (synthetic KV)", kv_dtype=geometry.dtype,
                          chunk_tokens=chunk_tokens)
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-demo-"))
    rng = np.random.default_rng(1)
    system = rng.integers(0, 49152, SYSTEM_PROMPT_TOKENS)
    histories = [system.copy() for _ in range(args.users)]
    proc, socket_path = _start_agent(workdir, args.arena)
    totals = {"prompt_tokens": 0, "hit_tokens": 0, "loaded_bytes": 0, "stored_bytes": 0,
              "load_s": 0.0, "store_s": 0.0, "hits_by_tier": {}}
    try:
        console.print(f"[bold]kvstore demo[/]: {args.users} users x {args.rounds} rounds, shared "
                      f"{SYSTEM_PROMPT_TOKENS}-token system prompt, {TURN_TOKENS} tokens per turn, "
                      f"chunks of {chunk_tokens} tokens ({human_bytes(geometry.nbytes)} each, SmolLM2-135M "
                      f"geometry), arena {args.arena} + SSD tier in {workdir}")
        with LocalClient(namespace, geometry, socket_path=socket_path) as client, Progress(
                TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("requests", total=args.users * args.rounds)
            for round_no in range(args.rounds):
                for user in range(args.users):
                    turn = rng.integers(0, 49152, TURN_TOKENS)
                    prompt = np.concatenate([histories[user], turn])
                    _serve_request(client, prompt, chunk_tokens, geometry, totals)
                    reply = rng.integers(0, 49152, TURN_TOKENS // 2)
                    histories[user] = np.concatenate([prompt, reply])
                    progress.update(task, advance=1, description=f"round {round_no + 1}/{args.rounds}")
            stats = client.stats()
        _print_summary(console, totals, stats)
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def _serve_request(client: LocalClient, prompt: np.ndarray, chunk_tokens: int, geometry, totals: dict) -> None:
    keys = client.keys(prompt)
    hit = client.lookup(keys)
    start = time.perf_counter()
    loaded = client.get(keys[: hit.chunks])
    totals["load_s"] += time.perf_counter() - start
    expected = synthetic_kv(prompt[: loaded.shape[0] * chunk_tokens], chunk_tokens, geometry)
    if not torch.equal(loaded, expected):
        raise AssertionError("kvstore returned KV that differs from what was stored")
    for tier in hit.tiers[: loaded.shape[0]]:
        totals["hits_by_tier"][tier] = totals["hits_by_tier"].get(tier, 0) + 1
    new = synthetic_kv(prompt, chunk_tokens, geometry)[loaded.shape[0]:]
    start = time.perf_counter()
    client.put(keys[loaded.shape[0]:], new)
    totals["store_s"] += time.perf_counter() - start
    totals["prompt_tokens"] += len(keys) * chunk_tokens
    totals["hit_tokens"] += loaded.shape[0] * chunk_tokens
    totals["loaded_bytes"] += loaded.shape[0] * geometry.nbytes
    totals["stored_bytes"] += new.shape[0] * geometry.nbytes


def _print_summary(console: Console, totals: dict, stats: dict) -> None:
    table = Table(title="kvstore demo: results")
    table.add_column("metric")
    table.add_column("value", justify="right")
    hit_rate = totals["hit_tokens"] / max(1, totals["prompt_tokens"])
    table.add_row("prefix hit rate (chunk-aligned prompt tokens)", f"{hit_rate:.1%}")
    for tier, count in sorted(totals["hits_by_tier"].items()):
        table.add_row(f"  chunks hit in {tier}", str(count))
    table.add_row("KV loaded from kvstore", human_bytes(totals["loaded_bytes"]))
    table.add_row("KV stored into kvstore", human_bytes(totals["stored_bytes"]))
    if totals["load_s"]:
        table.add_row("load throughput", f"{totals['loaded_bytes'] / totals['load_s'] / 1e9:.2f} GB/s")
    if totals["store_s"]:
        table.add_row("store throughput", f"{totals['stored_bytes'] / totals['store_s'] / 1e9:.2f} GB/s")
    for name, tier in stats["tiers"].items():
        used = tier.get("stored_bytes", tier.get("bytes_used", 0))
        table.add_row(f"{name} tier holds", f"{tier.get('chunks', 0)} chunks, {human_bytes(used)}")
    counters = stats["counters"]
    table.add_row("promoted from disk", str(counters.get("promoted_chunks", 0)))
    table.add_row("evicted from arena", str(counters.get("cpu_evicted_chunks", 0)))
    console.print(table)
