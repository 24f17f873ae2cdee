"""One agent's part in the cluster, inside its actor process: the `Peers` its ops are composed with.

It owns the shard of the cluster directory this node keeps, and composes the rooms that act for it:
membership.py (who is there, over Ray), publisher.py (our holdings to the directory owners),
holders.py (who holds what; the cluster-wide lookup), pulls.py (remote hits into our arena) and
replication.py (extra copies of what clients commit here). Everything between agents goes over the
peer link (link.py), whose server side is the table of link ops here. Thread-safe.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Callable

import ray

from ..agent import NodeStore
from ..agent.counters import Counters
from ..config import ClusterConfig
from ..errors import AgentUnavailable, InvalidArgument, NotFound
from ..vocab import MissReason, Op, split_keys
from ..wire.framing import error_reply
from ..wire.messages import LookupReply
from .context import MemberContext
from .directory import DirectoryShard
from .holders import HolderQueries
from .link import LinkError, LinkServer
from .membership import Membership
from .publisher import Publisher
from .pulls import Puller
from .replication import Replicator

log = logging.getLogger("kvstore.cluster")


class ClusterMember:
    """What one agent does in the cluster. `serve_ops` must be given the agent's op runner before start."""

    def __init__(self, store: NodeStore, cfg: ClusterConfig, node_id: str):
        self.store = store
        self.cfg = cfg
        self.node = node_id
        self.call_timeout_s = cfg.call_timeout_s
        self.incarnation = secrets.token_hex(8)
        self.counters = Counters()
        self.shard = DirectoryShard()
        self.membership = Membership(cfg, node_id, self.counters, self._members_changed)
        ctx = MemberContext(cfg, store, self.membership, self.counters)
        self.publisher = Publisher(ctx, self.shard)
        self.queries = HolderQueries(ctx, self.shard)
        self.puller = Puller(ctx, self.queries)
        self.replicator = Replicator(ctx, self.publisher)
        self._run_op: Callable[[str, dict], list] | None = None
        self._link_secret = secrets.token_hex(16)
        self.link_server: LinkServer | None = None

    def serve_ops(self, run_op: Callable[[str, dict], list]) -> None:
        """How a member op a peer asks for (on_members) is run here: AgentOps.run_op."""
        self._run_op = run_op

    def start(self) -> "ClusterMember":
        handlers = {"holders": self.queries.serve_holders, "apply": self._serve_apply,
                    "export": self.puller.serve_export, "import": self.replicator.serve_import,
                    "run": self._serve_run, "resync": self._serve_resync}
        host = self.cfg.link_host or ray.util.get_node_ip_address()
        self.link_server = LinkServer(self.node, handlers, host, self._link_secret, self.cfg.pull_timeout_s).start()
        self.store.watch_holdings(self.publisher.changed)
        self.store.watch_commits(self.replicator.committed)
        self.membership.start()
        self.publisher.republish()  # what the SSD tier (or anything else) already holds
        for room in (self.publisher, self.replicator):
            room.start()
        return self

    def stop(self) -> None:
        self.store.watch_holdings(None)
        self.store.watch_commits(None)
        for room in (self.publisher, self.replicator, self.membership):
            room.stop()
        if self.link_server is not None:
            self.link_server.stop()

    def ping_reply(self) -> tuple[str, list]:
        """What a ping answers: this agent's incarnation and its link (host, port, secret)."""
        server = self.link_server
        return self.incarnation, [server.host, server.port, self._link_secret]

    def members(self) -> list[str]:
        return self.membership.members()

    def _members_changed(self, joined: list[str], departed: list[str]) -> None:
        """Drop a departed node's directory entries, hand keys to their new owners, and ask joined agents
        to send their holdings (a directory rebuild)."""
        for node in departed:
            self.counters.add("directory_entries_dropped", self.shard.drop_node(node))
        self.shard.keep_owned(self.node, self.members())
        self.publisher.republish()  # our keys' owners may have changed: send them all again
        deadline = time.monotonic() + self.cfg.call_timeout_s
        for node in joined:
            peer = self.membership.peer(node)
            try:
                if peer is not None:
                    peer.link.ask("resync", {}, deadline)
            except LinkError as exc:
                log.warning("agent %s: resync of %s failed: %s", self.node[:8], node[:8], exc)

    # ---- the Peers of AgentOps --------------------------------------------------------------------
    def lookup(self, digest: bytes, blob: bytes) -> LookupReply:
        return self.queries.lookup(digest, blob)

    def local_tiers(self, digest: bytes, blob: bytes):
        return self.queries.local_tiers(digest, blob)

    def pull_missing(self, digest: bytes, blob: bytes, prefix: bool) -> tuple[set[int], dict[int, MissReason]]:
        return self.puller.pull_missing(digest, blob, prefix)

    def prefetch(self, digest: bytes, blob: bytes) -> int:
        return self.puller.prefetch(digest, blob)

    def wait_synced(self, timeout: float) -> bool:
        """Until replication and the directory caught up with what was committed here (or `timeout`)."""
        deadline = time.monotonic() + timeout
        replicated = self.replicator.wait(max(0.0, deadline - time.monotonic()))
        return self.publisher.wait(max(0.0, deadline - time.monotonic())) and replicated

    def on_members(self, op: Op, calls: dict[str, dict], timeout: float) -> dict[str, list]:
        """Run the operator op `op` on several members at once: `calls` maps a node to its args; this node
        runs it itself, each peer over its link, all within `timeout` s. Returns node -> its wire reply:
        ["ok", result], or ["err", code, message] for an error, a peer that failed or answered late
        ("unavailable") or a node that is not a member ("not_found")."""
        deadline = time.monotonic() + max(0.0, timeout)
        asked, out = [], {}
        for node, args in calls.items():
            if node == self.node:
                continue
            peer = self.membership.peer(node)
            if peer is None:
                out[node] = error_reply(NotFound("not a member of this cluster"))
                continue
            try:
                asked.append((node, peer.link, peer.link.send("run", {"op": op.value, "args": args}, deadline)))
            except LinkError as exc:
                out[node] = self._unavailable(exc)
        if self.node in calls:  # ours while the peers work on theirs
            out[self.node] = self._run_op(op.value, calls[self.node])
        for node, link, conn in asked:
            try:
                out[node] = link.reply(conn, deadline)
            except LinkError as exc:
                out[node] = self._unavailable(exc)
        return out

    def _unavailable(self, exc: LinkError) -> list:
        self.counters.add("member_call_failures")
        return error_reply(AgentUnavailable(str(exc) or type(exc).__name__))

    def stats(self) -> dict:
        peers = self.membership.peers()
        return {"node": self.node, "members": self.members(), "directory_keys": len(self.shard),
                "peers_rtt_us": {n: round(p.rtt_s * 1e6) for n, p in peers.items()},
                "counters": self.counters.snapshot()}

    # ---- link ops served here ---------------------------------------------------------------------
    def _serve_apply(self, sock, frames, args: dict) -> dict:
        """`apply` (node, keys, bits): a peer's holdings changes, for the keys this node owns."""
        node, bits = args.get("node"), args.get("bits")
        keys = split_keys(args.get("keys"))
        if not isinstance(node, str) or not isinstance(bits, bytes) or len(bits) != len(keys):
            raise InvalidArgument("apply needs node (str), keys and one tier-bits byte per key")
        self.shard.apply(node, keys, list(bits))
        return {"applied": len(keys)}

    def _serve_run(self, sock, frames, args: dict) -> list:
        """`run` (op, args): an operator op on this member, for another member's on_members."""
        op, op_args = args.get("op"), args.get("args")
        if not isinstance(op, str) or not isinstance(op_args, dict):
            raise InvalidArgument("run needs op (str) and args (map)")
        return self._run_op(op, op_args)

    def _serve_resync(self, sock, frames, args: dict) -> dict:
        """`resync`: a member that just met this one asks for our holdings again."""
        self.publisher.republish()
        return {}
