"""The gather/scatter kernels for CUDA tensors, in CuPy on a stream of our own.

Engine compute runs on torch's current stream; copies on a separate stream can overlap it. Tensors cross
to CuPy through DLPack (zero-copy views of the same memory). Ordering with the engine is kept with
events: our stream waits for work already queued on torch's current stream before reading or writing the
cache, and torch's current stream waits for our copies before it runs anything queued after this call,
so a caller sees the same ordering as the torch kernels and never has to synchronise the host.

The copies are laid out by jobs.copy_jobs. When the layers share one allocation, as vLLM 0.32's do,
a single take or assignment covers every layer. Otherwise there is one per layer, queued asynchronously.

Imported lazily by kernels.array_backend, only for CUDA tensors and only when CuPy is installed. There is
no GPU where this was written: this file has never run; it is kept small to be checked by reading.
Arguments are validated by kernels.gather/scatter before these run.
"""

from __future__ import annotations

from typing import Sequence

import cupy
import torch

from .jobs import copy_jobs
from .paged import PagedLayout

# CuPy has no bfloat16 or float8 through DLPack; a copy only moves bytes, so hand over same-width ints.
_AS_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

_streams: dict[int, cupy.cuda.Stream] = {}


def _stream(device: int) -> cupy.cuda.Stream:
    if device not in _streams:
        with cupy.cuda.Device(device):
            _streams[device] = cupy.cuda.Stream(non_blocking=True)
    return _streams[device]


def _cupy(t: torch.Tensor) -> cupy.ndarray:
    return cupy.from_dlpack(t.view(_AS_INT[t.element_size()]).detach())


def _after_torch(stream: cupy.cuda.Stream, device: int) -> cupy.cuda.ExternalStream:
    """Make ``stream`` wait for torch's current stream; return that stream for _before_torch."""
    torch_stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, device)
    ready = cupy.cuda.Event(disable_timing=True)
    ready.record(torch_stream)
    stream.wait_event(ready)
    return torch_stream


def _before_torch(stream: cupy.cuda.Stream, torch_stream: cupy.cuda.ExternalStream) -> None:
    done = cupy.cuda.Event(disable_timing=True)
    done.record(stream)
    torch_stream.wait_event(done)


def gather(layers: Sequence[torch.Tensor], layout: PagedLayout, rows: torch.Tensor,
           out: torch.Tensor) -> None:
    device = out.device.index if out.device.index is not None else torch.cuda.current_device()
    stream = _stream(device)
    with cupy.cuda.Device(device), stream:
        torch_stream = _after_torch(stream, device)
        for view, index, part in copy_jobs(layers, layout, rows, out):
            # The index lives in CuPy's pool and is filled on our stream, so torch cannot reuse it early.
            src, dst, index = _cupy(view), _cupy(part), cupy.asarray(index.numpy())
            if dst.flags.c_contiguous:
                cupy.take(src, index, axis=0, out=dst)
            else:  # a token slice of a larger chunk
                dst[...] = cupy.take(src, index, axis=0)
        _before_torch(stream, torch_stream)


def scatter(chunk: torch.Tensor, layers: Sequence[torch.Tensor], layout: PagedLayout,
            rows: torch.Tensor) -> None:
    device = chunk.device.index if chunk.device.index is not None else torch.cuda.current_device()
    stream = _stream(device)
    with cupy.cuda.Device(device), stream:
        torch_stream = _after_torch(stream, device)
        for view, index, part in copy_jobs(layers, layout, rows, chunk):
            _cupy(view)[cupy.asarray(index.numpy())] = _cupy(part)  # rows are distinct (see rows())
        _before_torch(stream, torch_stream)
