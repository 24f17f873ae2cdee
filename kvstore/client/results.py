"""What the client's calls return."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..vocab import MissReason, Tier, tier_labels


@dataclass(frozen=True)
class LookupResult:
    chunks: int  # stored chunks from the start of the prompt
    tokens: int  # chunks * chunk_tokens
    tier_codes: bytes  # tier of each matched chunk, as wire codes (vocab.Tier)

    @property
    def tiers(self) -> tuple[str, ...]:
        """Tier name of each matched chunk ('cpu', 'disk', 'remote')."""
        return tier_labels(self.tier_codes)

    @property
    def remote(self) -> bool:
        """Some matched chunks are on other nodes: a get pulls them first (wait for it, or prefetch)."""
        return Tier.REMOTE in self.tier_codes


@dataclass(frozen=True)
class ClusterLookupResult(LookupResult):
    """A lookup across the cluster: the prefix held anywhere, and every node's own prefix."""

    nodes: tuple[tuple[str, int, tuple[str, ...]], ...] = ()  # (node id, chunks from the first, tiers)
    node: str = ""  # the node of the agent this client talks to


@dataclass(frozen=True)
class PutResult:
    stored: int  # newly stored chunks
    existing: int  # already stored (or being stored by another client): nothing written
    no_space: int  # dropped: nothing evictable in the arena
    errors: tuple[tuple[int, str, str], ...] = ()  # (index, code, message) of rejected chunks


@dataclass(frozen=True)
class GetResult:
    """A read's outcome: the stored prefix of the keys asked for, and why the rest was not served."""

    chunks: torch.Tensor  # [n, *geometry.shape]: the first n keys' chunks (n may be < len(keys))
    misses: dict[int, MissReason] = field(default_factory=dict)  # index in the request -> reason
    remote: tuple[int, ...] = ()  # indexes a cluster agent pulled from other nodes for this read
