"""`kvstore stats`: what the local agent holds, over its Unix socket."""

from __future__ import annotations

import json

from ..wire.messages import List, Stats
from .common import EXIT_OK, add_config_args, human_bytes, load, table


def add(sub) -> None:
    parser = sub.add_parser("stats", help="show what the local agent holds")
    add_config_args(parser)
    parser.add_argument("--output", choices=["table", "json"], default="table")
    parser.set_defaults(func=run)


def run(args) -> int:
    stats = agent_stats(load(args).socket_path)
    if args.output == "json":
        print(json.dumps(stats, default=str))
    else:
        render_stats(stats)
    return EXIT_OK


def agent_stats(socket_path: str) -> dict:
    """The agent's stats, with its namespaces under `namespaces_detail`."""
    from ..client import AgentConnection  # not at import time: the client's torch costs every command ~1 s

    conn = AgentConnection(socket_path, timeout=5.0)
    try:
        stats = conn.request(Stats())
        stats["namespaces_detail"] = conn.request(List())
        return stats
    finally:
        conn.close()


def render_stats(stats: dict) -> None:
    from rich.console import Console

    console = Console()
    tiers = table("kvstore tiers", ["tier", "chunks", "stored", "used / capacity", "pinned", "evictions"])
    for name, tier in stats["tiers"].items():
        used = tier.get("used_bytes", tier.get("file_bytes", 0))
        tiers.add_row(name, str(tier.get("chunks", 0)), human_bytes(tier.get("stored_bytes", tier.get("bytes_used", 0))),
                      f"{human_bytes(used)} / {human_bytes(tier.get('capacity_bytes', 0))}",
                      human_bytes(tier.get("pinned_bytes", 0)),
                      str(tier.get("evictions", tier.get("evicted_chunks", 0))))
    console.print(tiers)
    counters = table("counters", ["name", "value"])
    for name, value in sorted(stats["counters"].items()):
        counters.add_row(name, str(value))
    console.print(counters)
    console.print(f"namespaces: {stats['namespaces']}  leases: {stats['leases']}  "
                  f"write-behind queue: {human_bytes(stats['writebehind_queue_bytes'])}")
