"""Tiers in the ControlService's messages (kvstore.v1.Tier) and in the rest of kvstore (vocab.Tier)."""

from __future__ import annotations

from ..vocab import Tier
from . import kvstore_pb2 as pb

# equal today; kept explicit so either side may change
TO_PB = {Tier.NONE: pb.TIER_UNSPECIFIED, Tier.GPU: pb.TIER_GPU, Tier.CPU: pb.TIER_CPU, Tier.DISK: pb.TIER_DISK,
         Tier.REMOTE: pb.TIER_REMOTE}
FROM_PB = {value: tier for tier, value in TO_PB.items()}


def label(value: int) -> str:
    """The tier name of a kvstore.v1.Tier value ('?' for one this version does not know)."""
    tier = FROM_PB.get(value)
    return "?" if tier is None or tier == Tier.NONE else tier.label


def named(name: str) -> int:
    """The kvstore.v1.Tier value of a tier name."""
    return TO_PB[Tier.named(name)]
