"""Node agents as Ray actors: the cluster directory, remote pulls, replication and membership.

One `ClusterAgent` actor runs on each Ray node (node affinity), named `agent-<node id>` in the
configured Ray namespace. It owns a real NodeStore and serves the engine-facing local protocol on its
Unix socket and shared-memory arena exactly like a standalone agent (`ClusterServer` only adds the
cluster to a few ops); Ray never runs in an engine process. Between agents everything goes over Ray
actor calls, and every one of them has a deadline: a peer that does not answer in time is a miss
(with a reason and a counter), never a hang. Design: docs/cluster.md.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayError

from ..config import ClusterConfig, KVStoreConfig
from ..errors import AgentUnavailable, InvalidArgument, KVStoreError, NotFound
from ..node import PIN_CONN, TIER_DISK, TIER_NONE, TIER_REMOTE, AgentServer, NodeStore, _arg
from ..protocol import error_reply, pick_keys, split_keys
from .chunks import PULL_CONN, REPLICA_CONN, export_chunks, import_chunks
from .link import LinkError, LinkServer, PeerLink, failure, receive_chunks
from .directory import DirectoryShard, Holders, best_tier
from .placement import owners, replica_targets

log = logging.getLogger("kvstore.cluster")

AGENT_PREFIX = "agent-"
_PUBLISH_LINGER_S = 0.002  # gather holdings changes this long into one batch per owner
# What the control plane may run on every member (on_members): operator ops, never the data path.
MEMBER_OPS = frozenset({"hello", "stats", "list", "chunks", "evict", "clear", "pin", "unpin", "move", "pull",
                        "register"})


def _by_owner(blob: bytes, members: list[str]):
    """(owner node, indexes of its keys) for every directory owner of the 16-byte keys in `blob`."""
    if not blob:
        return
    owner = owners(blob, members)
    for m, node in enumerate(members):
        picked = np.flatnonzero(owner == m)
        if picked.size:
            yield node, picked


def agent_name(node_id: str) -> str:
    return AGENT_PREFIX + node_id


@dataclass
class Peer:
    node: str
    handle: Any  # ray ActorHandle
    incarnation: str  # random per agent start: a restarted agent is a new member
    rtt_s: float  # smoothed ping round trip: "nearest" among replicas
    link: PeerLink | None = None  # direct connections for lookups and pulls (link.py); None: Ray calls


class ClusterNode:
    """What one agent does in the cluster, inside its actor process. Thread-safe."""

    def __init__(self, store: NodeStore, cfg: ClusterConfig, node_id: str):
        self.store = store
        self.cfg = cfg
        self.node = node_id
        self.incarnation = secrets.token_hex(8)
        self.shard = DirectoryShard()
        self.counters: Counter = Counter()
        self._peers: dict[str, Peer] = {}
        self._members_lock = threading.Lock()
        self._pending: dict[bytes, int] = {}  # holdings changes not yet sent to the directory owners
        self._publishing = 0
        self._publish_cv = threading.Condition()
        self._replicate: deque[tuple[bytes, list[bytes]]] = deque()
        self._replicating = 0
        self._replicate_cv = threading.Condition()
        self._pulling: dict[bytes, threading.Event] = {}  # keys some request is pulling right now
        self._pulling_lock = threading.Lock()
        self._stopping = threading.Event()
        self._link_secret = secrets.token_hex(16)
        self.link_server: LinkServer | None = None
        self._threads = [threading.Thread(target=loop, name=f"kvstore-{name}", daemon=True)
                         for name, loop in (("membership", self._membership_loop), ("publisher", self._publish_loop),
                                            ("replicator", self._replicate_loop))]

    def start(self) -> "ClusterNode":
        if self.cfg.peer_link:
            host = self.cfg.link_host or ray.util.get_node_ip_address()
            self.link_server = LinkServer(self, host, self._link_secret, self.cfg.pull_timeout_s).start()
        self.store.on_holdings_change = self._holdings_changed
        self.store.on_commit = self._committed
        try:  # know the members before the first publication, so it goes to the right owners
            self.refresh_membership()
        except Exception:
            log.exception("first membership refresh failed; the loop retries")
        self._queue_holdings()  # what the SSD tier (or anything else) already holds
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.store.on_holdings_change = self.store.on_commit = None
        with self._publish_cv:
            self._publish_cv.notify_all()
        with self._replicate_cv:
            self._replicate_cv.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)
        if self.link_server is not None:
            self.link_server.stop()
        with self._members_lock:
            peers, self._peers = self._peers, {}
        for peer in peers.values():
            if peer.link is not None:
                peer.link.close()

    def ping_reply(self) -> tuple[str, list | None]:
        """What a ping answers: this agent's incarnation and its link (host, port, secret) if any."""
        server = self.link_server
        return self.incarnation, None if server is None else [server.host, server.port, self._link_secret]

    # ---- membership ------------------------------------------------------------------------------
    def members(self) -> list[str]:
        with self._members_lock:
            return sorted([self.node, *self._peers])

    def _peer(self, node: str) -> Peer | None:
        with self._members_lock:
            return self._peers.get(node)

    def _membership_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.refresh_membership()
            except Exception:  # never let the loop die: the next round tries again
                log.exception("membership refresh failed")
            self._stopping.wait(self.cfg.heartbeat_s)

    def refresh_membership(self) -> None:
        """Find the agents registered in the namespace, ping them all (with a deadline), and act on
        joins and departures: drop a departed node's directory entries, hand keys to their new
        owners, and ask joined agents to send their holdings (a directory rebuild)."""
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == self.cfg.namespace and a["name"].startswith(AGENT_PREFIX)]
        with self._members_lock:
            known = dict(self._peers)
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
        sent = time.perf_counter()
        refs = {node: handle.ping.remote() for node, handle in candidates.items()}
        alive: dict[str, Peer] = {}
        if refs:
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.cfg.call_timeout_s)
            ready_set = set(ready)
            for node, ref in refs.items():
                if ref not in ready_set:
                    self.counters["peer_ping_timeouts"] += 1
                    continue
                try:
                    incarnation, link = ray.get(ref, timeout=0)
                except (RayError, TimeoutError):
                    continue
                rtt = time.perf_counter() - sent
                old = known.get(node)
                if old is not None and old.incarnation == incarnation:
                    alive[node] = Peer(node, candidates[node], incarnation, 0.8 * old.rtt_s + 0.2 * rtt, old.link)
                else:
                    alive[node] = Peer(node, candidates[node], incarnation, rtt, self._link_to(node, link))
        departed = [n for n, p in known.items() if n not in alive or alive[n].incarnation != p.incarnation]
        joined = [n for n, p in alive.items() if n not in known or known[n].incarnation != p.incarnation]
        with self._members_lock:
            self._peers = alive
        for node in departed:
            if known[node].link is not None:
                known[node].link.close()
        if not departed and not joined:
            return
        log.info("agent %s: members now %s (joined %s, departed %s)", self.node[:8],
                 [m[:8] for m in self.members()], [n[:8] for n in joined], [n[:8] for n in departed])
        for node in departed:
            self.counters["directory_entries_dropped"] += self.shard.drop_node(node)
            self.counters["peers_departed"] += 1
        self.shard.keep_owned(self.node, self.members())
        self._queue_holdings()  # our keys' owners may have changed: send them all again
        for node in joined:
            alive[node].handle.resync.remote()  # one-way: it re-sends its holdings to their owners

    def _link_to(self, node: str, link: list | None) -> PeerLink | None:
        if link is None or not self.cfg.peer_link:
            return None
        host, port, secret = link
        return PeerLink(node, host, port, secret, self.cfg.call_timeout_s)

    # ---- directory: publishing our holdings ------------------------------------------------------
    def _holdings_changed(self, keys: list[bytes], bits: list[int]) -> None:
        """NodeStore hook (called under the store's lock): queue the change for the publisher."""
        with self._publish_cv:
            self._pending.update(zip(keys, bits))
            self._publish_cv.notify()

    def _queue_holdings(self) -> None:
        keys, bits = self.store.holdings()
        self._holdings_changed(keys, bits.tolist())

    def _publish_loop(self) -> None:
        while not self._stopping.is_set():
            with self._publish_cv:
                while not self._pending and not self._stopping.is_set():
                    self._publish_cv.wait(0.5)
            time.sleep(_PUBLISH_LINGER_S)
            with self._publish_cv:
                batch, self._pending = self._pending, {}
                self._publishing += 1
            try:
                if batch:
                    self._send_updates(list(batch), bytes(batch.values()))
            except Exception:
                log.exception("directory update failed")
            finally:
                with self._publish_cv:
                    self._publishing -= 1
                    self._publish_cv.notify_all()

    def _send_updates(self, keys: list[bytes], bits: bytes) -> None:
        """One batch per directory owner, all in flight at once, with a deadline. An owner that fails
        loses the batch; the directory is rebuilt when membership changes (it is advice, not truth)."""
        blob = b"".join(keys)
        bits_array = np.frombuffer(bits, dtype=np.uint8)
        refs = []
        for node, picked in _by_owner(blob, self.members()):
            node_bits = bits_array[picked]
            if node == self.node:
                self.shard.apply(self.node, [keys[i] for i in picked.tolist()], node_bits.tolist())
                continue
            peer = self._peer(node)
            if peer is not None:
                refs.append(peer.handle.apply_updates.remote(self.node, pick_keys(blob, picked),
                                                             node_bits.tobytes()))
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.call_timeout_s)
            self.counters["directory_updates_lost"] += len(refs) - len(ready)
        self.counters["directory_updates_sent"] += len(keys)

    def wait_published(self, timeout: float) -> bool:
        """Until every holdings change so far has reached its directory owner (or `timeout`)."""
        with self._publish_cv:
            return self._publish_cv.wait_for(lambda: not (self._pending or self._publishing), timeout)

    # ---- directory: lookups ----------------------------------------------------------------------
    def holders(self, keys: list[bytes], deadline: float) -> tuple[list[Holders], int]:
        """Holders of each key other than this node, asked of every owner at once. Returns the holder
        maps and how many keys could not be answered (owner gone or late: no holder known)."""
        blob = b"".join(keys)
        result: list[Holders] = [{} for _ in keys]
        calls = []
        links = []  # (picked, link, connection with the request sent): every owner is asked at once
        unanswered = 0
        for node, picked_array in _by_owner(blob, self.members()):
            picked = picked_array.tolist()
            if node == self.node:
                answers = self.shard.lookup(keys[i] for i in picked)
                for i, holders in zip(picked, answers):
                    result[i] = holders or {}
                continue
            peer = self._peer(node)
            if peer is None:
                calls.append((picked, None))
            elif peer.link is not None:
                try:
                    links.append((picked, peer.link, peer.link.send("holders", {"keys": pick_keys(blob, picked_array)},
                                                                    deadline)))
                except LinkError:
                    unanswered += len(picked)
            else:
                calls.append((picked, peer.handle.lookup_holders.remote(pick_keys(blob, picked_array))))
        for picked, link, conn in links:
            try:
                answers = link.reply(conn, deadline)
            except LinkError:
                unanswered += len(picked)
                continue
            for i, holders in zip(picked, answers):
                result[i] = holders or {}
        refs = [ref for _, ref in calls if ref is not None]
        ready = set()
        if refs:  # one wait for all owners: a single wake-up when the last answer is in
            ready = set(ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))[0])
        for picked, ref in calls:
            try:
                if ref is None or ref not in ready:
                    raise RayError("directory owner left or answered late")
                answers = ray.get(ref, timeout=0)
            except (RayError, TimeoutError):
                unanswered += len(picked)
                continue
            for i, holders in zip(picked, answers):
                result[i] = holders or {}
        if unanswered:
            self.counters["directory_unanswered_keys"] += unanswered
        for holders in result:
            holders.pop(self.node, None)  # our own store is asked directly: it is always current
        return result, unanswered

    def local_tiers(self, digest: bytes, blob: bytes) -> np.ndarray:
        try:
            return np.frombuffer(self.store.contains(digest, blob), dtype=np.uint8)
        except NotFound:
            return np.zeros(len(blob) // 16, dtype=np.uint8)

    def lookup(self, digest: bytes, blob: bytes) -> dict:
        """The longest prefix of `blob`'s keys held anywhere in the cluster, with the tier of each
        chunk as the local protocol reports it (local tier, or remote), and for every node holding a
        prefix: how many chunks from the first and in which tiers."""
        keys = split_keys(blob)
        local = self.local_tiers(digest, blob)
        deadline = time.monotonic() + self.cfg.call_timeout_s
        remote, _ = self.holders(keys, deadline)  # even when all is local: every holder is reported
        held = [bool(t) or bool(h) for t, h in zip(local.tolist(), remote)]
        matched = held.index(False) if False in held else len(keys)
        codes = np.where(local[:matched] > 0, local[:matched], TIER_REMOTE).astype(np.uint8)
        nodes: dict[str, dict] = {}
        local_run = int(np.argmin(local > 0)) if not local.all() else len(keys)
        if local_run:
            nodes[self.node] = {"chunks": local_run, "tiers": local[:local_run].tobytes()}
        for node in {n for h in remote[:1] for n in h}:
            run = []
            for holders in remote:
                bits = holders.get(node, 0)
                if not bits:
                    break
                run.append(best_tier(bits))
            nodes[node] = {"chunks": len(run), "tiers": bytes(run)}
        self.counters["cluster_lookups"] += 1
        return {"matched": matched, "tiers": codes.tobytes(), "nodes": nodes, "self": self.node}

    # ---- remote pulls ----------------------------------------------------------------------------
    def pull_missing(self, digest: bytes, blob: bytes, prefix: bool) -> tuple[set[int], dict[int, str]]:
        """Bring the chunks among `blob`'s keys that this node lacks and peers hold into the local
        arena, batched per holder, within cluster.pull_timeout_s. With `prefix`, only up to the first
        chunk nobody holds. Returns (indexes pulled, {index: reason} for chunks that could not be)."""
        deadline = time.monotonic() + self.cfg.pull_timeout_s
        missing = np.flatnonzero(self.local_tiers(digest, blob) == TIER_NONE).tolist()
        if not missing or not self._peers:
            return set(), {}
        keys = split_keys(blob)
        # Keys another request is pulling already: wait for it instead of pulling twice.
        mine: list[int] = []
        waits: list[threading.Event] = []
        with self._pulling_lock:
            for i in missing:
                event = self._pulling.get(keys[i])
                if event is None:
                    self._pulling[keys[i]] = threading.Event()
                    mine.append(i)
                else:
                    waits.append(event)
        reasons: dict[int, str] = {}
        pulled: set[int] = set()
        try:
            if mine:
                pulled, reasons = self._pull(digest, keys, mine, prefix, deadline)
        finally:
            with self._pulling_lock:
                for i in mine:
                    self._pulling.pop(keys[i]).set()
        for event in waits:
            event.wait(max(0.0, deadline - time.monotonic()))
        return pulled, reasons

    def _pull(self, digest, keys, wanted: list[int], prefix: bool, deadline: float):
        holders, unanswered = self.holders([keys[i] for i in wanted], deadline)
        reasons: dict[int, str] = {}
        plan: dict[int, list[str]] = {}  # index -> holders, best first
        with self._members_lock:
            rtt = {node: peer.rtt_s for node, peer in self._peers.items()}
        for i, candidates in zip(wanted, holders):
            if not candidates:
                reasons[i] = "directory_unavailable" if unanswered else "not_found"
                continue
            plan[i] = sorted(candidates, key=lambda n: (best_tier(candidates[n]) == TIER_DISK,
                                                        rtt.get(n, float("inf"))))
        if prefix and reasons:  # beyond the first chunk nobody holds, a prefix read stops anyway
            first_gap = min(reasons)
            plan = {i: c for i, c in plan.items() if i < first_gap}
        pulled: set[int] = set()
        attempt = 0
        while plan and time.monotonic() < deadline:
            by_holder: dict[str, list[int]] = {}
            for i, candidates in plan.items():
                if attempt < len(candidates):
                    by_holder.setdefault(candidates[attempt], []).append(i)
            if not by_holder:
                break
            calls = []
            for node, indexes in by_holder.items():
                peer = self._peer(node)
                blob = b"".join(keys[i] for i in indexes)
                if peer is not None and peer.link is not None:
                    try:
                        call = (peer.link, peer.link.send("export", {"ns": digest, "keys": blob}, deadline))
                    except LinkError as exc:
                        call = exc
                else:
                    call = None if peer is None else peer.handle.export_chunks.remote(digest, blob)
                calls.append((indexes, call))
            for indexes, call in calls:  # all in flight; collect in order
                if isinstance(call, (tuple, LinkError)):
                    got, failed = self._collect_link(digest, keys, indexes, call, deadline)
                else:
                    got, failed = self._collect(digest, keys, indexes, call, deadline)
                pulled.update(got)
                reasons.update(failed)
                for i in got:
                    plan.pop(i, None)
                    reasons.pop(i, None)
            attempt += 1
        for i in plan:
            reasons.setdefault(i, "remote_timeout")
        self.counters["remote_pulled_chunks"] += len(pulled)
        for reason in reasons.values():
            self.counters[f"miss_{reason}"] += 1
        return pulled, reasons

    def _collect(self, digest, keys, indexes, ref, deadline) -> tuple[list[int], dict[int, str]]:
        """Receive one holder's answer, verify and import it. (indexes pulled, {index: reason})."""
        if ref is None:
            return [], {i: "remote_unavailable" for i in indexes}
        try:
            found, data_ref, description = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            parts = ray.get(data_ref, timeout=max(0.0, deadline - time.monotonic())) if found else []
        except (GetTimeoutError, TimeoutError):
            return [], {i: "remote_timeout" for i in indexes}
        except RayError:
            return [], {i: "remote_unavailable" for i in indexes}
        reasons = {i: "remote_evicted" for i in indexes}  # the directory said so; the holder does not have it
        got_keys = [keys[indexes[n]] for n in found]
        held, failed = import_chunks(self.store, PULL_CONN, digest, got_keys, parts, description)
        self.counters["remote_pulled_bytes"] += sum(int(parts[2 * n].nbytes + parts[2 * n + 1].nbytes) for n in held)
        got = [indexes[found[n]] for n in held]
        for n, reason in failed.items():
            reasons[indexes[found[n]]] = "remote_" + reason if reason == "checksum" else reason
        for i in got:
            reasons.pop(i, None)
        return got, reasons

    def _collect_link(self, digest, keys, indexes, call, deadline) -> tuple[list[int], dict[int, str]]:
        """Receive one holder's chunks over its link, straight into the arena (link.receive_chunks)."""
        if isinstance(call, LinkError):
            return [], {i: call.reason for i in indexes}
        link, conn = call
        try:
            got, failed = receive_chunks(self.store, PULL_CONN, digest, [keys[i] for i in indexes], conn, deadline)
        except Exception as exc:  # the stream is out of step: the connection is not reused
            conn.close()
            error = failure(exc, link.node)
            if not isinstance(exc, (OSError, KVStoreError)):
                log.warning("pull from %s failed: %r", link.node[:8], exc)
            return [], {i: error.reason for i in indexes}
        link.done(conn)
        self.counters["link_pulled_chunks"] += len(got)
        self.counters["remote_pulled_bytes"] += self._arena_bytes([keys[indexes[n]] for n in got])
        return [indexes[n] for n in got], {indexes[n]: reason for n, reason in failed.items()}

    def _arena_bytes(self, keys: list[bytes]) -> int:
        """Bytes (header and payload) of the chunks among `keys` in the arena: one lookup per pull batch."""
        if not keys:
            return 0
        with self.store.lock:
            eids = self.store.cpu.find(keys)
            return int(self.store.cpu.slots(eids[eids >= 0])[1].sum())

    def prefetch(self, digest: bytes, blob: bytes) -> int:
        """Start pulling the chunks among `blob`'s keys missing here, in the background; returns how
        many are missing locally (a later acquire waits for the pulls in progress)."""
        missing = int((self.local_tiers(digest, blob) == TIER_NONE).sum())
        if missing and self._peers:
            threading.Thread(target=self.pull_missing, args=(digest, blob, True), daemon=True,
                             name="kvstore-prefetch").start()
        return missing

    # ---- replication -----------------------------------------------------------------------------
    def _committed(self, conn: int, digest: bytes, keys: list[bytes]) -> None:
        """NodeStore hook: a client commit stored new chunks; queue their extra copies."""
        if conn > 0 and self.cfg.replication > 1:
            with self._replicate_cv:
                self._replicate.append((digest, keys))
                self._replicate_cv.notify()

    def _replicate_loop(self) -> None:
        while not self._stopping.is_set():
            with self._replicate_cv:
                while not self._replicate and not self._stopping.is_set():
                    self._replicate_cv.wait(0.5)
                if self._stopping.is_set():
                    return
                digest, keys = self._replicate.popleft()
                while self._replicate and self._replicate[0][0] == digest:  # one batch per namespace
                    keys = keys + self._replicate.popleft()[1]
                self._replicating += 1
            try:
                self._push_copies(digest, keys)
            except Exception:
                log.exception("replication of %d chunks failed", len(keys))
                self.counters["replication_failed_chunks"] += len(keys)
            finally:
                with self._replicate_cv:
                    self._replicating -= 1
                    self._replicate_cv.notify_all()

    def _push_copies(self, digest: bytes, keys: list[bytes]) -> None:
        """Send each chunk to the r-1 nodes after this one in its rendezvous ranking, one batch per
        target, all in flight at once, with a deadline."""
        targets = replica_targets(b"".join(keys), self.members(), self.node, self.cfg.replication - 1)
        by_target: dict[str, list[bytes]] = {}
        for key, nodes in zip(keys, targets):
            for node in nodes:
                by_target.setdefault(node, []).append(key)
        calls = []
        for node, node_keys in by_target.items():
            peer = self._peer(node)
            if peer is None:
                self.counters["replication_failed_chunks"] += len(node_keys)
                continue
            found, data_ref, description = export_chunks(self.store, digest, node_keys, ray.put)
            if found:
                calls.append((len(found), peer.handle.import_replicas.remote(
                    digest, b"".join(node_keys[i] for i in found), data_ref, description)))
        if calls:
            ready, _ = ray.wait([ref for _, ref in calls], num_returns=len(calls), timeout=self.cfg.pull_timeout_s)
            for count, ref in calls:
                if ref in ready:
                    try:
                        self.counters["replicated_chunks"] += ray.get(ref, timeout=0)
                        continue
                    except (RayError, TimeoutError):
                        pass
                self.counters["replication_failed_chunks"] += count

    def import_replicas(self, digest: bytes, blob: bytes, parts: list, description: dict) -> int:
        held, _ = import_chunks(self.store, REPLICA_CONN, digest, split_keys(blob), parts, description)
        self.wait_published(self.cfg.call_timeout_s)  # the writer's flush then covers our directory entry
        return len(held)

    def wait_replicated(self, timeout: float) -> bool:
        with self._replicate_cv:
            return self._replicate_cv.wait_for(lambda: not (self._replicate or self._replicating), timeout)

    def stats(self) -> dict:
        return {"node": self.node, "members": self.members(), "directory_keys": len(self.shard),
                "peers_rtt_us": {n: round(p.rtt_s * 1e6) for n, p in dict(self._peers).items()},
                "counters": dict(self.counters)}

    def on_members(self, op: str, calls: dict[str, dict], run_here: Callable[[str, dict], list],
                   timeout: float) -> dict[str, list]:
        """Run the local-protocol op `op` on several members at once: `calls` maps a node to its args;
        this node runs it through `run_here`, each peer through its actor's `run_op`, all within
        `timeout` s. Returns node -> its wire reply: ["ok", result], or ["err", code, message] for an
        error, a peer that failed or answered late ("unavailable") or a node that is not a member
        ("not_found")."""
        refs, out = {}, {}
        for node, args in calls.items():
            peer = self._peer(node) if node != self.node else None
            if peer is not None:
                refs[node] = peer.handle.run_op.remote(op, args)
            elif node != self.node:
                out[node] = error_reply(NotFound("not a member of this cluster"))
        if self.node in calls:  # ours while the peers work on theirs
            out[self.node] = run_here(op, calls[self.node])
        ready = set(ray.wait(list(refs.values()), num_returns=len(refs),
                             timeout=max(0.0, timeout))[0] if refs else ())
        for node, ref in refs.items():
            try:
                if ref not in ready:
                    raise TimeoutError(f"no answer within {timeout:.3g} s")
                out[node] = ray.get(ref, timeout=0)
            except (RayError, TimeoutError) as exc:
                self.counters["member_call_failures"] += 1
                out[node] = error_reply(AgentUnavailable(str(exc) or type(exc).__name__))
        return out


class ClusterServer(AgentServer):
    """The local protocol, with the cluster behind `lookup` (arg `cluster`), `acquire` (pulls what
    peers hold first), `flush` (also waits for replication and the directory), `prefetch`, `pull`,
    `on_members` (an operator op on several members at once), and a `cluster` section in its stats."""

    def __init__(self, store: NodeStore, socket_path: str, cluster: ClusterNode):
        super().__init__(store, socket_path)
        self.cluster = cluster
        self._handlers.update({"hello": self._cluster_hello, "lookup": self._cluster_lookup,
                               "acquire": self._cluster_acquire, "flush": self._cluster_flush,
                               "prefetch": self._prefetch, "pull": self._pull,
                               "on_members": self._on_members})

    def _cluster_hello(self, conn: int, args: dict) -> dict:
        return {**self._hello(conn, args), "cluster": True, "node": self.cluster.node,
                "members": self.cluster.members()}

    def _cluster_lookup(self, conn: int, args: dict) -> dict:
        if not _arg(args, "cluster", bool, False):
            return self._lookup(conn, args)
        return self.cluster.lookup(_arg(args, "ns", bytes), self._key_blob(args))

    def _cluster_acquire(self, conn: int, args: dict) -> dict:
        digest, blob = _arg(args, "ns", bytes), self._key_blob(args)
        prefix = bool(_arg(args, "prefix", bool, True))
        self.store._namespace(digest)  # an unregistered namespace is the caller's error, before any pull
        pulled, failed = self.cluster.pull_missing(digest, blob, prefix)
        reply = self.store.acquire(conn, digest, split_keys(blob), prefix)
        reply["remote"] = sorted(i for i in pulled if reply["offsets"][i] >= 0)
        for i, reason in failed.items():  # say why a chunk a peer was meant to hold is a miss
            if reply["reasons"].get(i) == "not_found":
                reply["reasons"][i] = reason
        return reply

    def _cluster_flush(self, conn: int, args: dict) -> dict:
        timeout = float(_arg(args, "timeout", (int, float), 60.0))
        deadline = time.monotonic() + timeout
        result = self.store.flush(timeout)
        replicated = self.cluster.wait_replicated(max(0.0, deadline - time.monotonic()))
        published = self.cluster.wait_published(max(0.0, deadline - time.monotonic()))
        return {**result, "flushed": result["flushed"] and replicated and published}

    def _prefetch(self, conn: int, args: dict) -> dict:
        digest = _arg(args, "ns", bytes)
        self.store._namespace(digest)
        return {"missing": self.cluster.prefetch(digest, self._key_blob(args))}

    def stats(self) -> dict:
        return {**super().stats(), "cluster": self.cluster.stats()}

    def _pull(self, conn: int, args: dict) -> dict:
        """Bring every chunk among the keys that peers hold into this node now (not only a prefix):
        the target side of the control plane's Move to another node."""
        digest, blob = _arg(args, "ns", bytes), self._key_blob(args)
        self.store._namespace(digest)
        pulled, failed = self.cluster.pull_missing(digest, blob, prefix=False)
        return {"pulled": len(pulled), "failed": failed, "tiers": self.cluster.local_tiers(digest, blob).tobytes()}

    def _on_members(self, conn: int, args: dict) -> dict:
        op = _arg(args, "op", str)
        if op not in MEMBER_OPS:
            raise InvalidArgument(f"on_members runs only {sorted(MEMBER_OPS)}, not {op!r}")
        calls = args.get("calls")
        if calls is None:  # the same args for every member
            shared = _arg(args, "args", dict, {})
            calls = {node: shared for node in self.cluster.members()}
        elif not (isinstance(calls, dict)
                  and all(isinstance(n, str) and isinstance(a, dict) for n, a in calls.items())):
            raise InvalidArgument("calls must map node ids to args")
        timeout = float(_arg(args, "timeout", (int, float), self.cluster.cfg.call_timeout_s))
        return self.cluster.on_members(op, calls, self.run_op, timeout)

    def run_op(self, op: str, args: dict) -> list:
        """The wire reply of one op on behalf of the control plane (on_members, here or from a peer),
        as no connection: what it acquires it releases, what it pins belongs to no connection."""
        if op not in MEMBER_OPS:
            return error_reply(InvalidArgument(f"{op!r} cannot be run on a member"))
        return self._dispatch(PIN_CONN, [op, args])[1]


@ray.remote(num_cpus=0, max_concurrency=32, max_restarts=0)
class ClusterAgent:
    """The node agent as a Ray actor: NodeStore + local socket server + cluster membership."""

    def __init__(self, cfg: KVStoreConfig):
        logging.basicConfig(level=cfg.agent.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.node = ray.get_runtime_context().get_node_id()
        self.store = NodeStore(cfg)
        try:
            self.cluster = ClusterNode(self.store, cfg.cluster, self.node)
            self.server = ClusterServer(self.store, cfg.socket_path, self.cluster).start()
        except BaseException:
            self.store.close()
            raise
        self.cluster.start()

    def info(self) -> dict:
        import os

        return {"node": self.node, "socket_path": self.server.socket_path, "pid": os.getpid(),
                "incarnation": self.cluster.incarnation, "members": self.cluster.members(),
                "arena_path": self.store.cpu.arena_path, "metrics_port": self.server.metrics_port}

    def ping(self) -> tuple[str, list | None]:
        return self.cluster.ping_reply()

    def run_op(self, op: str, args: dict) -> list:
        return self.server.run_op(op, args)

    def apply_updates(self, node: str, blob: bytes, bits: bytes) -> None:
        self.cluster.shard.apply(node, split_keys(blob), list(bits))

    def lookup_holders(self, blob: bytes) -> list:
        return self.cluster.shard.lookup(split_keys(blob))

    def export_chunks(self, digest: bytes, blob: bytes) -> tuple[list[int], Any, dict]:
        return export_chunks(self.store, digest, split_keys(blob), ray.put)

    def import_replicas(self, digest: bytes, blob: bytes, parts: list, description: dict) -> int:
        return self.cluster.import_replicas(digest, blob, parts, description)

    def resync(self) -> None:
        self.cluster._queue_holdings()

    def stop(self) -> None:
        """Stop serving and release the arena and files (the actor process may then be killed)."""
        self.cluster.stop()
        self.server.shutdown()
        self.store.close()
