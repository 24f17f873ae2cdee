"""`kvstore serve`: the node agent in the foreground, and the gRPC controller beside it."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

from ..config import resolve_auto
from .common import EXIT_OK, add_config_args, load


def add(sub) -> None:
    parser = sub.add_parser("serve", help="run the node agent in the foreground (SIGINT/SIGTERM stop it)",
                            description="Run the node agent. With no configuration it sizes the shared-memory "
                                        "arena from free memory, keeps an SSD tier under ~/.cache/kvstore and "
                                        "listens on a Unix socket in $XDG_RUNTIME_DIR (or /tmp).")
    add_config_args(parser)
    parser.add_argument("--cluster", action="store_true",
                        help="run the agent as a Ray actor in a cluster (docs/cluster.md); without "
                             "--ray-address, in an embedded single-node Ray on loopback")
    parser.add_argument("--ray-address", metavar="ADDR", default=None,
                        help="join the Ray cluster at ADDR (implies --cluster; else cluster.ray_address)")
    parser.add_argument("--insecure", action="store_true",
                        help="run the gRPC controller without auth (local play; same as control.insecure=true)")
    parser.add_argument("--no-control", action="store_true",
                        help="do not start the gRPC controller (same as control.enabled=false)")
    parser.set_defaults(func=run)


def run(args) -> int:
    cfg = resolve_auto(load(args))
    if args.insecure:
        cfg = replace(cfg, control=replace(cfg.control, insecure=True))
    logging.basicConfig(level=cfg.agent.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with_control = cfg.control.enabled and not args.no_control
    if with_control:
        from ..control.tls import server_credentials

        server_credentials(cfg.control)  # an unreadable TLS file is a ConfigError now, before the agent starts
    controller = []

    def ready(socket_path: str, metrics_port: int, where: str = "") -> None:
        print(f"kvstore agent ready on {socket_path}{where}{_metrics_url(cfg, metrics_port)}",
              file=sys.stderr, flush=True)
        if with_control:  # in a cluster: in front of this node's agent, answering for the whole cluster
            controller.extend(_start_controller(cfg, socket_path))

    try:
        if args.cluster or args.ray_address or cfg.cluster.enabled:
            from ..cluster import serve_cluster

            serve_cluster(cfg, args.ray_address, ready=lambda info: ready(
                info["socket_path"], info.get("metrics_port", 0), f" (Ray node {info['node'][:12]})"))
        else:
            from ..agent import run_agent

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
    from ..control.auth import ensure_default_token
    from ..control.server import ControlServer

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
