"""`kvstore config show`: the effective configuration."""

from __future__ import annotations

import json

from ..config import config_to_dict, resolve_auto
from .common import EXIT_OK, add_config_args, load


def add(sub) -> None:
    parser = sub.add_parser("config", help="show the effective configuration")
    parser.add_argument("action", choices=["show"])
    add_config_args(parser)
    parser.add_argument("--resolved", action="store_true", help="replace auto sizes by their values here")
    parser.add_argument("--output", choices=["yaml", "json"], default="yaml")
    parser.set_defaults(func=run)


def run(args) -> int:
    import yaml

    cfg = load(args)
    if args.resolved:
        cfg = resolve_auto(cfg)
    data = config_to_dict(cfg)
    print(json.dumps(data, indent=2) if args.output == "json" else yaml.safe_dump(data, sort_keys=False), end="")
    return EXIT_OK
