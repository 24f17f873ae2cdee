"""Where each token's K and V live in an engine's paged KV cache, read from the tensor's shape and strides.

Engines keep one tensor per attention layer, cut into blocks of ``block_size`` tokens; a request owns a
block table (block ids, in token order). Backends order the dims differently and sometimes allocate in
one physical order and hand out a permuted view, so nothing here assumes contiguity: a layout is the
element stride of each role (plane, block, token-in-block, head). The innermost dim, ``head_dim``, must
be stride-1, so the cache is a set of *rows* of ``head_dim`` elements and every (plane, token, head) of
a request is one row index. A transfer is then one gather or scatter of rows (kernels.py), the same
code for every layout.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple, Sequence, Union

import numpy as np
import torch

from ..errors import InvalidArgument
from ..layout import Geometry, dtype_name


class UnsupportedLayout(InvalidArgument):
    """The engine's KV tensor cannot be read as rows of ``head_dim`` elements with the given sizes."""


BlockTable = Union[Sequence[int], np.ndarray, torch.Tensor]


class KnownOrder(NamedTuple):
    """One engine layout: ``dims`` names the roles of each tensor dim, outer to inner. Roles: P plane
    (K, V), B block, T token in block, H kv head, D head_dim; a dim with several roles ("PD") is a
    fused dim, outer role first."""

    dims: str
    shape: str
    not_on_cpu: str = ""  # why a CPU tensor of this shape is refused unless the order is named


_VLLM_CPU_ATTN = (
    "on CPU this is vLLM's CPU_ATTN cache, whose pages are not token-major: per (block, head) its "
    "kernel stores K transposed as [head_size, block_size] (and with AMX and bf16, K and V packed in "
    "pairs for the tile unit), so K has no rows of head_size values to copy. Pass order='vllm' only "
    "if this tensor really holds K then V per token")

# Tried in this order; the first whose sizes and strides fit wins. Order only matters when sizes are
# ambiguous (block_size == kv_heads, num_blocks == 2, ...): strides cannot settle those, since permuted
# views are allowed, so the earlier entry wins. A caller that knows its backend passes ``order=``.
ORDERS: dict[str, KnownOrder] = {
    "hnd": KnownOrder("P B H T D", "(2, num_blocks, kv_heads, block_size, head_size)"),
    "flash": KnownOrder("P B T H D", "FlashAttention (2, num_blocks, block_size, kv_heads, head_size)"),
    "flashinfer": KnownOrder("B P T H D", "FlashInfer/Triton (num_blocks, 2, block_size, kv_heads, "
                                          "head_size)"),
    "flashinfer_hnd": KnownOrder("B P H T D", "FlashInfer HND (num_blocks, 2, kv_heads, block_size, "
                                              "head_size)"),
    "vllm": KnownOrder("B H T PD", "vLLM 0.32 [B, H, N, C] view, C = K then V of one token (flash_attn, "
                                   "triton_attn, flashinfer): (num_blocks, kv_heads, block_size, "
                                   "2*head_size)", not_on_cpu=_VLLM_CPU_ATTN),
}
MLA_ORDERS: dict[str, KnownOrder] = {
    "mla": KnownOrder("B T D", "MLA (num_blocks, block_size, latent_dim)"),
    "vllm_mla": KnownOrder("B H T D", "vLLM 0.32 MLA [B, H=1, N, C] view: (num_blocks, 1, block_size, "
                                      "latent_dim)"),
}


@dataclass(frozen=True)
class PagedLayout:
    """One layer's paged KV tensor as rows of ``head_dim`` elements.

    Strides are in rows (element stride / head_dim). Row of (plane p, block b, token-in-block t, head h)
    is ``p*plane_stride + b*block_stride + t*token_stride + h*head_stride``, counted from the layer
    tensor's own first element; a role of size 1 has stride 0. Distinct (p, b, t, h) never share a row
    (checked), so a scatter cannot overwrite itself. Every layer tensor must have exactly ``shape`` and
    ``stride`` (element strides) and ``dtype``. ``order`` is the key of ORDERS/MLA_ORDERS that fit.
    """

    order: str
    block_size: int
    heads: int
    head_dim: int
    planes: int
    num_blocks: int
    plane_stride: int
    block_stride: int
    token_stride: int
    head_stride: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @classmethod
    def from_tensor(cls, kv: torch.Tensor, block_size: int, num_kv_heads: int, head_size: int,
                    mla: bool = False, order: str | None = None) -> "PagedLayout":
        """Identify the layout of one layer's KV tensor from its shape and strides.

        Tries the known orders (``ORDERS``, or ``MLA_ORDERS`` when ``mla``) in their fixed order, or
        only ``order`` (a key of those) when given. Raises UnsupportedLayout, naming the shape and
        strides, when none fits.
        """
        for name, value in (("block_size", block_size), ("num_kv_heads", num_kv_heads),
                            ("head_size", head_size)):
            if not isinstance(value, int) or value <= 0:
                raise InvalidArgument(f"{name} must be a positive int, got {value!r}")
        if mla and num_kv_heads != 1:
            raise InvalidArgument(f"MLA caches have one latent 'head', got num_kv_heads={num_kv_heads}")
        known = MLA_ORDERS if mla else ORDERS
        if order is not None and order not in known:
            raise InvalidArgument(f"unknown {'MLA ' if mla else ''}layout order {order!r}; known: "
                                  f"{sorted(known)}")
        dtype = dtype_name(kv.dtype)
        given = {"P": 1 if mla else 2, "T": block_size, "H": num_kv_heads, "D": head_size}
        refusal: UnsupportedLayout | None = None
        for name in [order] if order else known:
            roles = _match_sizes(kv, known[name].dims.split(), given)
            if roles is None:
                continue
            if not order and known[name].not_on_cpu and kv.device.type == "cpu":
                refusal = refusal or UnsupportedLayout(
                    f"KV tensor shape {tuple(kv.shape)} stride {kv.stride()}: {known[name].not_on_cpu}")
                continue
            try:
                return cls._from_roles(kv, name, roles, dtype)
            except UnsupportedLayout as exc:
                refusal = refusal or exc
        if refusal is not None:
            raise refusal
        expected = "; ".join(f"{name}: {known[name].shape}" for name in ([order] if order else known))
        raise UnsupportedLayout(
            f"KV tensor shape {tuple(kv.shape)} (stride {kv.stride()}) matches no known layout for "
            f"block_size={block_size}, num_kv_heads={num_kv_heads}, head_size={head_size}"
            f"{', mla' if mla else ''}; expected one of: {expected}")

    @classmethod
    def _from_roles(cls, kv: torch.Tensor, order: str, roles: dict[str, tuple[int, int]],
                    dtype: str) -> "PagedLayout":
        sizes = {role: size for role, (size, _) in roles.items()}
        strides = {role: stride for role, (_, stride) in roles.items()}
        where = f"KV tensor shape {tuple(kv.shape)} stride {kv.stride()} read as {order!r}"
        head_dim = sizes["D"]
        if head_dim > 1 and strides["D"] != 1:
            raise UnsupportedLayout(f"{where}: head_dim stride is {strides['D']}, expected 1 (each "
                                    f"head's {head_dim} values must be contiguous)")
        rows = {}
        for role in "PBTH":
            if sizes[role] == 1:
                rows[role] = 0
            elif strides[role] % head_dim:
                raise UnsupportedLayout(f"{where}: {_ROLE_NAMES[role]} stride {strides[role]} is not a "
                                        f"multiple of head_size {head_dim}")
            else:
                rows[role] = strides[role] // head_dim
        # Rows are distinct when, sorted by stride, each stride exceeds the span of the smaller ones.
        span = 0
        for role in sorted((r for r in "PBTH" if sizes[r] > 1), key=lambda r: rows[r]):
            if rows[role] <= span:
                raise UnsupportedLayout(f"{where}: {_ROLE_NAMES[role]} stride {strides[role]} overlaps "
                                        f"the dims inside it; distinct tokens would share memory")
            span += rows[role] * (sizes[role] - 1)
        return cls(order=order, block_size=sizes["T"], heads=sizes["H"], head_dim=head_dim,
                   planes=sizes["P"], num_blocks=sizes["B"], plane_stride=rows["P"],
                   block_stride=rows["B"], token_stride=rows["T"], head_stride=rows["H"], dtype=dtype,
                   shape=tuple(kv.shape), stride=tuple(kv.stride()))

    @property
    def num_rows(self) -> int:
        """Rows from the layer tensor's first element to its last (gaps included)."""
        return 1 + sum(stride * (size - 1) for stride, size in (
            (self.plane_stride, self.planes), (self.block_stride, self.num_blocks),
            (self.token_stride, self.block_size), (self.head_stride, self.heads)))

    def geometry(self, layers: int, chunk_tokens: int) -> Geometry:
        """The chunk geometry for a model with ``layers`` layers of this layout."""
        return Geometry(layers=layers, heads=self.heads, head_dim=self.head_dim, tokens=chunk_tokens,
                        planes=self.planes, dtype=self.dtype)

    def check(self, kv: torch.Tensor) -> None:
        """Raise UnsupportedLayout unless ``kv`` has this layout (same shape, strides and dtype)."""
        if tuple(kv.shape) != self.shape or tuple(kv.stride()) != self.stride or \
                dtype_name(kv.dtype) != self.dtype:
            raise UnsupportedLayout(f"layer tensor shape {tuple(kv.shape)} stride {kv.stride()} "
                                    f"{kv.dtype} differs from the layout's shape {self.shape} stride "
                                    f"{self.stride} {self.dtype}")

    def rows(self, block_ids: BlockTable, token_start: int, num_tokens: int) -> torch.Tensor:
        """Row indices (int64, CPU) of shape ``[planes, num_tokens, heads]`` for tokens
        ``[token_start, token_start + num_tokens)`` of a request whose block table is ``block_ids``.

        The table must cover the range; the blocks it uses must be valid and distinct.
        """
        try:
            token_start, num_tokens = operator.index(token_start), operator.index(num_tokens)
        except TypeError:
            raise InvalidArgument(f"token range must be ints, got start={token_start!r} "
                                  f"count={num_tokens!r}") from None
        if token_start < 0 or num_tokens < 0:
            raise InvalidArgument(f"token range must be non-negative, got start={token_start} "
                                  f"count={num_tokens}")
        first = token_start // self.block_size
        end = -(-(token_start + num_tokens) // self.block_size) if num_tokens else first
        if getattr(block_ids, "ndim", 1) != 1:
            raise InvalidArgument(f"block table must be 1-D, got shape {tuple(block_ids.shape)}")
        if len(block_ids) < end:
            raise InvalidArgument(f"block table has {len(block_ids)} blocks; tokens [{token_start}, "
                                  f"{token_start + num_tokens}) need {end} of block_size {self.block_size}")
        used = block_ids[first:end]  # only the blocks this range touches are converted
        table = used.to("cpu", torch.int64) if isinstance(used, torch.Tensor) else \
            torch.from_numpy(np.asarray(used, dtype=np.int64))
        if len(table):
            low, high = int(table.min()), int(table.max())
            if low < 0 or high >= self.num_blocks:
                raise InvalidArgument(f"block ids must be in [0, {self.num_blocks}), got {low}..{high}")
            if len(torch.unique(table)) != len(table):
                raise InvalidArgument(f"block table repeats a block in {table.tolist()}")
        tok = torch.arange(token_start, token_start + num_tokens, dtype=torch.int64)
        token_rows = table[tok // self.block_size - first] * self.block_stride \
            + (tok % self.block_size) * self.token_stride
        plane_rows = torch.arange(self.planes, dtype=torch.int64) * self.plane_stride
        head_rows = torch.arange(self.heads, dtype=torch.int64) * self.head_stride
        return plane_rows[:, None, None] + token_rows[None, :, None] + head_rows[None, None, :]


_ROLE_NAMES = {"P": "plane", "B": "block", "T": "token", "H": "head", "D": "head_dim"}


def _match_sizes(kv: torch.Tensor, dims: list[str],
                 given: dict[str, int]) -> dict[str, tuple[int, int]] | None:
    """(size, element stride) of every role when ``kv``'s shape fits ``dims``, else None. The block
    count is the one size not given. A fused dim of stride s splits into roles whose strides are s
    times the sizes of the roles inside them."""
    if kv.dim() != len(dims):
        return None
    roles: dict[str, tuple[int, int]] = {}
    for names, size, stride in zip(dims, kv.shape, kv.stride()):
        if names == "B":
            roles["B"] = (size, stride)
            continue
        if size != int(np.prod([given[r] for r in names])):
            return None
        for role in reversed(names):
            roles[role] = (given[role], stride)
            stride *= given[role]
    for role in "PTHD":  # a role without a dim (MLA has no plane or head dim) must have size 1
        if role not in roles:
            if given[role] != 1:
                return None
            roles[role] = (1, 0)
    return roles if roles["B"][0] > 0 else None
