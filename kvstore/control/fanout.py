"""The nodes a controller speaks for, and running an agent op on all or some of them at once.

In front of a cluster member, every member (through the agent's `on_members`, within what is left of the
call's deadline); else this node alone. Each node's answer is its own wire reply, so one node's failure
is that node's error, not the whole call's.
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any

import grpc

from ..config import KVStoreConfig
from ..errors import ERRORS_BY_CODE, AgentUnavailable, KVStoreError, NotFound
from ..wire.framing import PROTOCOL_VERSION, error_reply
from ..wire.messages import Hello, HelloReply, OnMembers, Reply, Request
from .pool import AgentPool

_DEADLINE_MARGIN_S = 0.1  # the agent stops waiting (disk writes, other members) this long before the call's deadline


class Nodes:
    """What the controller's calls reach: its agent, and through it the cluster's members."""

    def __init__(self, cfg: KVStoreConfig, pool: AgentPool):
        self.cfg = cfg
        self.pool = pool
        self.host = socket.gethostname()  # this node's name off a cluster

    def timeout(self, context: grpc.ServicerContext | None) -> float:
        """The deadline of a call into the agent: control.call_timeout_s, or less if the RPC has less left."""
        left = context.time_remaining() if context is not None else None
        return self.cfg.control.call_timeout_s if left is None else min(self.cfg.control.call_timeout_s, left)

    def margin(self, context) -> float:
        """What the agent may spend waiting on others (disk writes, members) within the call's deadline."""
        return max(0.0, self.timeout(context) - _DEADLINE_MARGIN_S)

    def request(self, message: Request, reply: type[Reply] | None, context) -> Any:
        """One request to this controller's own agent."""
        return self.pool.request(message, reply, self.timeout(context))

    def is_cluster(self, context) -> bool:
        return self.pool.is_cluster(self.timeout(context))

    def own_node(self, context) -> str:
        """The node of the agent this controller fronts: its Ray node id in a cluster, else the host name."""
        return self.pool.node(self.timeout(context)) or self.host

    def names(self, context) -> list[str]:
        """The nodes this controller speaks for, sorted: every cluster member (as the agent knows them
        now), or this node."""
        if not self.is_cluster(context):
            return [self.host]
        return self.request(Hello(PROTOCOL_VERSION), HelloReply, context).members

    def run(self, op: str, context, args: dict | None = None, calls: dict[str, dict] | None = None
            ) -> dict[str, list]:
        """Run agent op `op` at once on the nodes: with `calls` (node -> args) on those nodes, else with
        `args` on every node. Node -> wire reply (["ok", result] or ["err", code, message]); a node that
        is not a member: not_found."""
        timeout = self.timeout(context)
        if self.pool.is_cluster(timeout):
            request = OnMembers(op, args=(args or {}) if calls is None else None, calls=calls,
                                timeout=max(0.0, timeout - _DEADLINE_MARGIN_S))
            return self.pool.request(request, None, timeout)
        replies = {}
        for node, node_args in (calls if calls is not None else {self.host: args or {}}).items():
            if node != self.host:
                replies[node] = error_reply(NotFound(f"not this controller's node ({self.host})"))
                continue
            try:
                replies[node] = ["ok", self.pool.call(op, node_args, timeout)]
            except AgentUnavailable:  # our own agent is gone: the call fails, as any call to it does
                raise
            except KVStoreError as exc:  # the node's answer
                replies[node] = error_reply(exc)
        return replies


def answers(replies: dict[str, list], tolerate: tuple[str, ...] = ("not_found",)) -> dict[str, Any]:
    """node -> result of the nodes whose reply is ok. An error whose code is in `tolerate` leaves its node
    out (not_found: the node does not know the namespace, so holds nothing of it). Any other error is
    raised as its own type, naming the node (and how many nodes did answer)."""
    ok: dict[str, Any] = {}
    for node, reply in sorted(replies.items()):
        if reply[0] == "ok":
            ok[node] = reply[1]
        elif reply[1] not in tolerate:
            answered = sum(1 for r in replies.values() if r[0] == "ok")
            done = f" ({answered} of {len(replies)} nodes answered)" if len(replies) > 1 else ""
            raise ERRORS_BY_CODE.get(reply[1], KVStoreError)(f"node {node}: {reply[2]}{done}")
    return ok


def summed(results: dict[str, dict]) -> Counter:
    """Per-node count dicts added up."""
    total: Counter = Counter()
    for counts in results.values():
        total.update({k: v for k, v in counts.items() if isinstance(v, int)})
    return total
