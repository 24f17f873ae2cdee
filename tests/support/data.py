"""A small chunk geometry and its namespace, and deterministic chunks and token ids for it."""

from __future__ import annotations

import numpy as np
import torch

from kvstore.keys import Namespace
from kvstore.layout import Geometry

# A small geometry keeps tests fast: 2 layers, K+V, 16 tokens, 2 heads, head_dim 32, bf16 = 8 KiB.
SMALL = Geometry(layers=2, heads=2, head_dim=32, tokens=16, dtype="bfloat16")
SMALL_NS = Namespace(model="test-model", chunk_tokens=16)


def tokens(n_chunks: int, start: int = 0) -> np.ndarray:
    """Token ids for `n_chunks` full chunks of the SMALL geometry."""
    return np.arange(n_chunks * SMALL.tokens) + start


def small_chunks(n: int, seed: int = 0, geometry: Geometry = SMALL) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *geometry.shape), generator=gen).to(geometry.torch_dtype)
