"""Starting Ray and the node agents: the embedded single-node Ray, joining a cluster, `kvstore serve`.

Ray advertises the machine's external interface unless told otherwise; the embedded Ray is pinned to
loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and node address 127.0.0.1) so nothing listens beyond
this machine. Joining an existing cluster uses whatever addresses that cluster was started with.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable

from ..config import KVStoreConfig
from ..errors import AgentUnavailable

log = logging.getLogger("kvstore.cluster")

LOOPBACK = "127.0.0.1"


def pin_ray_to_loopback() -> None:
    """Keep every Ray process this process starts on 127.0.0.1. Ray reads this variable when it is
    imported, so this must run before the first `import ray` of the process."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def init_ray(cfg: KVStoreConfig, address: str | None = None) -> None:
    """Connect this process to Ray: join `address` (or cluster.ray_address), or start an embedded
    single-node Ray on loopback when neither is set."""
    address = address or cfg.cluster.ray_address
    if not address:
        pin_ray_to_loopback()
    import ray

    if address:
        ray.init(address=address, namespace=cfg.cluster.namespace, log_to_driver=False)
        return
    ray.init(address="local", num_cpus=max(1, min(os.cpu_count() or 1, 4)), include_dashboard=False,
             object_store_memory=cfg.cluster.object_store_bytes, namespace=cfg.cluster.namespace,
             _node_ip_address=LOOPBACK, log_to_driver=False)


def start_agent(cfg: KVStoreConfig, node_id: str | None = None, timeout: float = 120.0) -> tuple[Any, dict]:
    """Start the node agent actor on `node_id` (default: this process's node); wait until it serves.
    Returns (actor handle, agent info)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .agent import ClusterAgent, agent_name

    node_id = node_id or ray.get_runtime_context().get_node_id()
    handle = ClusterAgent.options(name=agent_name(node_id), namespace=cfg.cluster.namespace,
                                  scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(cfg)
    try:
        info = ray.get(handle.info.remote(), timeout=timeout)
    except Exception as exc:
        ray.kill(handle)
        raise AgentUnavailable(f"the agent on node {node_id[:12]} did not start: {exc}") from None
    return handle, info


def stop_agent(handle: Any, timeout: float = 30.0) -> None:
    """Stop an agent cleanly (socket closed, arena unlinked), then end its actor."""
    import ray

    try:
        ray.get(handle.stop.remote(), timeout=timeout)
    except Exception as exc:  # already dead or stuck: the kill below ends it either way
        log.warning("agent did not stop cleanly: %s", exc)
    ray.kill(handle)


def serve_cluster(cfg: KVStoreConfig, address: str | None = None,
                  ready: Callable[[dict], None] | None = None) -> None:
    """`kvstore serve` in cluster mode: connect to Ray, run this node's agent actor until SIGINT or
    SIGTERM, then stop it (and the embedded Ray, if this process started one)."""
    init_ray(cfg, address)  # first: it may have to pin Ray to loopback before Ray is imported
    import ray

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    handle = None
    try:
        handle, info = start_agent(cfg)
        log.info("kvstore cluster agent on node %s listening on %s%s", info["node"][:12], info["socket_path"],
                 f", metrics on port {info['metrics_port']}" if info.get("metrics_port") else "")
        if ready is not None:
            ready(info)
        while not stop.wait(1.0):
            try:  # the actor is the agent: if it died, so did this node's store
                ray.get(handle.ping.remote(), timeout=cfg.cluster.call_timeout_s * 5)
            except Exception as exc:
                raise AgentUnavailable(f"the node agent actor died: {exc}") from None
    finally:
        if handle is not None:
            stop_agent(handle)
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
