"""Reading and showing the local agent's statistics (`kvstore stats`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .client import AgentConnection


def agent_stats(socket_path: str, version: int) -> dict:
    conn = AgentConnection(socket_path, timeout=5.0)
    try:
        stats = conn.call("stats", {})
        stats["namespaces_detail"] = conn.call("list", {})
        return stats
    finally:
        conn.close()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def render_stats(stats: dict) -> None:
    console = Console()
    table = Table(title="kvstore tiers")
    for column in ("tier", "chunks", "stored", "used / capacity", "pinned", "evictions"):
        table.add_column(column, justify="right" if column != "tier" else "left")
    for name, tier in stats["tiers"].items():
        used = tier.get("used_bytes", tier.get("file_bytes", 0))
        table.add_row(name, str(tier.get("chunks", 0)), human_bytes(tier.get("stored_bytes", tier.get("bytes_used", 0))),
                      f"{human_bytes(used)} / {human_bytes(tier.get('capacity_bytes', 0))}",
                      human_bytes(tier.get("pinned_bytes", 0)),
                      str(tier.get("evictions", tier.get("evicted_chunks", 0))))
    console.print(table)
    counters = Table(title="counters")
    counters.add_column("name")
    counters.add_column("value", justify="right")
    for name, value in sorted(stats["counters"].items()):
        counters.add_row(name, str(value))
    console.print(counters)
    console.print(f"namespaces: {stats['namespaces']}  leases: {stats['leases']}  "
                  f"write-behind queue: {human_bytes(stats['writebehind_queue_bytes'])}")
