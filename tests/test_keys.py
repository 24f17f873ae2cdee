"""Chunk keys: docs/hashing.md vectors, an independent reimplementation, determinism, properties, bad input."""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kvstore.errors import InvalidArgument
from kvstore.keys import Namespace, chunk_keys, fold_block_hashes

pytestmark = pytest.mark.unit

M = "SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parents[1]


# --- Reference implementation of docs/hashing.md: struct + xxhash only, nothing from kvstore.keys -------

def ref_hash(data: bytes) -> bytes:
    # canonical XXH128 form built from the integer, so the byte order claim is checked, not assumed
    return xxhash.xxh3_128(data, seed=0).intdigest().to_bytes(16, "big")


def ref_str16(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<H", len(raw)) + raw


def ref_ns_bytes(model, kv_dtype="bfloat16", layout="canonical", tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                 tenant="", chunk_tokens=256) -> bytes:
    return (b"kvstore/ns/v1\x00" + ref_str16(model) + ref_str16(kv_dtype) + ref_str16(layout)
            + ref_str16(tenant) + struct.pack("<IIIII", tp_rank, tp_size, pp_rank, pp_size, chunk_tokens))


def ref_chain(root: bytes, tag: bytes, pieces) -> list[bytes]:
    keys, parent = [], root
    for piece in pieces:
        parent = ref_hash(tag + parent + piece)
        keys.append(parent)
    return keys


def ref_chunk_keys(fields: dict, tokens: list[int]) -> list[bytes]:
    step = fields.get("chunk_tokens", 256)
    pieces = [struct.pack(f"<{step}I", *tokens[i:i + step]) for i in range(0, len(tokens) - step + 1, step)]
    return ref_chain(ref_hash(ref_ns_bytes(**fields)), b"\x01", pieces)


def ref_block_bytes(h) -> bytes:
    if isinstance(h, (bytes, bytearray, memoryview)):
        return bytes(h)
    assert -2**127 <= h < 2**127
    return struct.pack("<QQ", h & (2**64 - 1), (h >> 64) & (2**64 - 1))  # 128-bit two's complement, LE


def ref_fold(fields: dict, hashes: list, per_chunk: int) -> list[bytes]:
    pieces = []
    for c in range(len(hashes) // per_chunk):
        raw = [ref_block_bytes(h) for h in hashes[c * per_chunk:(c + 1) * per_chunk]]
        pieces.append(b"".join(struct.pack("<H", len(r)) + r for r in raw))
    return ref_chain(ref_hash(ref_ns_bytes(**fields)), b"\x02", pieces)


def hexes(keys) -> list[str]:
    return [bytes(k).hex() for k in keys]


# --- (a) known-answer vectors, the table in docs/hashing.md ----------------------------------------------

FULL_NS = dict(model="HuggingFaceTB/SmolLM2-135M-Instruct@main", kv_dtype="float16", layout="kivi-int4",
               tp_rank=1, tp_size=2, pp_rank=3, pp_size=4, tenant="café", chunk_tokens=16)
NS_BYTES_DEFAULT = (
    "6b7673746f72652f6e732f7631001500536d6f6c4c4d322d3133354d2d496e737472756374080062666c6f617431360900"
    "63616e6f6e6963616c00000000000001000000000000000100000000010000")
NS_BYTES_FULL = (
    "6b7673746f72652f6e732f763100280048756767696e674661636554422f536d6f6c4c4d322d3133354d2d496e73747275"
    "6374406d61696e0700666c6f6174313609006b6976692d696e74340500636166c3a9010000000200000003000000040000"
    "0010000000")

NAMESPACE_VECTORS = [
    (dict(model=M), "558fb7ce9f14a6139f3c7638f052eb36"),
    (FULL_NS, "46f35e7df8a4528ecc75a4fb16a08292"),
    (dict(model=M, chunk_tokens=16), "1c0e3b4ef48b037e47879df0d2b7f415"),
    (dict(model=M, chunk_tokens=4), "04f1023c8edb025c18222cf49dca5f23"),
]
TOKEN_VECTORS = [
    (dict(model=M), list(range(600)),
     ["4ba16db383236bc1b682ad248343f832", "0ec28f81ce361b6f2cacaacfa43f39d8"]),
    (dict(model=M, chunk_tokens=16), list(range(32)),
     ["f9230e1eeef911b8bbeac5ce3712e4f7", "eacaa1ad655c7397648683a4077ca4f9"]),
    (dict(model=M, chunk_tokens=4), [4294967295, 0, 1, 4294967295, 7, 7], ["5469cf2cec1925dcddeef65f515405c4"]),
]
FOLD_VECTORS = [
    ([bytes(range(32)), b"\xff" * 32, b"\x00" * 32, bytes(range(32, 0, -1)), b"tail"], 2,
     ["25425bfef222dad9d0657c11a1e983a8", "84e820632f8881267e39fa60e4134998"]),
    ([0, 1, -1, 2**127 - 1, 12345], 2,
     ["71bb15dc12bb501471dd37db3b347317", "a0876924321826a347d7084664bbe5f2"]),
    ([b"\x01\x02\x03", 42, b""], 1,
     ["af0e39a8f3ba126edecd635f5d7a952a", "751bf7e0dda46038d152be7d310bd33a", "92e1cea5c008f52e490b53b150981847"]),
]


def test_xxh3_128_canonical_digest_of_empty_input():
    # the XXH128 reference value for empty input, seed 0; pins the big-endian canonical byte order
    assert xxhash.xxh3_128_digest(b"").hex() == "99aa06d3014798d86001c324468d497f"
    assert ref_hash(b"") == xxhash.xxh3_128_digest(b"")


@pytest.mark.parametrize("fields, expected", NAMESPACE_VECTORS)
def test_namespace_digest_vectors(fields, expected):
    ns = Namespace(**fields)
    assert ns.digest.hex() == expected
    assert ref_hash(ref_ns_bytes(**fields)).hex() == expected


def test_namespace_encoding_vectors():
    assert Namespace(model=M).encode().hex() == NS_BYTES_DEFAULT
    assert Namespace(**FULL_NS).encode().hex() == NS_BYTES_FULL
    assert ref_ns_bytes(**FULL_NS).hex() == NS_BYTES_FULL


@pytest.mark.parametrize("fields, tokens, expected", TOKEN_VECTORS)
def test_chunk_key_vectors(fields, tokens, expected):
    assert hexes(chunk_keys(Namespace(**fields), tokens)) == expected
    assert hexes(ref_chunk_keys(fields, tokens)) == expected


def test_first_chunk_hash_input_vector():
    ns = Namespace(model=M, chunk_tokens=4)
    data = bytes.fromhex("0104f1023c8edb025c18222cf49dca5f23ffffffff0000000001000000ffffffff")
    assert data == b"\x01" + ns.digest + struct.pack("<4I", 2**32 - 1, 0, 1, 2**32 - 1)
    assert chunk_keys(ns, [2**32 - 1, 0, 1, 2**32 - 1]) == [xxhash.xxh3_128_digest(data)]


@pytest.mark.parametrize("hashes, per_chunk, expected", FOLD_VECTORS)
def test_fold_block_hash_vectors(hashes, per_chunk, expected):
    fields = dict(model=M, chunk_tokens=16)
    assert hexes(fold_block_hashes(Namespace(**fields), hashes, per_chunk)) == expected
    assert hexes(ref_fold(fields, hashes, per_chunk)) == expected


def test_docs_table_lists_every_vector():
    doc = (REPO / "docs" / "hashing.md").read_text()
    expected = [h for _, h in NAMESPACE_VECTORS] + [NS_BYTES_DEFAULT, NS_BYTES_FULL]
    expected += [h for *_, hs in TOKEN_VECTORS + FOLD_VECTORS for h in hs]
    missing = [h for h in expected if h not in doc]
    assert not missing


# --- (b) the code agrees with the independent reimplementation on random inputs --------------------------

ALPHABET = list("abcXYZ019-_/@.") + ["é", "ß", "中", "🙂", " "]


def random_text(rng, low: int, high: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(int(rng.integers(low, high))))


def random_namespace_fields(rng) -> dict:
    tp_size, pp_size = int(rng.integers(1, 9)), int(rng.integers(1, 5))
    return dict(model=random_text(rng, 1, 40), kv_dtype=random_text(rng, 0, 10), layout=random_text(rng, 0, 10),
                tp_rank=int(rng.integers(0, tp_size)), tp_size=tp_size, pp_rank=int(rng.integers(0, pp_size)),
                pp_size=pp_size, tenant=random_text(rng, 0, 8), chunk_tokens=int(rng.integers(1, 65)))


def test_matches_reference_on_random_namespaces_and_prompts():
    rng = np.random.default_rng(20240601)
    total_keys = 0
    for case in range(300):
        fields = random_namespace_fields(rng)
        ns = Namespace(**fields)
        assert ns.digest == ref_hash(ref_ns_bytes(**fields))
        high = 2**32 if case % 2 else 50_000  # full id range, and realistic vocabulary sizes
        tokens = rng.integers(0, high, size=int(rng.integers(0, 8 * fields["chunk_tokens"] + 3)), dtype=np.uint64)
        as_list = [int(t) for t in tokens]
        expected = ref_chunk_keys(fields, as_list)
        assert len(expected) == len(as_list) // fields["chunk_tokens"]
        assert chunk_keys(ns, tokens.astype(np.uint32)) == expected
        assert chunk_keys(ns, as_list) == expected
        total_keys += len(expected)
    assert total_keys > 1000


def random_block_hash(rng):
    kind = rng.integers(0, 3)
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 40)))
    if kind == 1:
        return int.from_bytes(rng.bytes(16), "little") - 2**127  # anywhere in [-2^127, 2^127)
    return int(rng.integers(-2**63, 2**63 - 1))  # Python hash()-sized ints


def test_fold_matches_reference_on_random_block_hashes():
    rng = np.random.default_rng(7)
    for _ in range(200):
        fields = random_namespace_fields(rng)
        per_chunk = int(rng.integers(1, 6))
        hashes = [random_block_hash(rng) for _ in range(int(rng.integers(0, 5 * per_chunk + 3)))]
        expected = ref_fold(fields, hashes, per_chunk)
        assert len(expected) == len(hashes) // per_chunk
        assert fold_block_hashes(Namespace(**fields), hashes, per_chunk) == expected


# --- (c) determinism across processes --------------------------------------------------------------------

CHILD = """
from kvstore.keys import Namespace, chunk_keys, fold_block_hashes
ns = Namespace(model="SmolLM2-135M-Instruct", tenant="t", chunk_tokens=16)
print(ns.digest.hex())
print(" ".join(k.hex() for k in chunk_keys(ns, list(range(1000, 1064)))))
print(" ".join(k.hex() for k in fold_block_hashes(ns, [b"abc", -5, 2**100, b""], 2)))
"""


def test_keys_are_identical_across_processes_with_different_hash_seeds():
    ns = Namespace(model=M, tenant="t", chunk_tokens=16)
    here = "\n".join([
        ns.digest.hex(),
        " ".join(hexes(chunk_keys(ns, list(range(1000, 1064))))),
        " ".join(hexes(fold_block_hashes(ns, [b"abc", -5, 2**100, b""], 2))),
    ])
    outputs = []
    for seed in ("1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        result = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=60, check=True)
        outputs.append(result.stdout.strip())
    assert outputs == [here, here]
    assert len(here.split("\n")[1].split()) == 4


# --- (d) properties -------------------------------------------------------------------------------------

BASE = dict(model=M, kv_dtype="bfloat16", layout="canonical", tp_rank=0, tp_size=2, pp_rank=0, pp_size=2,
            tenant="", chunk_tokens=16)
CHANGED = dict(model=M + "@rev2", kv_dtype="float16", layout="kivi-int8", tp_rank=1, tp_size=4, pp_rank=1,
               pp_size=4, tenant="acme", chunk_tokens=8)
PROMPT = list(range(5000, 5000 + 16 * 6))


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_changing_any_namespace_field_changes_digest_and_every_key(field):
    base, other = Namespace(**BASE), Namespace(**{**BASE, field: CHANGED[field]})
    assert base.digest != other.digest
    base_keys, other_keys = chunk_keys(base, PROMPT), chunk_keys(other, PROMPT)
    assert len(base_keys) == 6 and len(other_keys) >= 6
    assert not set(base_keys) & set(other_keys)
    assert not set(fold_block_hashes(base, [b"x"] * 4, 2)) & set(fold_block_hashes(other, [b"x"] * 4, 2))


def test_length_prefixes_keep_field_boundaries():
    digests = {
        Namespace(model="ab", kv_dtype="c").digest,
        Namespace(model="a", kv_dtype="bc").digest,
        Namespace(model="a", kv_dtype="b", layout="c").digest,
        Namespace(model="a", kv_dtype="", layout="bc").digest,
        Namespace(model="a", layout="", tenant="canonical").digest,
    }
    assert len(digests) == 5


def test_namespace_equality_follows_fields():
    assert Namespace(**BASE) == Namespace(**dict(BASE))
    assert Namespace(**BASE).digest == Namespace(**dict(BASE)).digest
    assert dataclasses.replace(Namespace(**BASE), tenant="x").digest != Namespace(**BASE).digest


def test_keys_are_16_bytes_and_distinct():
    keys = chunk_keys(Namespace(**BASE), PROMPT)
    assert all(isinstance(k, bytes) and len(k) == 16 for k in keys)
    assert len(set(keys)) == len(keys)


def test_prefix_property():
    ns = Namespace(**BASE)
    full = chunk_keys(ns, PROMPT)
    for k in range(len(full) + 1):
        assert chunk_keys(ns, PROMPT[:16 * k]) == full[:k]
    assert chunk_keys(ns, PROMPT + list(range(16 * 3)))[:6] == full


@pytest.mark.parametrize("chunk", range(6))
def test_changed_token_changes_its_chunk_and_every_later_key(chunk):
    ns = Namespace(**BASE)
    base = chunk_keys(ns, PROMPT)
    for offset in (0, 7, 15):
        edited = list(PROMPT)
        edited[chunk * 16 + offset] += 1
        keys = chunk_keys(ns, edited)
        assert keys[:chunk] == base[:chunk]
        assert all(a != b for a, b in zip(keys[chunk:], base[chunk:]))


def test_trailing_partial_chunk_gets_no_key():
    ns = Namespace(**BASE)
    full = chunk_keys(ns, PROMPT)
    assert chunk_keys(ns, PROMPT[:16 * 3 + 15]) == full[:3]
    assert chunk_keys(ns, PROMPT + [1, 2, 3]) == full
    assert chunk_keys(ns, PROMPT[:15]) == []
    assert chunk_keys(ns, []) == []


def test_token_container_and_dtype_do_not_matter():
    ns = Namespace(**BASE)
    tokens = [0, 1, 2**31 - 1, 65535, 151_000] * 10 + [3] * 14  # 64 ids, all fit int32
    expected = ref_chunk_keys(BASE, tokens)
    assert len(expected) == 4
    wide = np.array(tokens + [0] * 64, dtype=np.int64)
    forms = [
        tokens, tuple(tokens), range(0, 0),
        np.array(tokens, dtype=np.int32), np.array(tokens, dtype=np.int64), np.array(tokens, dtype=np.uint32),
        np.array(tokens, dtype=np.uint64), np.array(tokens, dtype=">u4"), np.array(tokens, dtype=">i8"),
        wide.reshape(2, 64)[0], np.repeat(np.array(tokens, dtype=np.uint32), 2)[::2],  # strided view
    ]
    for form in forms:
        got = chunk_keys(ns, form)
        assert got == ([] if isinstance(form, range) else expected), type(form)


def test_max_token_id_is_accepted():
    ns = Namespace(model=M, chunk_tokens=2)
    top = [2**32 - 1, 2**32 - 1]
    assert chunk_keys(ns, top) == chunk_keys(ns, np.array(top, dtype=np.uint32)) == ref_chunk_keys(
        dict(model=M, chunk_tokens=2), top)
    assert chunk_keys(ns, top) != chunk_keys(ns, [0, 0])


# --- (e) bad input -------------------------------------------------------------------------------------

NS16 = Namespace(model=M, chunk_tokens=16)


@pytest.mark.parametrize("tokens", [
    pytest.param([1, -1] + [0] * 14, id="negative"),
    pytest.param([2**32] + [0] * 15, id="2^32"),
    pytest.param(np.array([2**32] * 16, dtype=np.int64), id="2^32-int64"),
    pytest.param([0] * 16 + [-1], id="bad-id-in-trailing-partial-chunk"),
    pytest.param([1.0] * 16, id="float-list"),
    pytest.param(np.ones(16, dtype=np.float32), id="float32-array"),
    pytest.param(np.zeros((2, 16), dtype=np.int64), id="2-D"),
    pytest.param(np.int64(5), id="0-D"),
    pytest.param([True] * 16, id="bool"),
    pytest.param(["1"] * 16, id="str"),
])
def test_bad_tokens_raise_invalid_argument(tokens):
    with pytest.raises(InvalidArgument):
        chunk_keys(NS16, tokens)


@pytest.mark.parametrize("fields", [
    pytest.param(dict(model=""), id="empty-model"),
    pytest.param(dict(model=M, tp_rank=1, tp_size=1), id="tp_rank>=tp_size"),
    pytest.param(dict(model=M, pp_rank=2, pp_size=2), id="pp_rank>=pp_size"),
    pytest.param(dict(model=M, chunk_tokens=0), id="zero-chunk_tokens"),
    pytest.param(dict(model=M, tp_size=0, tp_rank=0), id="zero-tp_size"),
    pytest.param(dict(model=M, pp_size=0, pp_rank=0), id="zero-pp_size"),
    pytest.param(dict(model=M, tp_rank=-1), id="negative-rank"),
    pytest.param(dict(model=M, chunk_tokens=2**32), id="chunk_tokens-2^32"),
    pytest.param(dict(model=M, chunk_tokens=16.0), id="float-chunk_tokens"),
])
def test_bad_namespace_raises_invalid_argument(fields):
    with pytest.raises(InvalidArgument):
        Namespace(**fields)


def test_namespace_field_length_limit():
    assert len(Namespace(model="x" * 65535).digest) == 16
    assert len(Namespace(model=M, tenant="é" * 32767).digest) == 16  # 65534 UTF-8 bytes
    with pytest.raises(InvalidArgument):
        Namespace(model="x" * 65536).digest
    with pytest.raises(InvalidArgument):
        Namespace(model=M, tenant="é" * 32768).digest  # 32768 characters, 65536 bytes


@pytest.mark.parametrize("per_chunk", [0, -1])
def test_bad_blocks_per_chunk_raises_invalid_argument(per_chunk):
    with pytest.raises(InvalidArgument):
        fold_block_hashes(NS16, [b"a", b"b"], per_chunk)


@pytest.mark.parametrize("block_hash", [
    pytest.param("abc", id="str"),
    pytest.param(None, id="None"),
    pytest.param(1.5, id="float"),
    pytest.param((123, (1, 2, 3), None), id="tuple-like-old-vllm-BlockHashType"),
    pytest.param(np.int64(3), id="numpy-scalar"),
])
def test_unsupported_block_hash_type_raises_invalid_argument(block_hash):
    with pytest.raises(InvalidArgument):
        fold_block_hashes(NS16, [b"ok", block_hash], 2)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: fold_block_hashes(NS16, [2**127], 1), id="int-hash-above-128-bit"),
    pytest.param(lambda: fold_block_hashes(NS16, [-2**127 - 1], 1), id="int-hash-below-128-bit"),
    pytest.param(lambda: fold_block_hashes(NS16, [b"x" * 65536], 1), id="bytes-hash-over-65535"),
    pytest.param(lambda: Namespace(model=M, kv_dtype=None), id="non-str-field"),
    pytest.param(lambda: Namespace(model="\ud800"), id="lone-surrogate"),
    pytest.param(lambda: Namespace(model="m" * 65536), id="field-over-65535-bytes"),
])
def test_out_of_domain_input_raises_invalid_argument(make):
    with pytest.raises(InvalidArgument):
        make()


# --- (f) fold_block_hashes ------------------------------------------------------------------------------

def test_fold_groups_blocks_per_chunk():
    ns = Namespace(model=M, chunk_tokens=16)
    hashes = [bytes([i]) * 8 for i in range(12)]
    for per_chunk in (1, 2, 3, 4, 5):
        keys = fold_block_hashes(ns, hashes, per_chunk)
        assert len(keys) == 12 // per_chunk
        assert keys == ref_fold(dict(model=M, chunk_tokens=16), hashes, per_chunk)
        assert fold_block_hashes(ns, hashes[:per_chunk * len(keys)], per_chunk) == keys  # tail dropped
    # a chunk of two blocks is not the same chunk as two chunks of one block, nor one block of both
    two = fold_block_hashes(ns, hashes[:2], 2)[0]
    assert two not in fold_block_hashes(ns, hashes[:2], 1)
    assert two != fold_block_hashes(ns, [hashes[0] + hashes[1]], 1)[0]
    assert fold_block_hashes(ns, hashes[:1], 2) == []


def test_fold_prefix_and_chain_properties():
    ns = Namespace(model=M, chunk_tokens=16)
    hashes = [i * 7919 - 10**6 for i in range(12)]
    full = fold_block_hashes(ns, hashes, 3)
    assert fold_block_hashes(ns, hashes[:6], 3) == full[:2]
    edited = list(hashes)
    edited[4] += 1  # chunk 1
    keys = fold_block_hashes(ns, edited, 3)
    assert keys[0] == full[0] and all(a != b for a, b in zip(keys[1:], full[1:]))


def test_fold_int_hash_is_its_16_byte_little_endian_twos_complement():
    ns = Namespace(model=M, chunk_tokens=16)
    for value in (0, 1, -1, 2**63, -2**63 - 1, 2**127 - 1, -2**127):
        as_bytes = value.to_bytes(16, "little", signed=True)
        assert fold_block_hashes(ns, [value], 1) == fold_block_hashes(ns, [as_bytes], 1)
        assert fold_block_hashes(ns, [value], 1) == fold_block_hashes(ns, [bytearray(as_bytes)], 1)
        assert fold_block_hashes(ns, [value], 1) == fold_block_hashes(ns, [memoryview(as_bytes)], 1)
    assert fold_block_hashes(ns, [-1], 1) != fold_block_hashes(ns, [2**64 - 1], 1)  # not 64-bit wrapped


def test_tags_separate_block_folding_from_token_chains():
    # choose one 62-byte block hash whose length-prefixed piece is byte-identical to a 16-token chunk:
    # then the two hash inputs differ only in the tag byte, and the keys must still differ
    ns = Namespace(model=M, chunk_tokens=16)
    tokens = [62 | (0xBEEF << 16)] + list(range(100, 115))
    token_bytes = struct.pack("<16I", *tokens)
    block = token_bytes[2:]
    assert struct.pack("<H", len(block)) + block == token_bytes
    token_key, = chunk_keys(ns, tokens)
    block_key, = fold_block_hashes(ns, [block], 1)
    assert token_key != block_key
    assert token_key == xxhash.xxh3_128_digest(b"\x01" + ns.digest + token_bytes)
    assert block_key == xxhash.xxh3_128_digest(b"\x02" + ns.digest + token_bytes)
