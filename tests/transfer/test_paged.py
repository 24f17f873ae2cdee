"""Paged cache <-> chunk transfer against a slow per-token reference, for every known engine layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.errors import InvalidArgument
from kvstore.layout import Geometry
from kvstore.transfer import PagedLayout, UnsupportedLayout, array_backend, gather, scatter
from kvstore.transfer.kernels import TORCH

pytestmark = pytest.mark.unit

BLOCK, HEADS, DIM, NUM_BLOCKS, LAYERS = 16, 2, 32, 12, 2

# Logical shape of one layer for each layout, and where token `off` of block `blk` lives as [P, H, D]
# (basic indexing, so the reference can write through it too).
SHAPES = {
    "hnd": lambda nb, bs, h, d: (2, nb, h, bs, d),
    "flash": lambda nb, bs, h, d: (2, nb, bs, h, d),
    "flashinfer": lambda nb, bs, h, d: (nb, 2, bs, h, d),
    "flashinfer_hnd": lambda nb, bs, h, d: (nb, 2, h, bs, d),
    "vllm": lambda nb, bs, h, d: (nb, h, bs, 2 * d),
    "mla": lambda nb, bs, h, d: (nb, bs, d),
    "vllm_mla": lambda nb, bs, h, d: (nb, 1, bs, d),
}
TOKEN = {
    "hnd": lambda kv, blk, off: kv[:, blk, :, off],
    "flash": lambda kv, blk, off: kv[:, blk, off],
    "flashinfer": lambda kv, blk, off: kv[blk, :, off],
    "flashinfer_hnd": lambda kv, blk, off: kv[blk, :, :, off],
    "vllm": lambda kv, blk, off: kv[blk, :, off].unflatten(-1, (2, -1)).transpose(0, 1),
    "mla": lambda kv, blk, off: kv[blk, off][None, None],
    "vllm_mla": lambda kv, blk, off: kv[blk, :, off][None],
}
MLA = {"mla", "vllm_mla"}


def random_like(shape, dtype, gen) -> torch.Tensor:
    if dtype.itemsize == 1:  # float8: any byte pattern is a value; compare as bytes
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).view(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


def make_layers(order, dtype=torch.bfloat16, *, physical=None, seed=0, zero=False, nb=NUM_BLOCKS,
                bs=BLOCK, heads=HEADS, dim=DIM) -> list[torch.Tensor]:
    """LAYERS tensors of `order`'s logical shape; `physical` allocates in that dim order and permutes back."""
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[order](nb, bs, 1 if order in MLA else heads, dim)
    layers = []
    for _ in range(LAYERS):
        perm = physical or tuple(range(len(shape)))
        storage = torch.zeros([shape[i] for i in perm], dtype=dtype) if zero else \
            random_like([shape[i] for i in perm], dtype, gen)
        layers.append(storage.permute(*np.argsort(perm)))
        assert layers[-1].shape == shape
    return layers


def layout_of(order, layers, bs=BLOCK, heads=HEADS, dim=DIM) -> PagedLayout:
    mla = order in MLA
    return PagedLayout.from_tensor(layers[0], bs, 1 if mla else heads, dim, mla=mla, order=order)


def reference_chunk(order, layers, table, start, count, bs=BLOCK) -> torch.Tensor:
    """The chunk, one token at a time: [layers, planes, count, heads, head_dim]."""
    per_layer = []
    for kv in layers:
        tokens = [TOKEN[order](kv, table[t // bs], t % bs) for t in range(start, start + count)]
        per_layer.append(torch.stack(tokens, dim=1))
    return torch.stack(per_layer)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.contiguous().view(width), b.contiguous().view(width))


def block_table(seed=1, nb=NUM_BLOCKS) -> list[int]:
    table = torch.randperm(nb, generator=torch.Generator().manual_seed(seed)).tolist()
    assert table != sorted(table)
    return table


def new_chunk(layout, count) -> torch.Tensor:
    return torch.empty(layout.geometry(LAYERS, count).shape, dtype=layout.geometry(LAYERS, count).torch_dtype)


# (order, dtype, physical dim order of the storage or None)
CASES = [
    ("hnd", torch.bfloat16, None),
    ("hnd", torch.float32, (1, 0, 3, 2, 4)),
    ("flash", torch.bfloat16, None),
    ("flash", torch.float32, (1, 0, 3, 2, 4)),  # vLLM's HND stride order behind an NHD shape
    ("flashinfer", torch.bfloat16, None),
    ("flashinfer", torch.float16, (0, 1, 3, 2, 4)),
    ("flashinfer_hnd", torch.float32, None),
    ("vllm", torch.bfloat16, None),
    ("vllm", torch.float32, (0, 2, 1, 3)),  # LBNHC: heads inside tokens
    ("mla", torch.bfloat16, None),
    ("mla", torch.float32, (1, 0, 2)),
    ("vllm_mla", torch.bfloat16, None),
    ("flash", torch.float8_e4m3fn, None),
]
IDS = [f"{o}-{str(d).removeprefix('torch.')}{'-permuted' if p else ''}" for o, d, p in CASES]


# CPU tensors go through numpy; the torch kernels (other devices, CUDA without CuPy) run on CPU too.
BACKENDS = ["numpy", "torch"]


def run_gather(backend, layers, layout, rows, out):
    (TORCH.gather if backend == "torch" else gather)(layers, layout, rows, out)


def run_scatter(backend, chunk, layers, layout, rows):
    (TORCH.scatter if backend == "torch" else scatter)(chunk, layers, layout, rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order,dtype,physical", CASES, ids=IDS)
def test_gather_is_bit_identical_to_reference(order, dtype, physical, backend):
    layers = make_layers(order, dtype, physical=physical)
    layout = layout_of(order, layers)
    assert layout.order == order
    table = block_table()
    for start, count in [(0, 3 * BLOCK), (5, 37), (3, 5), (13, 5), (7, 2 * BLOCK + 3)]:
        out = new_chunk(layout, count)
        run_gather(backend, layers, layout, layout.rows(table, start, count), out)
        assert same_bits(out, reference_chunk(order, layers, table, start, count)), (start, count)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order,dtype,physical", CASES, ids=IDS)
def test_scatter_writes_exactly_the_chunk_positions(order, dtype, physical, backend):
    layers = make_layers(order, dtype, physical=physical, zero=True)
    layout = layout_of(order, layers)
    table = block_table(seed=2)
    start, count = 11, 2 * BLOCK + 9  # starts and ends mid-block, spans 3 blocks
    chunk = random_like(layout.geometry(LAYERS, count).shape, dtype, torch.Generator().manual_seed(3))
    run_scatter(backend, chunk, layers, layout, layout.rows(table, start, count))
    assert same_bits(reference_chunk(order, layers, table, start, count), chunk)
    as_bytes = torch.uint8 if dtype.itemsize == 1 else dtype  # float8 has no count_nonzero on CPU
    for kv in layers:  # clear what the chunk should have written: nothing else may be non-zero
        for t in range(start, start + count):
            TOKEN[order](kv, table[t // BLOCK], t % BLOCK).view(as_bytes).zero_()
        assert not kv.view(as_bytes).count_nonzero()


@pytest.mark.parametrize("order", ["flash", "vllm", "mla"])
def test_round_trip_through_a_chunk(order):
    source = make_layers(order, torch.bfloat16, seed=4)
    target = make_layers(order, torch.bfloat16, zero=True)
    layout = layout_of(order, source)
    src_table, dst_table = block_table(seed=5), block_table(seed=6)
    start, count = 9, 40
    chunk = new_chunk(layout, count)
    gather(source, layout, layout.rows(src_table, start, count), chunk)
    scatter(chunk, target, layout, layout.rows(dst_table, start, count))
    again = new_chunk(layout, count)
    gather(target, layout, layout.rows(dst_table, start, count), again)
    assert same_bits(again, chunk)
    assert same_bits(reference_chunk(order, target, dst_table, start, count),
                     reference_chunk(order, source, src_table, start, count))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_tokens", [BLOCK // 2 - 1, BLOCK, 3 * BLOCK])
def test_chunks_smaller_and_larger_than_a_block(chunk_tokens, backend):
    """A request cut into chunks of any size, each gathered into a slice of one big buffer."""
    layers = make_layers("flashinfer", torch.bfloat16, seed=7)
    layout = layout_of("flashinfer", layers)
    table, total = block_table(seed=8), 5 * BLOCK + 3
    whole = new_chunk(layout, total)
    for start in range(0, total, chunk_tokens):
        count = min(chunk_tokens, total - start)
        rows = layout.rows(table, start, count)
        run_gather(backend, layers, layout, rows, whole[:, :, start:start + count])
    assert same_bits(whole, reference_chunk("flashinfer", layers, table, 0, total))

    target = make_layers("flashinfer", torch.bfloat16, zero=True)
    for start in range(0, total, chunk_tokens):
        count = min(chunk_tokens, total - start)
        rows = layout.rows(table, start, count)
        run_scatter(backend, whole[:, :, start:start + count], target, layout, rows)
    assert same_bits(reference_chunk("flashinfer", target, table, 0, total), whole)


def vllm_like_layers(raw: torch.Tensor, nb, bs, heads, dim, dtype) -> list[torch.Tensor]:
    """vLLM 0.32 carves every layer out of one int8 buffer: [L, B, N, H, C] bytes in memory (LBNHC),
    each layer a [B, H, N, C] view of it reinterpreted as the KV dtype."""
    by_memory = raw.view(LAYERS, nb, bs, heads, 2 * dim * dtype.itemsize)
    return [by_memory[layer].transpose(1, 2).view(dtype) for layer in range(LAYERS)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_sharing_one_allocation_like_vllm(backend):
    nb, bs, heads, dim, dtype = 6, 16, 2, 32, torch.bfloat16
    size = LAYERS * nb * bs * heads * 2 * dim * dtype.itemsize
    layers = vllm_like_layers(torch.randint(-128, 128, (size,), dtype=torch.int8), nb, bs, heads, dim, dtype)
    layout = PagedLayout.from_tensor(layers[0], bs, heads, dim, order="vllm")
    table = block_table(seed=9, nb=nb)
    chunk = new_chunk(layout, 50)
    run_gather(backend, layers, layout, layout.rows(table, 3, 50), chunk)
    assert same_bits(chunk, reference_chunk("vllm", layers, table, 3, 50))

    raw = torch.zeros(size, dtype=torch.int8)
    target = vllm_like_layers(raw, nb, bs, heads, dim, dtype)
    run_scatter(backend, chunk, target, layout, layout.rows(table[::-1], 3, 50))
    assert same_bits(reference_chunk("vllm", target, table[::-1], 3, 50), chunk)
    written = int(raw.count_nonzero())
    assert 0 < written <= chunk.numel() * dtype.itemsize  # nothing outside the chunk's positions


@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_in_one_allocation_at_unaligned_offsets(backend):
    """Layers one element apart from a whole row still work (one copy per layer)."""
    shape = SHAPES["flash"](NUM_BLOCKS, BLOCK, HEADS, DIM)
    numel = int(np.prod(shape))
    flat = torch.randn(1 + LAYERS * numel)
    layers = [flat[1 + layer * numel:1 + (layer + 1) * numel].view(shape) for layer in range(LAYERS)]
    layers[1] = flat[:numel].view(shape)  # overlaps layer 0, shifted by one element
    layout = layout_of("flash", layers)
    table = block_table()
    out = new_chunk(layout, 21)
    run_gather(backend, layers, layout, layout.rows(table, 6, 21), out)
    assert same_bits(out, reference_chunk("flash", layers, table, 6, 21))


def test_block_table_forms_and_geometry():
    layers = make_layers("flash", torch.bfloat16)
    layout = layout_of("flash", layers)
    table = block_table()
    expected = layout.rows(table, 4, 30)
    assert expected.shape == (2, 30, HEADS) and expected.dtype == torch.int64
    assert torch.equal(layout.rows(np.array(table), 4, 30), expected)
    assert torch.equal(layout.rows(torch.tensor(table, dtype=torch.int32), 4, 30), expected)
    assert layout.rows(table[:1], 3, 0).shape == (2, 0, HEADS)
    assert layout.geometry(LAYERS, 256) == Geometry(layers=LAYERS, heads=HEADS, head_dim=DIM, tokens=256,
                                                    planes=2, dtype="bf16")
    mla = layout_of("mla", make_layers("mla"))
    assert mla.geometry(3, 64).shape == (3, 1, 64, 1, DIM)


def test_ambiguous_sizes_resolve_by_the_fixed_order_or_by_name():
    """block_size == kv_heads: (2, nb, 8, 8, d) fits both HND and NHD; strides cannot tell."""
    kv = torch.randn(2, NUM_BLOCKS, 8, 8, DIM)
    assert PagedLayout.from_tensor(kv, 8, 8, DIM).order == "hnd"
    named = PagedLayout.from_tensor(kv, 8, 8, DIM, order="flash")
    assert named.order == "flash"
    out = torch.empty(1, 2, 10, 8, DIM)
    gather([kv], named, named.rows([4, 2], 3, 10), out)
    assert torch.equal(out, reference_chunk("flash", [kv], [4, 2], 3, 10, bs=8)[:1])


def test_vllm_cpu_attention_cache_is_refused_unless_named():
    kv = torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 2 * DIM, dtype=torch.bfloat16)
    with pytest.raises(UnsupportedLayout, match="CPU_ATTN.*K transposed"):
        PagedLayout.from_tensor(kv, BLOCK, HEADS, DIM)


def expect_invalid(match, fn, *args, **kw):
    with pytest.raises(InvalidArgument, match=match):
        fn(*args, **kw)


def test_errors_name_the_shape_and_what_was_expected():
    kv = torch.zeros(2, NUM_BLOCKS, HEADS, BLOCK, DIM, dtype=torch.bfloat16)
    expect_invalid(r"shape \(2, 12, 2, 16, 32\).*head_size=64", PagedLayout.from_tensor, kv, BLOCK, HEADS, 64)
    expect_invalid(r"block_size=8.*expected one of", PagedLayout.from_tensor, kv, 8, HEADS, DIM)
    expect_invalid("unknown layout order 'paged'", PagedLayout.from_tensor, kv, BLOCK, HEADS, DIM,
                   order="paged")
    expect_invalid("num_kv_heads=2", PagedLayout.from_tensor, kv, BLOCK, HEADS, DIM, mla=True)
    expect_invalid("block_size must be a positive int", PagedLayout.from_tensor, kv, 0, HEADS, DIM)

    transposed = torch.zeros(2, NUM_BLOCKS, HEADS, DIM, BLOCK).transpose(-1, -2)
    with pytest.raises(UnsupportedLayout, match="head_dim stride is 16, expected 1"):
        PagedLayout.from_tensor(transposed, BLOCK, HEADS, DIM)
    odd = torch.zeros(10_000).as_strided((2, NUM_BLOCKS, HEADS, BLOCK, DIM), (4000, 300, 40, 10, 1))
    with pytest.raises(UnsupportedLayout, match="not a multiple of head_size 32"):
        PagedLayout.from_tensor(odd, BLOCK, HEADS, DIM)
    shared = torch.zeros(2, 1, HEADS, BLOCK, DIM).expand(2, NUM_BLOCKS, HEADS, BLOCK, DIM)
    with pytest.raises(UnsupportedLayout, match="block stride 0 overlaps"):
        PagedLayout.from_tensor(shared, BLOCK, HEADS, DIM)

    layout = PagedLayout.from_tensor(kv, BLOCK, HEADS, DIM)
    expect_invalid(r"block table has 2 blocks; tokens \[20, 40\) need 3", layout.rows, [0, 1], 20, 20)
    expect_invalid(r"block ids must be in \[0, 12\), got 1..12", layout.rows, [1, 12], 0, 20)
    expect_invalid("repeats a block", layout.rows, [3, 3], 0, 20)
    expect_invalid("non-negative", layout.rows, [0], -1, 2)
    expect_invalid("must be 1-D", layout.rows, np.zeros((2, 2), dtype=np.int64), 0, 2)

    rows = layout.rows([0, 1], 0, 20)
    expect_invalid(r"out must be torch.bfloat16 \(1, 2, 20, 2, 32\)", gather, [kv], layout, rows,
                   torch.empty(1, 2, 19, HEADS, DIM, dtype=torch.bfloat16))
    expect_invalid("out must be torch.bfloat16", gather, [kv], layout, rows,
                   torch.empty(1, 2, 20, HEADS, DIM))
    expect_invalid("differs from the layout", gather, [kv, kv[:, :6]], layout, rows,
                   torch.empty(2, 2, 20, HEADS, DIM, dtype=torch.bfloat16))
    chunk = torch.zeros(1, 2, 20, HEADS, DIM, dtype=torch.bfloat16)
    expect_invalid("rows must be a CPU int64 tensor", scatter, chunk, [kv], layout, rows.to(torch.int32))
    too_far = rows + (768 - rows.max())
    expect_invalid(r"rows must be in \[0, 768\), got \d+..768", scatter, chunk, [kv], layout, too_far)


def test_backend_follows_the_device():
    assert array_backend(torch.zeros(1)).name == "numpy"
    assert array_backend(torch.zeros(1, device="meta")).name == "torch"
