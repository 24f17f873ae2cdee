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

    def run(self, context, everywhere: Request | None = None, calls: dict[str, Request] | None = None
            ) -> dict[str, list]:
        """Run an agent op at once on the nodes: `calls` (node -> request, one op) on those nodes, else the
        request `everywhere` on every node. Node -> wire reply (["ok", result] or ["err", code, message]);
        a node that is not a member: not_found."""
        if calls is None:
            op, args, per_node = everywhere.OP.value, everywhere.to_wire(), None
        elif not calls:
            return {}
        else:
            op = next(iter(calls.values())).OP.value
            per_node = {node: request.to_wire() for node, request in calls.items()}
        timeout = self.timeout(context)
        if self.pool.is_cluster(timeout):
            request = OnMembers(op, args=args if per_node is None else None, calls=per_node,
                                timeout=max(0.0, timeout - _DEADLINE_MARGIN_S))
            return self.pool.request(request, None, timeout)
        replies = {}
        for node, node_args in (per_node if per_node is not None else {self.host: args}).items():
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


def answers(replies: dict[str, list], reply: type[Reply] | None = None,
            tolerate: tuple[str, ...] = ("not_found",)) -> dict[str, Any]:
    """node -> result (decoded as `reply`, when given) of the nodes whose reply is ok. An error whose code is
    in `tolerate` leaves its node out (not_found: the node does not know the namespace, so holds nothing of
    it). Any other error is raised as its own type, naming the node (and how many nodes did answer)."""
    ok: dict[str, Any] = {}
    for node, result in sorted(replies.items()):
        if result[0] == "ok":
            ok[node] = result[1] if reply is None else reply.decode(result[1])
        elif result[1] not in tolerate:
            answered = sum(1 for r in replies.values() if r[0] == "ok")
            done = f" ({answered} of {len(replies)} nodes answered)" if len(replies) > 1 else ""
            raise ERRORS_BY_CODE.get(result[1], KVStoreError)(f"node {node}: {result[2]}{done}")
    return ok


def summed(results: dict[str, Reply]) -> Counter:
    """Per-node replies of counts added up, field by field."""
    total: Counter = Counter()
    for counts in results.values():
        total.update({k: v for k, v in counts.to_wire().items() if isinstance(v, int)})
    return total
