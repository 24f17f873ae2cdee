"""GPU tier: the same slab/eviction logic as the CPU arena, over one device-memory tensor.

Only created where a GPU exists (config gpu.enabled). Engine processes on the node open the pool through
a CUDA IPC handle and copy device-to-device, with no host copy. Everything CUDA-specific is in the two
functions at the bottom, imported lazily; the pool itself is tested on a CPU tensor.
"""

from __future__ import annotations

import torch

from ..config import GpuConfig
from ..errors import ConfigError, InvalidArgument
from .memory import MemoryTier


class DevicePool:
    """`capacity` bytes of one device's memory as a flat uint8 tensor."""

    def __init__(self, capacity: int, device: str):
        self.capacity = capacity
        self.device = torch.device(device)
        self.tensor = torch.empty(capacity, dtype=torch.uint8, device=self.device)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.tensor[offset:offset + nbytes]

    def close(self) -> None:
        self.tensor = None  # type: ignore[assignment]


class GpuTier(MemoryTier):
    """Device-memory tier. `device` may be "cpu" for tests of the shared pool logic."""

    def __init__(self, cfg: GpuConfig, on_evict=None, device: str | None = None, slab_bytes: int = 64 << 20):
        device = device or cfg.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"gpu.device: {device} requested but no CUDA device is available")
        self.pool_tensor = DevicePool(cfg.pool_bytes, device)
        super().__init__("gpu", self.pool_tensor, min(slab_bytes, cfg.pool_bytes), "lru", on_evict)

    def put(self, key: bytes, chunk: torch.Tensor, ns_id: int = 0) -> bool:
        """Copy a chunk (header + payload bytes as a 1-D uint8 tensor, any device) into the pool."""
        data = chunk.reshape(-1).view(torch.uint8)
        offset = self.allocate(data.numel())
        self.view(offset, data.numel()).copy_(data, non_blocking=True)
        return self.insert(key, offset, data.numel(), ns_id)

    def get(self, key: bytes, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The chunk's bytes (a view into the pool, or copied into `out`), or None if absent."""
        eid = int(self.find([key])[0])
        if eid < 0:
            return None
        _, offset, nbytes, _, _ = self.entry(eid)
        view = self.view(offset, nbytes)
        if out is None:
            return view
        if out.numel() * out.element_size() != nbytes:
            raise InvalidArgument(f"out holds {out.numel() * out.element_size()} bytes, the chunk {nbytes}")
        return out.copy_(view.view(out.dtype).view(out.shape))  # strided `out` is written in place

    def ipc_handle(self):
        """A handle other processes on this node pass to `open_ipc_handle` (CUDA only)."""
        return export_cuda_ipc(self.pool_tensor.tensor)


def export_cuda_ipc(tensor: torch.Tensor):
    """CUDA IPC handle of the tensor's storage; lazily uses torch's multiprocessing reductions."""
    if tensor.device.type != "cuda":
        raise ConfigError("CUDA IPC needs a CUDA tensor")
    from torch.multiprocessing.reductions import reduce_tensor  # lazy: CUDA only

    return reduce_tensor(tensor)


def open_ipc_handle(handle) -> torch.Tensor:
    """Rebuild the pool tensor in another process from `export_cuda_ipc`'s handle."""
    rebuild, args = handle
    return rebuild(*args)
