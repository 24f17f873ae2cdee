"""The `kvstore` command line: one module per command (serve, stats, config, the gRPC commands, top).

    kvstore serve [--config FILE] [--set key=value ...]   run the node agent (embedded defaults need nothing)
    kvstore serve --cluster [--ray-address ADDR]          run it as a Ray actor: embedded loopback Ray, or join ADDR
    kvstore stats [--output json]                          what the local agent holds (over its Unix socket)
    kvstore status|lookup|ls|evict|clear|watch [...]       the controller, over gRPC (docs/control.md)
    kvstore pin|unpin|move|prefetch [...]                 pin leases and moves between tiers, over gRPC
    kvstore top [--interval S] [--count N]                 live view of nodes, tiers and rates, over gRPC
    kvstore config show [--config FILE] [--set ...]        the effective configuration

Other packages add commands through the entry-point group `kvstore.commands` (each entry: a function
that adds its subcommands to the parser's subparsers); the benchmarks and the demo (`kvstore bench`,
`kvstore demo`, package kvstore_bench) come so, and the library never imports them.

Exit codes: 0 ok, 1 runtime failure (agent or controller unreachable, deadline, not found, ...), 2 bad usage
or configuration (INVALID_ARGUMENT), 3 authentication or permission (UNAUTHENTICATED, PERMISSION_DENIED).
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from ..errors import AgentUnavailable, ConfigError, KVStoreError
from . import control, serve, settings, stats
from .common import EXIT_FAILURE, EXIT_USAGE

PLUGIN_GROUP = "kvstore.commands"
BUILTIN = (serve, stats, control, settings)

log = logging.getLogger("kvstore.cli")


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="Tiered KV-cache store for LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in BUILTIN:
        module.add(sub)
    if plugins:
        for entry in entry_points(group=PLUGIN_GROUP):
            try:
                entry.load()(sub)
            except Exception as exc:  # a broken plugin must not take the built-in commands down
                log.warning("kvstore: commands of %s not loaded: %s", entry.value, exc)
    return parser


def _needs_plugins(argv: list[str]) -> bool:
    """Whether the command asked for is not a built-in one (or help lists every command)."""
    builtin = build_parser(plugins=False)._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first is None or first not in builtin or "-h" in argv[:1] or "--help" in argv[:1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(plugins=_needs_plugins(argv)).parse_args(argv)
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
