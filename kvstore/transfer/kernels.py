"""Gather paged KV rows into a chunk and scatter a chunk back: one indexed copy per layer, or one for all.

The row indices come from PagedLayout.rows and are laid out ``[planes, tokens, heads]``. That is the order
of one layer of a chunk, so a layer's rows gathered in index order *are* that layer's chunk slice. The
gather writes straight into the chunk, even into a token slice of a larger chunk, with no temporary.
The scatter is its inverse. When all layers share one allocation, one copy covers every layer
(copy_jobs). Arguments, including row bounds, are checked here once before any backend runs, so the
backends can skip their own bounds checks.

CPU tensors are copied by numpy (``take`` and fancy assignment over views of the same memory). torch's
CPU ``index_select`` and ``index_copy_`` split work over its OpenMP pool. On a small, busy machine that
costs hundreds of times the copy (measured: 7.7 ms instead of 22 us for 1,536 rows on 2 loaded cores;
see bytecopy.py). CUDA tensors use CuPy on its own stream when CuPy is installed (cupy_kernels.py,
imported only then). Other devices, and CUDA without CuPy, use torch's ``index_select`` and
``index_copy_``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from ..bytecopy import as_numpy
from ..errors import InvalidArgument
from .jobs import copy_jobs
from .paged import PagedLayout

# index_copy_ has no float8 kernel on CPU. A copy only moves bytes, so move float8 as uint8.
_BYTES = (torch.float8_e4m3fn, torch.float8_e5m2)


class Backend(NamedTuple):
    name: str
    gather: Callable[[Sequence[torch.Tensor], PagedLayout, torch.Tensor, torch.Tensor], None]
    scatter: Callable[[torch.Tensor, Sequence[torch.Tensor], PagedLayout, torch.Tensor], None]


def gather(layers: Sequence[torch.Tensor], layout: PagedLayout, rows: torch.Tensor,
           out: torch.Tensor) -> None:
    """Copy the tokens that ``rows`` selects from every layer into ``out``, shaped
    ``[layers, planes, n, heads, head_dim]`` (``rows`` is ``[planes, n, heads]``, from ``layout.rows``)."""
    _check(layers, layout, rows, out, "out")
    array_backend(out).gather(layers, layout, rows, out)


def scatter(chunk: torch.Tensor, layers: Sequence[torch.Tensor], layout: PagedLayout,
            rows: torch.Tensor) -> None:
    """Copy ``chunk``, shaped ``[layers, planes, n, heads, head_dim]``, into the positions that ``rows``
    selects."""
    _check(layers, layout, rows, chunk, "chunk")
    array_backend(chunk).scatter(chunk, layers, layout, rows)


def array_backend(tensor: torch.Tensor) -> Backend:
    """The kernels for ``tensor``'s device: numpy for CPU, CuPy for CUDA when installed, torch otherwise."""
    if tensor.device.type == "cpu":
        return NUMPY
    if tensor.device.type == "cuda":
        try:
            from . import cupy_kernels
        except ImportError:  # no CuPy: torch's kernels run on CUDA too, on the current stream
            return TORCH
        return Backend("cupy", cupy_kernels.gather, cupy_kernels.scatter)
    return TORCH


def _gather_numpy(layers: Sequence[torch.Tensor], layout: PagedLayout, rows: torch.Tensor,
                  out: torch.Tensor) -> None:
    for view, index, part in copy_jobs(layers, layout, rows, out):
        # mode="clip" skips numpy's bounds pass and the buffered copy that comes with it; _check did
        # the bounds check.
        np.take(as_numpy(view), index.numpy(), axis=0, out=as_numpy(part), mode="clip")


def _scatter_numpy(chunk: torch.Tensor, layers: Sequence[torch.Tensor], layout: PagedLayout,
                   rows: torch.Tensor) -> None:
    for view, index, part in copy_jobs(layers, layout, rows, chunk):
        as_numpy(view)[index.numpy()] = as_numpy(part)  # rows are distinct (PagedLayout.rows checks)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in _BYTES else t


# Engines allocate their caches as inference tensors, and torch refuses in-place writes to those
# outside inference mode.
@torch.inference_mode()
def _gather_torch(layers: Sequence[torch.Tensor], layout: PagedLayout, rows: torch.Tensor,
                  out: torch.Tensor) -> None:
    for view, index, part in copy_jobs(layers, layout, rows, out):
        src, dst, index = _raw(view), _raw(part), index.reshape(-1).to(out.device)
        if dst.is_contiguous():
            torch.index_select(src, 0, index, out=dst.view(-1, layout.head_dim))
        else:  # a token slice of a larger chunk: gather, then one copy into place
            dst.copy_(torch.index_select(src, 0, index).view(dst.shape))


@torch.inference_mode()
def _scatter_torch(chunk: torch.Tensor, layers: Sequence[torch.Tensor], layout: PagedLayout,
                   rows: torch.Tensor) -> None:
    for view, index, part in copy_jobs(layers, layout, rows, chunk):
        src = _raw(part).reshape(-1, layout.head_dim)  # copies only if part is a token slice
        _raw(view).index_copy_(0, index.reshape(-1).to(chunk.device), src)


NUMPY = Backend("numpy", _gather_numpy, _scatter_numpy)
TORCH = Backend("torch", _gather_torch, _scatter_torch)


def _check(layers: Sequence[torch.Tensor], layout: PagedLayout, rows: torch.Tensor, chunk: torch.Tensor,
           what: str) -> None:
    if len(layers) == 0:
        raise InvalidArgument("no layers given")
    for kv in layers:
        layout.check(kv)
        if kv.device != chunk.device:
            raise InvalidArgument(f"KV cache is on {kv.device} but {what} is on {chunk.device}")
    if rows.dtype != torch.int64 or rows.device.type != "cpu" or rows.dim() != 3 \
            or rows.shape[0] != layout.planes or rows.shape[2] != layout.heads:
        raise InvalidArgument(f"rows must be a CPU int64 tensor [planes={layout.planes}, tokens, "
                              f"heads={layout.heads}], got {rows.dtype} {tuple(rows.shape)} on {rows.device}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= layout.num_rows):
        raise InvalidArgument(f"rows must be in [0, {layout.num_rows}), "
                              f"got {int(rows.min())}..{int(rows.max())}")
    expected = (len(layers), layout.planes, rows.shape[1], layout.heads, layout.head_dim)
    dtype = layers[0].dtype
    if tuple(chunk.shape) != expected or chunk.dtype != dtype:
        raise InvalidArgument(f"{what} must be {dtype} {expected}, got {chunk.dtype} "
                              f"{tuple(chunk.shape)}")
