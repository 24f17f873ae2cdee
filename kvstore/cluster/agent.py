"""The node agent as a Ray actor: one per Ray node, named `agent-<node id>` in the configured namespace.

It runs a real NodeStore and serves the engine-facing local protocol on its Unix socket and arena exactly
like a standalone agent, its ops composed with its ClusterMember (member.py); Ray never runs in an engine
process. Ray places the actor (node affinity), restarts nothing by itself (max_restarts=0: a dead agent
is a departed member) and carries its pings; everything else between agents goes over the peer link.
Design: docs/cluster.md.
"""

from __future__ import annotations

import logging
import os

import ray

from ..agent import AgentOps, AgentServer, NodeStore
from ..config import KVStoreConfig
from .member import ClusterMember
from .membership import agent_name

__all__ = ["ClusterAgent", "agent_name"]


@ray.remote(num_cpus=0, max_concurrency=32, max_restarts=0)
class ClusterAgent:
    """NodeStore + local socket server + cluster membership."""

    def __init__(self, cfg: KVStoreConfig):
        logging.basicConfig(level=cfg.agent.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.node = ray.get_runtime_context().get_node_id()
        self.store = NodeStore(cfg)
        try:
            self.member = ClusterMember(self.store, cfg.cluster, self.node)
            ops = AgentOps(self.store, peers=self.member)
            self.member.serve_ops(ops.run_op)
            self.server = AgentServer(ops, cfg.socket_path).start()
        except BaseException:
            self.store.close()
            raise
        self.member.start()

    def info(self) -> dict:
        return {"node": self.node, "socket_path": self.server.socket_path, "pid": os.getpid(),
                "incarnation": self.member.incarnation, "members": self.member.members(),
                "arena_path": self.store.cpu.arena_path, "metrics_port": self.server.metrics_port}

    def ping(self) -> tuple[str, list]:
        return self.member.ping_reply()

    def stop(self) -> None:
        """Stop serving and release the arena and files (the actor process may then be killed)."""
        self.member.stop()
        self.server.shutdown()
        self.store.close()
