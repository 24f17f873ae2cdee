"""Rendezvous (highest-random-weight) hashing of chunk keys over node agents.

Every agent ranks the nodes for a key by score(key, node) = mix64(low64(key) ^ node_seed), with
node_seed = xxh3-64 of the node id. The owner of the key's directory entry is the top node; replicas
go to the top nodes after the writer. When a node joins or leaves, only the keys whose top node
changed move (about 1/n of them), and every agent computes the same answer from the same member list,
with no coordination. Scores are computed for a whole batch of keys at once in numpy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xxhash

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def node_seed(node_id: str) -> int:
    return xxhash.xxh3_64_intdigest(node_id.encode())


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijection on uint64 that spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def scores(key_blob: bytes, nodes: Sequence[str]) -> np.ndarray:
    """[n_keys, n_nodes] uint64 scores of every key (16-byte keys, concatenated) for every node."""
    low = np.frombuffer(key_blob, dtype="<u8")[0::2] if key_blob else np.empty(0, dtype=np.uint64)
    seeds = np.array([node_seed(n) for n in nodes], dtype=np.uint64)
    return _mix64(low[:, None] ^ seeds[None, :])


def owners(key_blob: bytes, nodes: Sequence[str]) -> np.ndarray:
    """Index into `nodes` of the owner of each key's directory entry."""
    if not nodes:
        raise ValueError("no nodes to place keys on")
    return np.argmax(scores(key_blob, nodes), axis=1)


def ranking(key_blob: bytes, nodes: Sequence[str]) -> np.ndarray:
    """[n_keys, n_nodes] indexes into `nodes`, best first, for each key."""
    return np.argsort(scores(key_blob, nodes), axis=1)[:, ::-1]


def replica_targets(key_blob: bytes, nodes: Sequence[str], writer: str, copies: int) -> list[list[str]]:
    """For each key, the `copies` nodes other than `writer` that hold its extra copies (fewer if the
    cluster is smaller)."""
    others = [n for n in nodes if n != writer]
    if copies <= 0 or not others:
        return [[] for _ in range(len(key_blob) // 16)]
    order = ranking(key_blob, others)[:, :copies]
    return [[others[i] for i in row] for row in order.tolist()]
