"""Who the cluster's members are: the agents named in the Ray namespace, each pinged with a deadline.

An agent is a member while it answers its ping; a restarted agent (a new incarnation) is a new member.
The ping's reply carries the agent's link address and secret (link.py): Ray is the trusted channel that
says who may connect to whom. Joins and departures are handed to `on_change`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.exceptions import RayError

from ..agent.counters import Counters
from ..config import ClusterConfig
from .link import PeerLink

log = logging.getLogger("kvstore.cluster")

AGENT_PREFIX = "agent-"


def agent_name(node_id: str) -> str:
    return AGENT_PREFIX + node_id


@dataclass
class Peer:
    node: str
    handle: Any  # ray ActorHandle: pings only
    incarnation: str  # random per agent start: a restarted agent is a new member
    rtt_s: float  # smoothed ping round trip: "nearest" among replicas
    link: PeerLink  # what everything else goes over


class Membership:
    """The members other than this node, refreshed every cluster.heartbeat_s. Thread-safe."""

    def __init__(self, cfg: ClusterConfig, node: str, counters: Counters,
                 on_change: Callable[[list[str], list[str]], None]):
        self.cfg = cfg
        self.node = node
        self.counters = counters
        self.on_change = on_change  # (joined, departed), after the member list changed
        self._peers: dict[str, Peer] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvstore-membership", daemon=True)

    def start(self) -> None:
        try:  # know the members before the first publication, so it goes to the right owners
            self.refresh()
        except Exception:
            log.exception("first membership refresh failed; the loop retries")
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._lock:
            peers, self._peers = self._peers, {}
        for peer in peers.values():
            peer.link.close()

    def members(self) -> list[str]:
        """Every member's node id, this one's included, sorted (what placement ranks)."""
        with self._lock:
            return sorted([self.node, *self._peers])

    def peer(self, node: str) -> Peer | None:
        with self._lock:
            return self._peers.get(node)

    def peers(self) -> dict[str, Peer]:
        with self._lock:
            return dict(self._peers)

    def _loop(self) -> None:
        while not self._stopping.wait(self.cfg.heartbeat_s):
            try:
                self.refresh()
            except Exception:  # never let the loop die: the next round tries again
                log.exception("membership refresh failed")

    def refresh(self) -> None:
        """Find the agents registered in the namespace, ping them all (with a deadline), and report
        joins and departures."""
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == self.cfg.namespace and a["name"].startswith(AGENT_PREFIX)]
        known = self.peers()
        candidates: dict[str, Any] = {}
        for name in names:
            node = name[len(AGENT_PREFIX):]
            if node == self.node:
                continue
            if node in known:
                candidates[node] = known[node].handle
            else:
                try:
                    candidates[node] = ray.get_actor(name, namespace=self.cfg.namespace)
                except ValueError:  # gone between the listing and now
                    continue
        alive = self._ping(candidates, known)
        departed = [n for n, p in known.items() if n not in alive or alive[n].incarnation != p.incarnation]
        joined = [n for n, p in alive.items() if n not in known or known[n].incarnation != p.incarnation]
        with self._lock:
            self._peers = alive
        for node in departed:
            known[node].link.close()
        if not departed and not joined:
            return
        log.info("agent %s: members now %s (joined %s, departed %s)", self.node[:8],
                 [m[:8] for m in self.members()], [n[:8] for n in joined], [n[:8] for n in departed])
        self.counters.add("peers_departed", len(departed))
        self.on_change(joined, departed)

    def _ping(self, candidates: dict[str, Any], known: dict[str, Peer]) -> dict[str, Peer]:
        """The candidates that answered their ping within cluster.call_timeout_s, as peers."""
        sent = time.perf_counter()
        refs = {node: handle.ping.remote() for node, handle in candidates.items()}
        alive: dict[str, Peer] = {}
        if not refs:
            return alive
        ready = set(ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.cfg.call_timeout_s)[0])
        for node, ref in refs.items():
            if ref not in ready:
                self.counters.add("peer_ping_timeouts")
                continue
            try:
                incarnation, (host, port, secret) = ray.get(ref, timeout=0)
            except (RayError, TimeoutError, TypeError, ValueError):
                continue
            rtt = time.perf_counter() - sent
            old = known.get(node)
            if old is not None and old.incarnation == incarnation:
                alive[node] = Peer(node, candidates[node], incarnation, 0.8 * old.rtt_s + 0.2 * rtt, old.link)
            else:
                alive[node] = Peer(node, candidates[node], incarnation, rtt,
                                   PeerLink(node, host, port, secret, self.cfg.call_timeout_s))
        return alive
