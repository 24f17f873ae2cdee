"""Asking the cluster directory who holds which chunks, and the cluster-wide prefix lookup built on it."""

from __future__ import annotations

import time

import numpy as np

from ..errors import NotFound
from ..vocab import MissReason, Tier, fastest_tier, pick_keys, split_keys
from ..wire.messages import LookupReply
from .context import MemberContext
from .directory import DirectoryShard, Holders, by_owner
from .link import LinkError


class HolderQueries:
    """Thread-safe."""

    def __init__(self, ctx: MemberContext, shard: DirectoryShard):
        self.ctx = ctx
        self.shard = shard

    def holders(self, keys: list[bytes], deadline: float) -> tuple[list[Holders], int]:
        """Holders of each key other than this node, asked of every owner at once. Returns the holder
        maps and how many keys could not be answered (owner gone or late: no holder known)."""
        blob = b"".join(keys)
        me = self.ctx.membership.node
        result: list[Holders] = [{} for _ in keys]
        asked = []  # (picked, link, connection with the request sent): every owner is asked at once
        unanswered = 0
        for node, picked_array in by_owner(blob, self.ctx.membership.members()):
            picked = picked_array.tolist()
            if node == me:
                for i, holders in zip(picked, self.shard.lookup(keys[i] for i in picked)):
                    result[i] = holders or {}
                continue
            peer = self.ctx.membership.peer(node)
            try:
                if peer is None:
                    raise LinkError(MissReason.DIRECTORY_UNAVAILABLE, f"{node[:8]} left")
                asked.append((picked, peer.link, peer.link.send("holders", {"keys": pick_keys(blob, picked_array)},
                                                                deadline)))
            except LinkError:
                unanswered += len(picked)
        for picked, link, conn in asked:
            try:
                answers = link.reply(conn, deadline)
            except LinkError:
                unanswered += len(picked)
                continue
            for i, holders in zip(picked, answers):
                result[i] = holders or {}
        if unanswered:
            self.ctx.counters.add("directory_unanswered_keys", unanswered)
        for holders in result:
            holders.pop(me, None)  # our own store is asked directly: it is always current
        return result, unanswered

    def serve_holders(self, sock, frames, args: dict) -> list:
        """The link op `holders` (keys): this node's directory shard's holders of each key."""
        return self.shard.lookup(split_keys(args.get("keys")))

    def local_tiers(self, digest: bytes, blob: bytes) -> np.ndarray:
        """This node's tier code of each key (0: not held here, or the namespace is unknown here)."""
        try:
            return np.frombuffer(self.ctx.store.contains(digest, blob), dtype=np.uint8)
        except NotFound:
            return np.zeros(len(blob) // 16, dtype=np.uint8)

    def lookup(self, digest: bytes, blob: bytes) -> LookupReply:
        """The longest prefix of `blob`'s keys held anywhere in the cluster, with the tier of each chunk as
        the local protocol reports it (local tier, or remote), and for every node holding a prefix: how
        many chunks from the first and in which tiers."""
        keys = split_keys(blob)
        local = self.local_tiers(digest, blob)
        remote, _ = self.holders(keys, time.monotonic() + self.ctx.cfg.call_timeout_s)  # every holder is reported
        held = [bool(t) or bool(h) for t, h in zip(local.tolist(), remote)]
        matched = held.index(False) if False in held else len(keys)
        codes = np.where(local[:matched] > 0, local[:matched], Tier.REMOTE).astype(np.uint8)
        nodes: dict[str, dict] = {}
        local_run = int(np.argmin(local > 0)) if not local.all() else len(keys)
        if local_run:
            nodes[self.ctx.membership.node] = {"chunks": local_run, "tiers": local[:local_run].tobytes()}
        for node in {n for h in remote[:1] for n in h}:
            run = []
            for holders in remote:
                bits = holders.get(node, 0)
                if not bits:
                    break
                run.append(fastest_tier(bits))
            nodes[node] = {"chunks": len(run), "tiers": bytes(run)}
        self.ctx.counters.add("cluster_lookups")
        return LookupReply(matched, codes.tobytes(), nodes, self.ctx.membership.node)
