"""The `kvstore` command line.

    kvstore serve [--config FILE] [--set key=value ...]   run the node agent (embedded defaults need nothing)
    kvstore serve --cluster [--ray-address ADDR]          run it as a Ray actor: embedded loopback Ray, or join ADDR
    kvstore stats [--output json]                          what the local agent holds (over its Unix socket)
    kvstore status|lookup|ls|evict|clear|watch [...]       the controller, over gRPC (docs/control.md)
    kvstore pin|unpin|move|prefetch [...]                 pin leases and moves between tiers, over gRPC
    kvstore top [--interval S] [--count N]                 live view of nodes, tiers and rates, over gRPC
    kvstore config show [--config FILE] [--set ...]        the effective configuration
    kvstore bench tiers|lookup [--json] [...]              benchmarks (docs/benchmarks.md)
    kvstore demo                                           vLLM with and without kvstore, multi-round chat

Exit codes: 0 ok, 1 runtime failure (agent or controller unreachable, deadline, not found, ...), 2 bad usage
or configuration (INVALID_ARGUMENT), 3 authentication or permission (UNAUTHENTICATED, PERMISSION_DENIED).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import config_to_dict, load_config, resolve_auto
from .errors import AgentUnavailable, ConfigError, KVStoreError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_AUTH = 0, 1, 2, 3


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (default: $KVSTORE_CONFIG)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override one option, e.g. --set cpu.arena_bytes=4GiB (repeatable)")


def _load(args) -> "object":
    return load_config(args.config, overrides=args.set)


def cmd_serve(args) -> int:
    from .node import run_agent

    cfg = resolve_auto(_load(args))
    if args.insecure:
        from dataclasses import replace

        cfg = replace(cfg, control=replace(cfg.control, insecure=True))
    logging.basicConfig(level=cfg.agent.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with_control = cfg.control.enabled and not args.no_control
    if with_control:
        from .control.tls import server_credentials

        server_credentials(cfg.control)  # an unreadable TLS file is a ConfigError now, before the agent starts
    controller = []

    def ready(socket_path: str, metrics_port: int, where: str = "") -> None:
        print(f"kvstore agent ready on {socket_path}{where}{_metrics_url(cfg, metrics_port)}",
              file=sys.stderr, flush=True)
        if with_control:  # in a cluster: in front of this node's agent, answering for the whole cluster
            controller.extend(_start_controller(cfg, socket_path))

    try:
        if args.cluster or args.ray_address or cfg.cluster.enabled:
            from .cluster import serve_cluster

            serve_cluster(cfg, args.ray_address, ready=lambda info: ready(
                info["socket_path"], info.get("metrics_port", 0), f" (Ray node {info['node'][:12]})"))
        else:
            run_agent(cfg, ready=lambda server: ready(server.socket_path, server.metrics_port))
    finally:
        for c in controller:
            c.stop()
    return EXIT_OK


def _metrics_url(cfg, port: int) -> str:
    """", metrics on http://host:port/metrics" for the agent's own endpoint, if it runs."""
    return f", metrics on http://{cfg.agent.metrics_address.rpartition(':')[0]}:{port}/metrics" if port else ""


def _start_controller(cfg, socket_path: str) -> list:
    """The gRPC controller beside the agent; a taken port is a warning, not a dead agent."""
    from .control.auth import ensure_default_token
    from .control.server import ControlServer

    c = cfg.control
    if not (c.insecure or c.token or c.tokens_file):
        token, path, created = ensure_default_token()
        if created:
            print(f"kvstore control token (saved in {path}, the CLI reads it from there): {token}",
                  file=sys.stderr, flush=True)
    try:
        server = ControlServer(cfg, socket_path).start()
    except OSError as exc:
        logging.getLogger("kvstore.control").warning("controller not started: %s", exc)
        return []
    metrics = f", metrics on http://{c.metrics_address.rpartition(':')[0]}:{server.metrics_port}/metrics" \
        if c.metrics_address else ""
    print(f"kvstore controller listening on {server.address} ({server.scheme}){metrics}"
          f"{' (insecure: no auth)' if c.insecure else ''}", file=sys.stderr, flush=True)
    return [server]


def cmd_control(args) -> int:
    from .control.cli import run

    return run(args)


def cmd_stats(args) -> int:
    from .protocol import PROTOCOL_VERSION
    from .stats import agent_stats, render_stats

    cfg = _load(args)
    stats = agent_stats(cfg.socket_path, PROTOCOL_VERSION)
    if args.output == "json":
        print(json.dumps(stats, default=str))
    else:
        render_stats(stats)
    return EXIT_OK


def cmd_config(args) -> int:
    import yaml

    cfg = _load(args)
    if args.resolved:
        cfg = resolve_auto(cfg)
    data = config_to_dict(cfg)
    print(json.dumps(data, indent=2) if args.output == "json" else yaml.safe_dump(data, sort_keys=False), end="")
    return EXIT_OK


def cmd_bench(args) -> int:
    from bench import run_benchmark

    result = run_benchmark(args.name, args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="Tiered KV-cache store for LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the node agent in the foreground (SIGINT/SIGTERM stop it)",
                           description="Run the node agent. With no configuration it sizes the shared-memory "
                                       "arena from free memory, keeps an SSD tier under ~/.cache/kvstore and "
                                       "listens on a Unix socket in $XDG_RUNTIME_DIR (or /tmp).")
    _add_config_args(serve)
    serve.add_argument("--cluster", action="store_true",
                       help="run the agent as a Ray actor in a cluster (docs/cluster.md); without "
                            "--ray-address, in an embedded single-node Ray on loopback")
    serve.add_argument("--ray-address", metavar="ADDR", default=None,
                       help="join the Ray cluster at ADDR (implies --cluster; else cluster.ray_address)")
    serve.add_argument("--insecure", action="store_true",
                       help="run the gRPC controller without auth (local play; same as control.insecure=true)")
    serve.add_argument("--no-control", action="store_true",
                       help="do not start the gRPC controller (same as control.enabled=false)")
    serve.set_defaults(func=cmd_serve)

    stats = sub.add_parser("stats", help="show what the local agent holds")
    _add_config_args(stats)
    stats.add_argument("--output", choices=["table", "json"], default="table")
    stats.set_defaults(func=cmd_stats)

    from .control.cli import add_commands

    add_commands(sub, _add_config_args, cmd_control)

    config = sub.add_parser("config", help="show the effective configuration")
    config.add_argument("action", choices=["show"])
    _add_config_args(config)
    config.add_argument("--resolved", action="store_true", help="replace auto sizes by their values here")
    config.add_argument("--output", choices=["yaml", "json"], default="yaml")
    config.set_defaults(func=cmd_config)

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
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="real vLLM with and without kvstore on a multi-round chat (make run)")
    demo.add_argument("--users", type=int, default=4)
    demo.add_argument("--rounds", type=int, default=4)
    demo.add_argument("--chunk-tokens", type=int, default=0,
                      help="kvstore chunk size in tokens (0: the connector's default, docs/vllm.md)")
    demo.add_argument("--vllm-blocks", type=int, default=40,
                      help="vLLM's own KV pool in blocks of 128 tokens (smaller than the working set)")
    demo.add_argument("--arena", default="1GiB", help="the node agent's shared-memory arena")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"kvstore: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AgentUnavailable as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KVStoreError as exc:
        print(f"kvstore: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
