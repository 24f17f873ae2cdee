"""What every `kvstore` command shares: exit codes, the config options, and output helpers."""

from __future__ import annotations

import argparse

from ..config import KVStoreConfig, load_config

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_AUTH = 0, 1, 2, 3


class UsageError(Exception):
    """The command's arguments are wrong (exit code 2)."""


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (default: $KVSTORE_CONFIG)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override one option, e.g. --set cpu.arena_bytes=4GiB (repeatable)")


def load(args) -> KVStoreConfig:
    """The configuration the command's --config and --set name (docs/config.md)."""
    return load_config(args.config, overrides=args.set)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def table(title: str, columns: list[str]):
    """A rich table, the first column left-aligned and the others right-aligned."""
    from rich.table import Table

    result = Table(title=title)
    for i, column in enumerate(columns):
        result.add_column(column, justify="left" if i == 0 else "right")
    return result


def show(*things) -> None:
    """Print rich renderables and lines of text; a line is never wrapped: it may end in a lease or a hash a
    person copies whole."""
    from rich.console import Console

    console = Console()
    for thing in things:
        console.print(thing, soft_wrap=isinstance(thing, str))
