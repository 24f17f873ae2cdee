"""One copy between CPU tensors, done by numpy (a plain single-threaded memcpy or strided loop).

torch's CPU `copy_` splits large copies over its OpenMP pool; on a small, busy machine one descheduled
worker stalls the whole copy (measured: 0.7 GB/s instead of 9 GB/s on 2 loaded cores). Engines size that
pool for compute, not for us, so the data path copies through numpy views instead. Non-CPU tensors (GPU)
use torch's copy, which runs on the device.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# numpy has no bfloat16/float8: view such tensors as an integer type of the same width.
_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view (no copy) of a CPU tensor, any dtype, any strides."""
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2) or not t.dtype.is_floating_point \
            and t.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool):
        t = t.view(_SAME_WIDTH[t.element_size()])
    return t.detach().numpy()


def byte_rows(t: torch.Tensor) -> np.ndarray | None:
    """A contiguous CPU tensor [n, ...] as an [n, bytes] uint8 numpy view, or None for any other.
    Copying a chunk is then one flat memcpy-like pass from a numpy slice: no torch view and no
    numpy conversion per chunk (together ~85 us a chunk, 7% of a 5.9 MB chunk's copy here)."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.dim() == 0:
        return None
    return as_numpy(t).reshape(-1).view(np.uint8).reshape(t.shape[0], math.prod(t.shape[1:]) * t.element_size())


def copy_tensor(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst[...] = src with one pass over the bytes (a gather when src is strided)."""
    if dst.device.type != "cpu" or src.device.type != "cpu":
        return dst.copy_(src, non_blocking=True)
    if dst.dtype != src.dtype:
        if dst.dtype == torch.uint8 and src.is_contiguous():
            src = src.reshape(-1).view(torch.uint8)  # raw bytes of a contiguous tensor
        else:
            raise TypeError(f"copy_tensor: {src.dtype} into {dst.dtype}")
    if dst.shape != src.shape:
        if dst.numel() != src.numel() or not dst.is_contiguous():
            raise ValueError(f"copy_tensor: shape {tuple(src.shape)} into {tuple(dst.shape)}")
        dst = dst.view(src.shape)
    np.copyto(as_numpy(dst), as_numpy(src), casting="no")
    return dst
