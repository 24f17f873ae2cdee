"""The indexed copies that move a chunk between an engine's paged layers and the chunk: one per layer, or
one for every layer when they share one allocation. Shared by every array backend (kernels.py, and
cupy_kernels.py on CUDA)."""

from __future__ import annotations

from typing import Sequence

import torch

from .paged import PagedLayout


def row_view(kv: torch.Tensor, layout: PagedLayout) -> torch.Tensor:
    """``kv``'s memory as ``[num_rows, head_dim]``, starting at its first element (no copy)."""
    return kv.as_strided((layout.num_rows, layout.head_dim), (layout.head_dim, 1))


def copy_jobs(layers: Sequence[torch.Tensor], layout: PagedLayout, rows: torch.Tensor,
              chunk: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(row view, row indices, chunk part) for each indexed copy, where the indices have the part's shape
    without head_dim.

    When every layer lives in one allocation at whole-row offsets (vLLM 0.32 carves all layers out of
    one buffer), a single view spans them and one copy moves every layer. Otherwise there is one copy
    per layer.
    """
    storage = layers[0].untyped_storage().data_ptr()
    offsets = [kv.storage_offset() for kv in layers]
    low = min(offsets)
    if len(layers) > 1 and all(kv.untyped_storage().data_ptr() == storage for kv in layers) \
            and all((offset - low) % layout.head_dim == 0 for offset in offsets):
        bases = torch.tensor([(offset - low) // layout.head_dim for offset in offsets], dtype=torch.int64)
        span = layers[0].as_strided((int(bases.max()) + layout.num_rows, layout.head_dim),
                                    (layout.head_dim, 1), low)
        return [(span, bases[:, None, None, None] + rows, chunk)]
    return [(row_view(kv, layout), rows, chunk[layer]) for layer, kv in enumerate(layers)]
