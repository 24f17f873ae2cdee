"""Chunk format: a 128-byte versioned header followed by the (possibly encoded) payload.

The header is specified byte for byte in docs/chunk-format.md. It carries the codec, geometry, dtype,
payload length and an xxh3-64 checksum of the payload. The checksum is filled in by whoever first writes
the chunk to a tier that can rot (the disk writer; later a remote sender) so the put path stays one
memcpy; it is verified on every read from such a tier. A mismatch raises CorruptChunk, which callers
turn into a miss.
"""

from __future__ import annotations

import functools
import math
import struct
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import lz4.block
import xxhash

from .errors import CorruptChunk, InvalidArgument, UnknownCodec
from .layout import DTYPE_BY_ID, DTYPES, Geometry, dtype_itemsize

if TYPE_CHECKING:  # torch is imported inside the functions that use it: the agent never does
    import torch

MAGIC = b"KVC1"
FORMAT_VERSION = 1
HEADER_BYTES = 128
FLAG_CHECKSUM = 0x01  # payload_checksum is valid
FLAG_TOMBSTONE = 0x02  # disk only: the record deletes `key`; payload is empty

# Stable codec ids; append only.
CODEC_IDS = {"raw": 0, "lz4": 1, "int8": 2, "int4": 3}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}

# magic, version, codec, dtype, layers, heads, head_dim, tokens, planes, flags, group, reserved,
# payload_len, payload_checksum, namespace, key, reserved(32), serial(8) -> 120 bytes, then header checksum.
_HEADER = struct.Struct("<4sHBBIIIIBBHIQQ16s16s40x")
_HEADER_CHECK = struct.Struct("<Q")
assert _HEADER.size + _HEADER_CHECK.size == HEADER_BYTES
# Offsets of the fields read straight from a header in the arena, without unpacking it (client.py's
# get): derived from _HEADER's layout, so they cannot drift from it.
CODEC_AT = struct.calcsize("<4sH")
PAYLOAD_LEN_AT = struct.calcsize("<4sHBBIIIIBBHI")
NAMESPACE_AT = PAYLOAD_LEN_AT + 16  # after payload_len and payload_checksum
KEY_AT = NAMESPACE_AT + 16
# The u64 at SERIAL_AT (the reserved area's last 8 bytes) is the CPU arena's stamp on a published slot
# (tiers/cpu.py): the agent writes it in place after the header is checked, so the header checksum reads
# it as zero. Written as 0 elsewhere.
SERIAL_AT = _HEADER.size - 8
_NO_SERIAL = bytes(8)


def _sealed(body: bytes) -> bytes:
    """A packed header body (serial 0) followed by its header checksum."""
    return body + _HEADER_CHECK.pack(xxhash.xxh3_64_intdigest(body))


@functools.lru_cache(maxsize=256)
def _geometry(layers: int, heads: int, head_dim: int, tokens: int, planes: int, dtype: str) -> Geometry:
    """Geometries repeat (one per namespace): build and validate each once, not once per chunk read."""
    return Geometry(layers=layers, heads=heads, head_dim=head_dim, tokens=tokens, planes=planes, dtype=dtype)


def checksum(data) -> int:
    """xxh3-64 of a bytes-like object (the payload checksum)."""
    return xxhash.xxh3_64_intdigest(data)


def codec_id(name: str) -> int:
    try:
        return CODEC_IDS[name]
    except KeyError:
        raise UnknownCodec(f"unknown codec {name!r}; known: {sorted(CODEC_IDS)}") from None


@dataclass(frozen=True)
class ChunkHeader:
    """The decoded 128-byte chunk header."""

    codec: str
    geometry: Geometry
    payload_len: int
    namespace: bytes = bytes(16)
    key: bytes = bytes(16)
    payload_checksum: int = 0
    flags: int = 0
    group: int = 0  # quantisation group size (int8/int4), 0 otherwise

    @property
    def has_checksum(self) -> bool:
        return bool(self.flags & FLAG_CHECKSUM)

    @property
    def is_tombstone(self) -> bool:
        return bool(self.flags & FLAG_TOMBSTONE)

    @property
    def total_len(self) -> int:
        return HEADER_BYTES + self.payload_len

    def with_checksum(self, payload) -> "ChunkHeader":
        """A copy carrying the checksum of `payload`."""
        return replace(self, payload_checksum=checksum(payload), flags=self.flags | FLAG_CHECKSUM)

    def pack(self) -> bytes:
        g = self.geometry
        if len(self.namespace) != 16 or len(self.key) != 16:
            raise InvalidArgument("namespace digest and key must be 16 bytes each")
        body = _HEADER.pack(
            MAGIC, FORMAT_VERSION, codec_id(self.codec), DTYPES[g.dtype][0], g.layers, g.heads,
            g.head_dim, g.tokens, g.planes, self.flags, self.group, 0, self.payload_len,
            self.payload_checksum, self.namespace, self.key,
        )
        return _sealed(body)

    def key_packer(self) -> Callable[[bytes], bytes]:
        """pack() for headers equal to this one but for their key: the other fields are packed once, so
        each header costs a concatenation and its checksum (the put path writes one per chunk)."""
        body = self.pack()[:_HEADER.size]
        head, tail = body[:KEY_AT], body[KEY_AT + 16:]

        def pack_with_key(key: bytes) -> bytes:
            if len(key) != 16:
                raise InvalidArgument("keys are 16 bytes")
            return _sealed(head + key + tail)

        return pack_with_key

    def pack_into(self, buf, offset: int = 0) -> None:
        buf[offset:offset + HEADER_BYTES] = self.pack()

    @classmethod
    def unpack(cls, buf, offset: int = 0) -> "ChunkHeader":
        """Decode and validate a header; raises CorruptChunk on a bad magic, version or header checksum."""
        raw = bytes(buf[offset:offset + HEADER_BYTES])
        if len(raw) < HEADER_BYTES:
            raise CorruptChunk(f"truncated header: {len(raw)} of {HEADER_BYTES} bytes")
        (magic, version, codec, dtype, layers, heads, head_dim, tokens, planes, flags, group, _,
         payload_len, payload_checksum, namespace, key) = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise CorruptChunk(f"bad chunk magic {magic!r}")
        (stored,) = _HEADER_CHECK.unpack_from(raw, _HEADER.size)
        if stored != xxhash.xxh3_64_intdigest(raw[:SERIAL_AT] + _NO_SERIAL):
            raise CorruptChunk("header checksum mismatch")
        if version != FORMAT_VERSION:
            raise CorruptChunk(f"unsupported chunk format version {version}")
        if codec not in CODEC_NAMES:
            raise CorruptChunk(f"unknown codec id {codec}")
        if dtype not in DTYPE_BY_ID:
            raise CorruptChunk(f"unknown dtype id {dtype}")
        try:
            geometry = _geometry(layers, heads, head_dim, tokens, planes, DTYPE_BY_ID[dtype])
        except InvalidArgument as exc:
            raise CorruptChunk(f"bad geometry in header: {exc}") from None
        return cls(codec=CODEC_NAMES[codec], geometry=geometry, payload_len=payload_len,
                   namespace=namespace, key=key, payload_checksum=payload_checksum, flags=flags,
                   group=group)

    def verify(self, payload) -> None:
        """Raise CorruptChunk unless `payload` has this header's length and checksum."""
        if len(payload) != self.payload_len:
            raise CorruptChunk(f"payload is {len(payload)} bytes, header says {self.payload_len}")
        if not self.has_checksum:
            raise CorruptChunk("chunk carries no checksum")
        if checksum(payload) != self.payload_checksum:
            raise CorruptChunk("payload checksum mismatch")


# ---- codecs ---------------------------------------------------------------------------------------
# (encode/decode for raw, lz4, int8, int4 below)
#
# Payload layouts (docs/chunk-format.md has the byte-level version):
#   raw   the chunk's bytes in canonical order [layers, planes, tokens, heads, head_dim].
#   lz4   raw compressed with lz4.block in fast mode, no size prefix (the header's geometry gives it).
#   int8  codes, then scales and mins. One uint8 code per element, in canonical order.
#   int4  as int8 with two codes per byte: element 2i in the low nibble of byte i, 2i+1 in the high.
# Quantisation is KIVI-style asymmetric, x ~ min + code * scale. K (plane 0) is grouped per channel:
# `group` consecutive tokens of one (layer, head, channel). V (plane 1) and the MLA latent are grouped
# per token: `group` consecutive channels of one (layer, token, head); groups never span heads, whose
# magnitudes differ. After the codes come, plane by plane, its scales then its mins, each row-major over
# the plane's group grid and stored in the chunk's own dtype:
#   K: [layers, tokens / group, heads, head_dim]      V, MLA: [layers, tokens, heads, head_dim / group]


_QUANT_BITS = {"int8": 8, "int4": 4}
_QUANT_DTYPES = ("float32", "float16", "bfloat16")
# Largest default group per codec. int4 needs groups of >= 56 elements for 3.5x on 16-bit data, and 64
# is the smallest power of two above that. int8 error is 16x smaller, so it affords 128 for a better ratio.
_MAX_DEFAULT_GROUP = {"int8": 128, "int4": 64}


def default_group(geometry: Geometry, codec: str) -> int:
    """The group `encode` uses for group=0: 0 for raw/lz4, else the largest common divisor of the grouped
    axes (head_dim, and tokens when there is a K plane) that is at most 128 (int8) or 64 (int4)."""
    codec_id(codec)
    if codec not in _QUANT_BITS:
        return 0
    span = math.gcd(geometry.head_dim, geometry.tokens) if geometry.planes == 2 else geometry.head_dim
    return max(d for d in range(1, min(span, _MAX_DEFAULT_GROUP[codec]) + 1) if span % d == 0)


def payload_nbytes(geometry: Geometry, codec: str, group: int = 0) -> int | None:
    """Exact encoded payload size for raw/int8/int4 (group 0 = the codec's default); None for lz4."""
    codec_id(codec)
    if codec == "raw":
        return geometry.nbytes
    if codec == "lz4":
        return None
    group = _checked_group(geometry, codec, group)
    code_bytes = geometry.numel if codec == "int8" else (geometry.numel + 1) // 2
    return code_bytes + 2 * (geometry.numel // group) * dtype_itemsize(geometry.dtype)


def encode(kv: torch.Tensor, codec: str, group: int = 0) -> tuple[torch.Tensor, int]:
    """Encode one chunk in canonical layout. Returns (payload as a 1-D uint8 CPU tensor, group used).

    raw is a zero-copy byte view of `kv` when `kv` is a contiguous CPU tensor."""
    import torch
    codec_id(codec)
    geometry = _geometry_of(kv)
    if codec not in _QUANT_BITS:
        if group:
            raise InvalidArgument(f"codec {codec!r} takes no group, got {group!r}")
        raw = kv.detach().cpu().contiguous().view(torch.uint8).reshape(-1)
        if codec == "raw":
            return raw, 0
        packed = lz4.block.compress(raw.numpy(), mode="fast", store_size=False, return_bytearray=True)
        return torch.frombuffer(packed, dtype=torch.uint8), 0
    group = _checked_group(geometry, codec, group)
    levels = (1 << _QUANT_BITS[codec]) - 1
    codes = torch.empty(kv.shape, dtype=torch.uint8, device=kv.device)
    tables = []
    for plane in range(geometry.planes):
        per_channel = plane == 0 and geometry.planes == 2
        codes[:, plane], scale, low = _quantise_plane(kv[:, plane].detach(), per_channel, group, levels)
        tables += [scale.reshape(-1).view(torch.uint8), low.reshape(-1).view(torch.uint8)]
    codes = codes.reshape(-1)
    if codec == "int4":
        codes = _pack_nibbles(codes)
    return torch.cat([codes, *tables]).cpu(), group


def decode(header: ChunkHeader, payload, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode `payload` into a new tensor of the header's shape and dtype, or into `out` (contiguous, same
    shape and dtype). The result never aliases `payload`; raw costs exactly one copy."""
    import torch

    from .bytecopy import copy_tensor
    codec_id(header.codec)
    geometry = header.geometry
    if out is None:
        out = torch.empty(geometry.shape, dtype=geometry.torch_dtype)
    elif tuple(out.shape) != geometry.shape or out.dtype != geometry.torch_dtype or not out.is_contiguous():
        raise InvalidArgument(f"out must be a contiguous {geometry.dtype} tensor of shape {geometry.shape}, "
                              f"got {out.dtype} {tuple(out.shape)} contiguous={out.is_contiguous()}")
    data = _byte_tensor(payload)
    if data.numel() != header.payload_len:
        raise CorruptChunk(f"payload is {data.numel()} bytes, header says {header.payload_len}")
    out_bytes = out.view(torch.uint8).reshape(-1)
    if header.codec == "raw":
        _expect_len(header, geometry.nbytes)
        copy_tensor(out_bytes, data)
    elif header.codec == "lz4":
        try:
            raw = lz4.block.decompress(data.contiguous().numpy(), uncompressed_size=geometry.nbytes,
                                       return_bytearray=True)
        except lz4.block.LZ4BlockError as exc:
            raise CorruptChunk(f"lz4 payload does not decompress: {exc}") from None
        if len(raw) != geometry.nbytes:
            raise CorruptChunk(f"lz4 payload decompresses to {len(raw)} bytes, expected {geometry.nbytes}")
        copy_tensor(out_bytes, torch.frombuffer(raw, dtype=torch.uint8))
    else:
        _decode_quantised(header, data, out)
    return out


def _geometry_of(kv: torch.Tensor) -> Geometry:
    import torch

    if not isinstance(kv, torch.Tensor) or kv.dim() != 5:
        got = tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
        raise InvalidArgument(f"kv must be a 5-D tensor [layers, planes, tokens, heads, head_dim], got {got}")
    layers, planes, tokens, heads, head_dim = kv.shape
    return Geometry(layers=layers, heads=heads, head_dim=head_dim, tokens=tokens, planes=planes,
                    dtype=kv.dtype)


def _checked_group(geometry: Geometry, codec: str, group: int) -> int:
    """Resolve group 0 to the default and check that groups tile the grouped axes exactly."""
    if geometry.dtype not in _QUANT_DTYPES:
        raise InvalidArgument(f"codec {codec!r} needs float32, float16 or bfloat16 data, got {geometry.dtype}")
    if not isinstance(group, int) or not 0 <= group < 1 << 16:
        raise InvalidArgument(f"group must be an int in [0, 65535] (0 = default), got {group!r}")
    if group == 0:
        return default_group(geometry, codec)
    if geometry.head_dim % group or (geometry.planes == 2 and geometry.tokens % group):
        axes = "head_dim" if geometry.planes == 1 else "both head_dim and tokens"
        raise InvalidArgument(f"group {group} must divide {axes} of {geometry}")
    return group


def _group_view(plane: torch.Tensor, per_channel: bool, group: int) -> tuple[torch.Tensor, int]:
    """Reshape a [layers, tokens, heads, head_dim] plane so each group lies along the returned dim."""
    layers, tokens, heads, head_dim = plane.shape
    if per_channel:
        return plane.reshape(layers, tokens // group, group, heads, head_dim), 2
    return plane.reshape(layers, tokens, heads, head_dim // group, group), 4


def _quantise_plane(plane: torch.Tensor, per_channel: bool, group: int, levels: int):
    """Return (codes shaped like `plane`, scale, min), with scale and min in the plane's dtype."""
    import torch
    x, axis = _group_view(plane.float(), per_channel, group)
    low, high = torch.aminmax(x, dim=axis, keepdim=True)  # low is a data element: exact in the data dtype
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise InvalidArgument("quantised codecs need finite data (found inf or nan)")
    scale = _round_up((high - low) / levels, plane.dtype)
    # Codes come from the stored scale, so the error bound holds for what decode sees. A constant group
    # has scale 0: divide by 1 instead; every code is then 0 and decodes to min exactly.
    scale32 = scale.float()
    codes = (x - low).div_(torch.where(scale32 > 0, scale32, 1.0)).round_().clamp_(0, levels)
    return codes.to(torch.uint8).reshape(plane.shape), scale, low.to(plane.dtype)


def _round_up(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast float32 `value` to `dtype`, rounding up so that min + levels * scale still reaches the max."""
    import torch
    stored = value.to(dtype)
    bumped = torch.nextafter(stored, torch.full_like(stored, math.inf))
    return torch.where(stored.float() < value, bumped, stored)


def _decode_quantised(header: ChunkHeader, data: torch.Tensor, out: torch.Tensor) -> None:
    import torch

    geometry = header.geometry
    if header.group == 0:
        raise CorruptChunk(f"{header.codec} header carries no quantisation group")
    try:
        group = _checked_group(geometry, header.codec, header.group)
    except InvalidArgument as exc:
        raise CorruptChunk(f"bad {header.codec} header: {exc}") from None
    _expect_len(header, payload_nbytes(geometry, header.codec, group))
    numel = geometry.numel
    code_bytes = numel if header.codec == "int8" else (numel + 1) // 2
    codes = data[:code_bytes]
    if header.codec == "int4":
        codes = _unpack_nibbles(codes, numel)
    codes = codes.reshape(geometry.shape)
    tables = data[code_bytes:].clone().view(geometry.torch_dtype)  # clone: the slice may be misaligned
    table_len = numel // geometry.planes // group
    finite = torch.finfo(geometry.torch_dtype).max
    for plane in range(geometry.planes):
        per_channel = plane == 0 and geometry.planes == 2
        plane_codes, axis = _group_view(codes[:, plane], per_channel, group)
        table_shape = list(plane_codes.shape)
        table_shape[axis] = 1
        start = 2 * plane * table_len
        scale = tables[start:start + table_len].float().reshape(table_shape)
        low = tables[start + table_len:start + 2 * table_len].float().reshape(table_shape)
        values = torch.addcmul(low, plane_codes.float(), scale)
        # A decoded value may exceed the group max by scale/2: keep float16 data near 65504 finite.
        out[:, plane] = values.clamp_(-finite, finite).reshape(out[:, plane].shape)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    import torch

    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return codes[0::2] | (codes[1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    import torch

    codes = torch.empty(2 * packed.numel(), dtype=torch.uint8)
    codes[0::2] = packed & 0x0F
    codes[1::2] = packed >> 4
    return codes[:numel]


def _byte_tensor(payload) -> torch.Tensor:
    """View bytes, a memoryview or a 1-D uint8 tensor as a uint8 tensor without copying."""
    import torch
    if isinstance(payload, torch.Tensor):
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise InvalidArgument(f"payload tensor must be 1-D uint8, got {payload.dtype} {tuple(payload.shape)}")
        return payload
    try:
        view = memoryview(payload).cast("B")
    except TypeError:
        raise InvalidArgument(f"payload must be bytes-like or a uint8 tensor, got {type(payload).__name__}") from None
    if view.nbytes == 0:  # torch.frombuffer rejects empty buffers
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # read-only input (bytes) is fine: decode never writes to it
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(view, dtype=torch.uint8)


def _expect_len(header: ChunkHeader, expected: int) -> None:
    if header.payload_len != expected:
        raise CorruptChunk(f"{header.codec} payload of {header.geometry} must be {expected} bytes, "
                           f"header says {header.payload_len}")
