"""`kvstore top`: a live view of the nodes and their tiers, with rates, refreshed from the controller."""

from __future__ import annotations

import json
import time

from ..proto import kvstore_pb2 as pb
from .common import EXIT_OK, UsageError, human_bytes, show, table
from ..proto import tiers as pb_tiers

# `top`: the rates shown per node, each the increase per second of an agent counter (docs/local-protocol.md
# `stats`; missed_chunks: every miss_* counter) between two refreshes.
_TOP_RATES = {"lookups_per_s": "lookups", "served_chunks_per_s": "get_hit_chunks",
              "missed_chunks_per_s": "missed_chunks", "stored_chunks_per_s": "chunks_stored",
              "disk_read_bytes_per_s": "promoted_bytes", "disk_write_bytes_per_s": "writebehind_bytes"}


def _increase(new: int, old: int) -> int:
    return new - old if new >= old else new  # smaller than before: the agent restarted


def _share(part: int, other: int) -> float | None:
    return part / (part + other) if part + other else None


def top_view(reply, previous: dict, now: float) -> dict:
    """One refresh of `top` as plain data: what each node holds, and its rates since the last refresh.
    `previous` maps node -> (monotonic time, counters, evictions by tier) and is updated here; the
    first refresh of a node has no rates (null)."""
    nodes = []
    for node in reply.nodes:
        counters = dict(node.counters)
        counters["missed_chunks"] = sum(v for k, v in counters.items() if k.startswith("miss_"))
        evictions = {pb_tiers.label(t.tier): t.evictions for t in node.tiers}
        last = previous.get(node.node)
        previous[node.node] = (now, counters, evictions)
        seconds = now - last[0] if last else 0.0
        up = {name: _increase(value, last[1].get(name, 0)) for name, value in counters.items()} if last else {}
        tiers = []
        for t in node.tiers:
            name = pb_tiers.label(t.tier)
            tiers.append({"tier": name, "chunks": t.chunks, "used_bytes": t.used_bytes,
                          "capacity_bytes": t.capacity_bytes, "pinned_bytes": t.pinned_bytes,
                          "evictions": t.evictions, "evictions_per_s": _increase(t.evictions, last[2].get(name, 0))
                          / seconds if seconds > 0 else None})
        rates = None
        if seconds > 0:
            rates = {shown: up.get(name, 0) / seconds for shown, name in _TOP_RATES.items()}
            rates["lookup_hit_rate"] = _share(up.get("lookup_hit_chunks", 0), up.get("lookup_miss_chunks", 0))
            rates["get_hit_rate"] = _share(up.get("get_hit_chunks", 0), up.get("missed_chunks", 0))
        nodes.append({"node": node.node, "lookup_hit_rate": node.hit_rate, "tiers": tiers,
                      "interval_s": seconds or None, "rates": rates})
    return {"time": time.time(), "nodes": nodes}


def _top_tables(view: dict) -> list:
    def rate(value, unit: str = "/s", scale=lambda v: f"{v:.1f}") -> str:
        return "-" if value is None else f"{scale(value)}{unit}"

    things: list = [time.strftime("kvstore top  %H:%M:%S", time.localtime(view["time"]))]
    for node in view["nodes"]:
        r = node["rates"] or {}
        rows = table(f"node {node['node']}: lookup hit rate {node['lookup_hit_rate']:.1%} overall, "
                       f"{rate(r.get('lookup_hit_rate'), '', '{:.1%}'.format)} now; "
                       f"get hit rate {rate(r.get('get_hit_rate'), '', '{:.1%}'.format)} now",
                       ["tier", "chunks", "used / capacity", "use", "pinned", "evictions/s"])
        for t in node["tiers"]:
            use = t["used_bytes"] / t["capacity_bytes"] if t["capacity_bytes"] else 0.0
            rows.add_row(t["tier"], str(t["chunks"]),
                          f"{human_bytes(t['used_bytes'])} / {human_bytes(t['capacity_bytes'])}", f"{use:.1%}",
                          human_bytes(t["pinned_bytes"]), rate(t["evictions_per_s"]))
        things.append(rows)
        things.append(f"lookups {rate(r.get('lookups_per_s'))}  chunks served {rate(r.get('served_chunks_per_s'))}, "
                      f"missed {rate(r.get('missed_chunks_per_s'))}, stored {rate(r.get('stored_chunks_per_s'))}  "
                      f"disk read {rate(r.get('disk_read_bytes_per_s'), '/s', human_bytes)}, "
                      f"write {rate(r.get('disk_write_bytes_per_s'), '/s', human_bytes)}")
    return things


def cmd_top(client, args) -> int:
    if args.interval <= 0 or args.count < 0:
        raise UsageError("top needs --interval > 0 and --count >= 0")
    from rich.console import Console, Group
    from rich.live import Live

    console = Console()
    live = Live(console=console, auto_refresh=False) if args.output != "json" and console.is_terminal else None
    previous: dict = {}
    shown = 0
    try:
        if live is not None:
            live.start()
        while True:
            view = top_view(client.Stats(pb.StatsRequest()), previous, time.monotonic())
            if args.output == "json":
                print(json.dumps(view), flush=True)
            elif live is not None:
                live.update(Group(*_top_tables(view)), refresh=True)
            else:  # not a terminal: one block per refresh
                show(*_top_tables(view))
            shown += 1
            if args.count and shown >= args.count:
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
    return EXIT_OK


