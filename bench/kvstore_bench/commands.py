"""`kvstore bench` and `kvstore demo`: added to the `kvstore` CLI through the entry-point group
`kvstore.commands` (bench/pyproject.toml)."""

from __future__ import annotations

import json

from kvstore.cli.common import EXIT_OK


def add(sub) -> None:
    bench = sub.add_parser("bench", help="run a benchmark (docs/benchmarks.md)")
    bench.add_argument("name", choices=["tiers", "lookup", "e2e", "cluster", "control"])
    bench.add_argument("--json", action="store_true", help="print one JSON object on stdout (logs on stderr)")
    bench.add_argument("--geometry", default="layers=30,heads=3,head_dim=64,tokens=256,dtype=bf16",
                       help="chunk geometry for `tiers` (default: SmolLM2-135M, 256 tokens, bf16)")
    bench.add_argument("--chunks", type=int, default=0, help="chunks per measurement (0: automatic)")
    bench.add_argument("--trials", type=int, default=7, help="`tiers`: trials per figure (median reported)")
    bench.add_argument("--dir", default=None, help="directory for the disk tier (default: under ~/.cache)")
    bench.add_argument("--sizes", default="1000,1000000", help="`lookup`: index sizes to measure")
    bench.add_argument("--nodes", type=int, default=3, help="`cluster`: Ray nodes (one agent each) on this machine")
    bench.add_argument("--workload", default="multi-round", choices=["multi-round", "long-doc", "no-reuse"],
                       help="`e2e`: the request pattern (docs/benchmarks.md)")
    bench.add_argument("--users", type=int, default=4, help="`e2e`: users (multi-round) or documents (long-doc)")
    bench.add_argument("--rounds", type=int, default=4, help="`e2e`: rounds, the first one cold")
    bench.add_argument("--chunk-tokens", type=int, default=0,
                       help="`e2e`: kvstore chunk size in tokens (0: the connector's default, docs/vllm.md)")
    bench.add_argument("--vllm-blocks", type=int, default=40,
                       help="`e2e`: vLLM's own KV pool in blocks of 128 tokens (smaller than the working set)")
    bench.add_argument("--arena", default="1GiB", help="`e2e`: the node agent's shared-memory arena")
    bench.add_argument("--requests", type=int, default=1000, help="`control`: Lookup RPCs timed")
    bench.add_argument("--out-dir", default="bench-results", help="`e2e`: where the CSV and PNG go")
    bench.set_defaults(func=run_bench)

    demo = sub.add_parser("demo", help="real vLLM with and without kvstore on a multi-round chat (make run)")
    demo.add_argument("--users", type=int, default=4)
    demo.add_argument("--rounds", type=int, default=4)
    demo.add_argument("--chunk-tokens", type=int, default=0,
                      help="kvstore chunk size in tokens (0: the connector's default, docs/vllm.md)")
    demo.add_argument("--vllm-blocks", type=int, default=40,
                      help="vLLM's own KV pool in blocks of 128 tokens (smaller than the working set)")
    demo.add_argument("--arena", default="1GiB", help="the node agent's shared-memory arena")
    demo.set_defaults(func=run_demo)


def run_bench(args) -> int:
    from . import run_benchmark

    result = run_benchmark(args.name, args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return EXIT_OK


def run_demo(args) -> int:
    from .demo import run_demo as demo

    return demo(args)
