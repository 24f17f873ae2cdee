"""What an engine's configuration comes to in the connector core: the namespace and chunk geometry."""

from __future__ import annotations

import pytest

from kvstore.connectors.core import StoreSettings
from kvstore.errors import InvalidArgument, UnknownCodec

pytestmark = pytest.mark.unit

ENGINE = dict(model_id="m", kv_dtype="bf16", layout="canonical", layers=30, kv_heads=3, head_dim=64, mla=False,
              block_size=16)


def test_a_chunk_is_whole_blocks_and_defaults_to_at_least_128_tokens():
    settings = StoreSettings.for_engine(**ENGINE)
    assert settings.namespace.chunk_tokens == settings.geometry.tokens == 128 and settings.blocks_per_chunk == 8
    assert settings.geometry.shape == (30, 2, 128, 3, 64) and settings.geometry.dtype == "bfloat16"
    assert StoreSettings.for_engine(**{**ENGINE, "block_size": 48}).namespace.chunk_tokens == 144
    with pytest.raises(InvalidArgument, match="multiple of the engine's block_size"):
        StoreSettings.for_engine(**ENGINE, chunk_tokens=100)


def test_mla_is_one_latent_plane_and_ranks_and_tenants_are_other_namespaces():
    mla = StoreSettings.for_engine(**{**ENGINE, "mla": True, "head_dim": 576})
    assert mla.geometry.shape == (30, 1, 128, 1, 576)
    base = StoreSettings.for_engine(**ENGINE).namespace.digest
    assert StoreSettings.for_engine(**ENGINE, tp_rank=1, tp_size=2).namespace.digest != base
    assert StoreSettings.for_engine(**ENGINE, tenant="a").namespace.digest != base


def test_bad_options_are_refused_at_startup():
    with pytest.raises(UnknownCodec):
        StoreSettings.for_engine(**ENGINE, codec="zip")
    with pytest.raises(InvalidArgument, match="key_source"):
        StoreSettings.for_engine(**ENGINE, key_source="ids")
    with pytest.raises(InvalidArgument):
        StoreSettings.for_engine(**{**ENGINE, "kv_dtype": "int3"})
