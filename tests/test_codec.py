"""Chunk header and codecs: round trips, documented error bounds and sizes, and every bad input."""

import math
import struct
from dataclasses import replace

import pytest
import torch
import xxhash

from kvstore.codec import (
    FLAG_CHECKSUM, HEADER_BYTES, SERIAL_AT, ChunkHeader, decode, default_group, encode, payload_nbytes,
)
from kvstore.errors import CorruptChunk, InvalidArgument, UnknownCodec
from kvstore.layout import SMOLLM2_135M, Geometry, default_chunk_tokens

pytestmark = pytest.mark.unit

CODECS = ("raw", "lz4", "int8", "int4")
LEVELS = {"int8": 255, "int4": 15}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

GEOMETRIES = [
    Geometry(layers=3, heads=2, head_dim=64, tokens=128, dtype="bfloat16"),
    Geometry(layers=2, heads=2, head_dim=128, tokens=256, dtype="float16"),
    Geometry(layers=2, heads=1, head_dim=576, tokens=32, planes=1, dtype="float32"),  # MLA latent
    Geometry(layers=1, heads=1, head_dim=5, tokens=3, planes=1, dtype="bfloat16"),  # odd element count
]


def make_kv(geometry: Geometry, seed: int = 0) -> torch.Tensor:
    """Random KV with K outlier channels, a V outlier token and one constant group in every plane."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(geometry.shape, generator=gen)
    kv[:, 0, :, :, 0] *= 40.0  # an outlier channel, the reason K is quantised per channel
    kv[:, -1, 1] *= 20.0  # an outlier token
    kv[:, -1, :, :, -1] += 3.0
    group = math.lcm(default_group(geometry, "int8"), default_group(geometry, "int4"))  # whole groups for both
    if geometry.planes == 2:
        kv[0, 0, :group, 0, 1] = 0.75  # one K group: `group` tokens of one channel
    kv[0, -1, 2, 0, :group] = -1.25  # one V / MLA group: `group` channels of one token
    return kv.to(geometry.torch_dtype)


def header_for(geometry, codec, payload, group, **fields) -> ChunkHeader:
    return ChunkHeader(codec=codec, geometry=geometry, payload_len=payload.numel(), group=group, **fields)


def stored_tables(payload, geometry, codec, group):
    """Per plane (scale, min) read from the payload as docs/chunk-format.md lays it out, expanded to one
    value per element of the plane ([layers, tokens, heads, head_dim], float32)."""
    code_bytes = geometry.numel if codec == "int8" else (geometry.numel + 1) // 2
    tables = payload[code_bytes:].clone().view(geometry.torch_dtype).float()
    count = geometry.numel // geometry.planes // group
    layers, _, tokens, heads, head_dim = geometry.shape
    planes = []
    for plane in range(geometry.planes):
        scale, low = tables[2 * plane * count:(2 * plane + 2) * count].split(count)
        if plane == 0 and geometry.planes == 2:
            grid, axis = (layers, tokens // group, heads, head_dim), 1
        else:
            grid, axis = (layers, tokens, heads, head_dim // group), 3
        planes.append(tuple(t.reshape(grid).repeat_interleave(group, axis) for t in (scale, low)))
    return planes


def stored_codes(payload, geometry, codec):
    """Codes in canonical order: one byte each (int8) or two per byte, low nibble first (int4)."""
    if codec == "int8":
        codes = payload[:geometry.numel]
    else:
        packed = payload[:(geometry.numel + 1) // 2]
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:geometry.numel]
    return codes.reshape(geometry.shape).float()


def group_range(plane: torch.Tensor, per_channel: bool, group: int):
    """(min, max) of each element's quantisation group, computed from the data itself."""
    layers, tokens, heads, head_dim = plane.shape
    if per_channel:
        grouped, axis, expand = plane.reshape(layers, tokens // group, group, heads, head_dim), 2, 1
    else:
        grouped, axis, expand = plane.reshape(layers, tokens, heads, head_dim // group, group), 4, 3
    return tuple(t.squeeze(axis).repeat_interleave(group, expand)
                 for t in (grouped.amin(axis, keepdim=True), grouped.amax(axis, keepdim=True)))


# ---- header -------------------------------------------------------------------------------------------


def full_header() -> ChunkHeader:
    return ChunkHeader(codec="int4", geometry=GEOMETRIES[2], payload_len=123_456, namespace=b"n" * 16,
                       key=bytes(range(16)), payload_checksum=0xDEADBEEF_01234567, flags=FLAG_CHECKSUM,
                       group=64)


def test_header_round_trip_at_an_offset():
    header = full_header()
    packed = header.pack()
    assert len(packed) == HEADER_BYTES
    buf = bytearray(7) + packed + bytearray(5)
    assert ChunkHeader.unpack(buf, 7) == header
    assert ChunkHeader.unpack(memoryview(buf), 7) == header
    target = bytearray(HEADER_BYTES + 3)
    header.pack_into(target, 3)
    assert ChunkHeader.unpack(target, 3) == header


def test_header_byte_offsets_match_the_doc():
    packed = full_header().pack()
    assert packed[0:4] == b"KVC1"
    assert struct.unpack_from("<HBB", packed, 4) == (1, 3, 1)  # version, codec int4, dtype float32
    assert struct.unpack_from("<IIII", packed, 8) == (2, 1, 576, 32)  # layers, heads, head_dim, tokens
    assert struct.unpack_from("<BBHI", packed, 24) == (1, FLAG_CHECKSUM, 64, 0)
    assert struct.unpack_from("<QQ", packed, 32) == (123_456, 0xDEADBEEF_01234567)
    assert packed[48:64] == b"n" * 16 and packed[64:80] == bytes(range(16))
    assert packed[80:120] == bytes(40)
    assert struct.unpack_from("<Q", packed, 120)[0] == xxhash.xxh3_64_intdigest(packed[:120])


@pytest.mark.parametrize("position", [p for p in range(HEADER_BYTES) if not SERIAL_AT <= p < SERIAL_AT + 8])
def test_any_flipped_header_byte_is_detected(position):
    packed = bytearray(full_header().pack())
    packed[position] ^= 0x10
    with pytest.raises(CorruptChunk):
        ChunkHeader.unpack(packed)


def test_the_arena_serial_is_outside_the_header_checksum():
    """The agent stamps a published arena slot's header in place (tiers/cpu.py); the header still reads
    back whole, as the same header."""
    packed = bytearray(full_header().pack())
    struct.pack_into("<Q", packed, SERIAL_AT, 0x1234_5678_9ABC)
    assert ChunkHeader.unpack(packed) == full_header()


def test_bad_magic_truncation_and_version():
    packed = full_header().pack()
    with pytest.raises(CorruptChunk, match="magic"):
        ChunkHeader.unpack(b"XXXX" + packed[4:])
    with pytest.raises(CorruptChunk, match="truncated"):
        ChunkHeader.unpack(packed[:HEADER_BYTES - 1])
    # A well-formed header (valid checksum) from a future format version is still refused.
    body = bytearray(packed[:120])
    struct.pack_into("<H", body, 4, 2)
    with pytest.raises(CorruptChunk, match="version"):
        ChunkHeader.unpack(bytes(body) + struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(body))))


def test_verify_payload_checksum():
    payload = bytes(range(200))
    header = ChunkHeader(codec="raw", geometry=GEOMETRIES[0], payload_len=len(payload))
    with pytest.raises(CorruptChunk, match="no checksum"):
        header.verify(payload)
    header = header.with_checksum(payload)
    header.verify(payload)
    ChunkHeader.unpack(header.pack()).verify(payload)
    with pytest.raises(CorruptChunk, match="checksum mismatch"):
        header.verify(payload[:-1] + b"\x00")
    with pytest.raises(CorruptChunk, match="bytes"):
        header.verify(payload[:-1])


# ---- codecs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_through_a_checksummed_chunk(geometry, codec):
    kv = make_kv(geometry)
    payload, group = encode(kv, codec)
    assert payload.dtype == torch.uint8 and payload.dim() == 1 and payload.device.type == "cpu"
    assert group == default_group(geometry, codec)
    if codec != "lz4":
        assert payload.numel() == payload_nbytes(geometry, codec)
    chunk = header_for(geometry, codec, payload, group).with_checksum(payload.numpy()).pack()
    chunk += payload.numpy().tobytes()
    header = ChunkHeader.unpack(chunk)
    body = memoryview(chunk)[HEADER_BYTES:]
    header.verify(body)
    decoded = decode(header, body)
    assert decoded.shape == geometry.shape and decoded.dtype == geometry.torch_dtype
    if codec in ("raw", "lz4"):
        assert torch.equal(decoded, kv)
    else:
        assert torch.isfinite(decoded).all()
        assert not torch.equal(decoded, kv)  # it really is lossy; the bound is checked below


@pytest.mark.parametrize("geometry", GEOMETRIES + [SMOLLM2_135M], ids=str)
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_quantisation_error_within_documented_bound(geometry, codec):
    kv = make_kv(geometry, seed=1)
    payload, group = encode(kv, codec)
    decoded = decode(header_for(geometry, codec, payload, group), payload).float()
    levels, unit = LEVELS[codec], UNIT_ROUNDOFF[geometry.torch_dtype]
    finfo = torch.finfo(geometry.torch_dtype)
    codes = stored_codes(payload, geometry, codec)
    for plane, (scale, low) in enumerate(stored_tables(payload, geometry, codec, group)):
        x, x_hat = kv[:, plane].float(), decoded[:, plane]
        # The stored min is the group's true min and the stored scale is range/levels rounded up once.
        data_low, data_high = group_range(x, plane == 0 and geometry.planes == 2, group)
        needed = (data_high - data_low) / levels
        assert torch.equal(low, data_low)
        assert (scale >= needed * (1 - 2.0**-20)).all()
        assert (scale <= needed * (1 + 2 * unit) + finfo.tiny * finfo.eps).all()
        # Decoded values are min + code * scale from the payload's own codes, rounded once.
        reference = low.double() + codes[:, plane].double() * scale.double()
        assert ((x_hat.double() - reference).abs() <= unit * reference.abs() + finfo.tiny * finfo.eps).all()
        # docs/chunk-format.md: |x - x_hat| <= scale/2 + u|x_hat| + 2^-20 (|min| + levels scale) + subnormal.
        bound = (scale / 2 + unit * x_hat.abs() + 2.0**-20 * (low.abs() + levels * scale)
                 + finfo.tiny * finfo.eps)
        error = (x - x_hat).abs()
        assert (error <= bound).all(), f"plane {plane}: worst excess {(error - bound).max().item()}"
        # Constant groups decode exactly.
        constant = data_high == data_low
        assert constant.any() and torch.equal(x_hat[constant], x[constant])


def test_k_is_grouped_per_channel_so_an_outlier_channel_stays_local():
    geometry = GEOMETRIES[0]
    kv = make_kv(geometry, seed=2)
    payload, group = encode(kv, "int4")
    decoded = decode(header_for(geometry, "int4", payload, group), payload).float()
    error = (decoded - kv.float()).abs()[:, 0]  # K plane
    outlier_error, normal_error = error[..., 0].max().item(), error[..., 2:].max().item()
    assert outlier_error > 5 * normal_error  # channel 0 is 40x larger; the others keep a fine grid


def test_int8_is_more_accurate_than_int4():
    geometry = GEOMETRIES[1]
    kv = make_kv(geometry)
    errors = {}
    for codec in ("int8", "int4"):
        payload, group = encode(kv, codec)
        decoded = decode(header_for(geometry, codec, payload, group), payload)
        errors[codec] = (decoded.float() - kv.float()).abs().mean().item()
    assert errors["int8"] * 8 < errors["int4"]


def test_float16_near_its_max_stays_finite():
    geometry = Geometry(layers=1, heads=1, head_dim=64, tokens=64, dtype="float16")
    kv = make_kv(geometry)
    kv[0, :, :, 0, 5] = 65504.0
    kv[0, :, :, 0, 6] = -65504.0
    for codec in ("int8", "int4"):
        payload, group = encode(kv, codec)
        decoded = decode(header_for(geometry, codec, payload, group), payload)
        assert torch.isfinite(decoded).all()
        assert (decoded[0, :, :, 0, 5] >= 65000).all()


def test_smollm2_payload_sizes():
    kv = make_kv(SMOLLM2_135M)
    sizes = {codec: encode(kv, codec)[0].numel() for codec in ("raw", "int8", "int4")}
    assert sizes["raw"] == SMOLLM2_135M.nbytes == 5_898_240
    assert SMOLLM2_135M.nbytes / sizes["int4"] >= 3.5
    assert SMOLLM2_135M.nbytes / sizes["int8"] >= 1.88


def test_head_dim_128_payload_sizes():
    geometry = Geometry(layers=4, heads=8, head_dim=128, tokens=256, dtype="bfloat16")
    kv = make_kv(geometry)
    assert geometry.nbytes / encode(kv, "int4")[0].numel() >= 3.5
    assert geometry.nbytes / encode(kv, "int8")[0].numel() >= 1.9


def test_default_groups():
    assert default_group(SMOLLM2_135M, "int4") == 64
    assert default_group(SMOLLM2_135M, "int8") == 64
    hd128 = Geometry(layers=2, heads=8, head_dim=128, tokens=256)
    assert (default_group(hd128, "int8"), default_group(hd128, "int4")) == (128, 64)
    assert default_group(Geometry(layers=2, heads=1, head_dim=576, tokens=7, planes=1), "int8") == 96
    assert default_group(SMOLLM2_135M, "raw") == default_group(SMOLLM2_135M, "lz4") == 0


def test_raw_is_a_zero_copy_view_and_handles_non_contiguous_input():
    kv = make_kv(GEOMETRIES[0])
    payload, _ = encode(kv, "raw")
    assert payload.data_ptr() == kv.data_ptr() and payload.numel() == kv.numel() * kv.element_size()
    strided = make_kv(GEOMETRIES[0]).transpose(0, 2).contiguous().transpose(0, 2)
    assert not strided.is_contiguous()
    payload, _ = encode(strided, "raw")
    assert torch.equal(payload, encode(strided.contiguous(), "raw")[0])


def test_raw_and_lz4_carry_any_dtype_bit_exactly():
    geometry = Geometry(layers=2, heads=2, head_dim=16, tokens=8, dtype="float8_e4m3fn")
    kv = torch.randint(0, 256, geometry.shape, dtype=torch.uint8).view(torch.float8_e4m3fn)
    for codec in ("raw", "lz4"):
        payload, group = encode(kv, codec)
        decoded = decode(header_for(geometry, codec, payload, group), payload)
        assert torch.equal(decoded.view(torch.uint8), kv.view(torch.uint8))


def test_lz4_compresses_redundant_data():
    kv = torch.zeros(SMOLLM2_135M.shape, dtype=torch.bfloat16)
    payload, _ = encode(kv, "lz4")
    assert payload.numel() * 100 < SMOLLM2_135M.nbytes
    assert payload_nbytes(SMOLLM2_135M, "lz4") is None


@pytest.mark.parametrize("codec", CODECS)
def test_decode_into_out(codec):
    geometry = GEOMETRIES[0]
    kv = make_kv(geometry)
    payload, group = encode(kv, codec)
    header = header_for(geometry, codec, payload, group)
    expected = decode(header, payload)
    for source in (payload, payload.numpy().tobytes(), memoryview(payload.numpy())):
        out = torch.full(geometry.shape, 9.0, dtype=geometry.torch_dtype)
        assert decode(header, source, out=out) is out
        assert torch.equal(out, expected)


# ---- bad inputs ---------------------------------------------------------------------------------------


def test_unknown_codec():
    kv = make_kv(GEOMETRIES[0])
    for call in (lambda: encode(kv, "zstd"), lambda: payload_nbytes(GEOMETRIES[0], "zstd"),
                 lambda: default_group(GEOMETRIES[0], "zstd"),
                 lambda: decode(ChunkHeader(codec="zstd", geometry=GEOMETRIES[0], payload_len=1), b"x")):
        with pytest.raises(UnknownCodec, match="zstd"):
            call()


def test_encode_rejects_bad_tensors_and_groups():
    geometry = GEOMETRIES[0]
    kv = make_kv(geometry)
    with pytest.raises(InvalidArgument, match="5-D"):
        encode(kv[0], "raw")
    with pytest.raises(InvalidArgument, match="5-D"):
        encode([1, 2], "raw")
    with pytest.raises(InvalidArgument, match="planes"):
        encode(torch.zeros(1, 3, 4, 1, 8), "raw")
    with pytest.raises(InvalidArgument, match="dtype"):
        encode(torch.zeros(1, 2, 4, 1, 8, dtype=torch.int32), "raw")
    with pytest.raises(InvalidArgument, match="float32, float16 or bfloat16"):
        encode(kv.view(torch.uint8), "int8")
    with pytest.raises(InvalidArgument, match="float32, float16 or bfloat16"):
        payload_nbytes(Geometry(layers=1, heads=1, head_dim=8, dtype="float8_e5m2"), "int4")
    with pytest.raises(InvalidArgument, match="must divide"):
        encode(kv, "int4", group=48)  # divides neither head_dim 64 nor tokens 128
    with pytest.raises(InvalidArgument, match="65535"):
        encode(kv, "int8", group=1 << 16)
    with pytest.raises(InvalidArgument, match="65535"):
        encode(kv, "int8", group=-4)
    with pytest.raises(InvalidArgument, match="takes no group"):
        encode(kv, "raw", group=64)
    kv[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidArgument, match="finite"):
        encode(kv, "int4")


def test_explicit_group_is_used_and_recorded():
    geometry = GEOMETRIES[0]
    kv = make_kv(geometry)
    payload, group = encode(kv, "int4", group=32)
    assert group == 32 and payload.numel() == payload_nbytes(geometry, "int4", 32)
    assert payload.numel() > payload_nbytes(geometry, "int4")  # smaller groups cost more tables
    errors = []
    for payload, group in (encode(kv, "int4", group=32), encode(kv, "int4")):
        decoded = decode(header_for(geometry, "int4", payload, group), payload)
        errors.append((decoded.float() - kv.float()).abs().mean().item())
    assert errors[0] < errors[1]  # and they buy accuracy


@pytest.mark.parametrize("codec", CODECS)
def test_decode_rejects_payload_of_wrong_length(codec):
    geometry = GEOMETRIES[0]
    payload, group = encode(make_kv(geometry), codec)
    header = header_for(geometry, codec, payload, group)
    with pytest.raises(CorruptChunk, match="header says"):
        decode(header, payload[:-1])
    # The header agrees with the bytes but not with the geometry (lz4: the block is cut short).
    short = header_for(geometry, codec, payload[:-2], group)
    with pytest.raises(CorruptChunk):
        decode(short, payload[:-2])


def test_decode_rejects_undecompressable_lz4():
    geometry = GEOMETRIES[0]
    garbage = torch.full((500,), 0xFF, dtype=torch.uint8)
    with pytest.raises(CorruptChunk, match="lz4"):
        decode(header_for(geometry, "lz4", garbage, 0), garbage)


@pytest.mark.parametrize("bad_group", [0, 48, 7])
def test_decode_rejects_a_bad_group_in_the_header(bad_group):
    geometry = GEOMETRIES[0]
    payload, _ = encode(make_kv(geometry), "int8")
    with pytest.raises(CorruptChunk, match="int8"):
        decode(header_for(geometry, "int8", payload, bad_group), payload)


def test_decode_rejects_bad_out_and_payload_types():
    geometry = GEOMETRIES[0]
    payload, group = encode(make_kv(geometry), "raw")
    header = header_for(geometry, "raw", payload, group)
    bad_outs = [torch.empty(geometry.shape, dtype=torch.float16),
                torch.empty((1,) + geometry.shape[1:], dtype=torch.bfloat16),
                torch.empty(geometry.shape[::-1], dtype=torch.bfloat16).permute(4, 3, 2, 1, 0)]
    for out in bad_outs:
        with pytest.raises(InvalidArgument, match="contiguous bfloat16"):
            decode(header, payload, out=out)
    with pytest.raises(InvalidArgument, match="1-D uint8"):
        decode(header, payload.view(torch.int8))
    with pytest.raises(InvalidArgument, match="bytes-like"):
        decode(header, 12345)


@pytest.mark.parametrize("block_size, chunk", [(16, 128), (128, 128), (48, 144), (256, 256)])
def test_default_chunk_is_the_smallest_multiple_of_the_block_of_at_least_128_tokens(block_size, chunk):
    assert default_chunk_tokens(block_size) == chunk


def test_default_chunk_rejects_a_non_positive_block():
    with pytest.raises(InvalidArgument):
        default_chunk_tokens(0)


def test_a_key_packer_packs_the_same_header_as_pack_for_every_key():
    template = full_header()
    pack_with_key = template.key_packer()
    for key in (bytes(16), bytes(range(16)), b"\xff" * 16):
        assert pack_with_key(key) == replace(template, key=key).pack()
        assert ChunkHeader.unpack(pack_with_key(key)).key == key
    with pytest.raises(InvalidArgument):
        pack_with_key(b"short")
