"""transformers integration: keep a prompt prefix's KV cache in kvstore so `generate` skips its prefill.

    kv = HFKVCache(model, chunk_tokens=256)        # connects to the running `kvstore serve`
    out = kv.generate(model, input_ids, max_new_tokens=64, do_sample=False)

or by hand:

    cache, reused = kv.load(tokens)                  # DynamicCache of the longest stored prefix, or None
    if cache is None:
        cache = DynamicCache(config=model.config)
    out = model.generate(input_ids, past_key_values=cache, ...)   # the full input_ids: it skips `reused`
    kv.store(tokens, cache)                          # the prompt's full chunks, for next time

A `DynamicCache` layer holds keys and values as [batch, kv_heads, seq, head_dim]; a stored chunk is the
canonical [layers, 2 (K, V), tokens, kv_heads, head_dim] of `chunk_tokens` consecutive tokens, in the
model's dtype. The namespace binds chunks to the weights (a digest of parameters and config), the dtype
and layout "hf" (keys as transformers caches them: after RoPE), so another model never reads them.
Batch size 1 and full-attention decoders only (no sliding-window or MLA caches). With the default raw
codec a loaded prefix is bit-identical to the stored one; int8/int4 trade that for space.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import torch
import xxhash
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from ..client import LocalClient
from ..config import KVStoreConfig, load_config
from ..errors import InvalidArgument, KVStoreError
from ..keys import Namespace, as_token_array
from ..models import kv_geometry

LAYOUT = "hf"
# Config keys that change neither weights nor KV values (paths, versions, loading and output switches).
_VOLATILE_CONFIG = ("transformers_version", "dtype", "torch_dtype", "use_cache", "return_dict",
                    "output_hidden_states", "output_attentions")


def model_fingerprint(model: PreTrainedModel) -> str:
    """`<model_type>@<xxh3-128>` over the parameters (names and bytes) and the config.

    Equal for the same weights wherever they are loaded from; hashing 135M bf16 parameters takes ~50 ms.
    Config keys that cannot change the KV are left out; any other difference makes a miss, never a wrong hit.
    """
    digest = xxhash.xxh3_128()
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in _VOLATILE_CONFIG}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return f"{model.config.model_type}@{digest.hexdigest()}"


class HFKVCache:
    """Stores and loads the KV cache of one transformers model's prompts in the node agent.

    `model_id` replaces the weight fingerprint (e.g. a name plus revision the caller vouches for).
    """

    def __init__(self, model: PreTrainedModel, *, chunk_tokens: int | None = None, tenant: str = "",
                 model_id: str | None = None, codec: str = "raw", socket_path: str | None = None,
                 timeout: float = 10.0, cfg: KVStoreConfig | None = None):
        config = model.config.get_text_config(decoder=True)
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise InvalidArgument(f"HFKVCache supports full-attention decoders only; this one has {layer_types}")
        if config.is_encoder_decoder:
            raise InvalidArgument("HFKVCache supports decoder-only models")
        if chunk_tokens is None:
            cfg = cfg or load_config()
            chunk_tokens = cfg.chunk_tokens
        self.config = model.config
        self.geometry = kv_geometry(config.to_dict(), chunk_tokens, dtype=model.dtype)
        self.namespace = Namespace(model=model_id or model_fingerprint(model), kv_dtype=self.geometry.dtype,
                                   layout=LAYOUT, tenant=tenant, chunk_tokens=chunk_tokens)
        self.client = LocalClient(self.namespace, self.geometry, codec, socket_path=socket_path, timeout=timeout,
                                  cfg=cfg)
        self.last_reused_tokens = 0  # prompt tokens the last `generate` loaded instead of computing

    @property
    def chunk_tokens(self) -> int:
        return self.geometry.tokens

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "HFKVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- store -----------------------------------------------------------------------------------
    def store(self, tokens, cache: Cache) -> int:
        """Store the KV of every full chunk of `tokens` that `cache` holds (cache position i = tokens[i]).
        Chunks already stored are skipped. Returns the number of chunks newly stored."""
        return self._store(_token_array(tokens), self._cache_layers(cache, batch_one=True))

    def _store(self, tokens: np.ndarray, layers: list) -> int:
        """Store the full chunks of `tokens` from row 0 of the cache `layers`."""
        held = min(len(tokens), layers[0].keys.shape[-2])
        T = self.chunk_tokens
        keys = self.client.keys(tokens[: held // T * T])
        first = self.client.lookup(keys).chunks  # the stored prefix: convert only what follows it
        if first == len(keys):
            return 0
        start, end = first * T, len(keys) * T
        # One stack over layers and K/V: [L, 2, H, S, D] for the new span only, then a view as chunks.
        kv = torch.stack([torch.stack((layer.keys[0, :, start:end], layer.values[0, :, start:end]))
                          for layer in layers]).to("cpu")
        L, _, H, _, D = kv.shape
        chunks = kv.view(L, 2, H, len(keys) - first, T, D).permute(3, 0, 1, 4, 2, 5)  # [n, L, 2, T, H, D]
        return self.client.put(keys[first:], chunks).stored  # put gathers the strided view into place

    def _cache_layers(self, cache: Cache, batch_one: bool) -> list:
        layers = getattr(cache, "layers", None)
        if not layers or len(layers) != self.geometry.layers:
            raise InvalidArgument(f"expected a transformers Cache with {self.geometry.layers} layers")
        g = self.geometry
        for layer in layers:
            if not isinstance(layer, DynamicLayer) or getattr(layer, "is_sliding", False):
                raise InvalidArgument(f"cannot store a {type(layer).__name__}: full-attention DynamicLayer only")
            if layer.keys is None or layer.keys.numel() == 0:
                raise InvalidArgument("the cache holds no KV yet")
            if batch_one and layer.keys.shape[0] != 1:
                raise InvalidArgument(f"batch size {layer.keys.shape[0]}: HFKVCache handles batch size 1 only")
            for t in (layer.keys, layer.values):
                if (t.shape[1], t.shape[3]) != (g.heads, g.head_dim) or t.dtype != g.torch_dtype:
                    raise InvalidArgument(f"cache layer {tuple(t.shape)} {t.dtype} does not match "
                                          f"[1, {g.heads}, seq, {g.head_dim}] {g.torch_dtype}")
        return layers

    # ---- load ------------------------------------------------------------------------------------
    def load(self, tokens, device: torch.device | str = "cpu") -> tuple[DynamicCache | None, int]:
        """A DynamicCache holding the longest stored prefix of `tokens` in whole chunks, and its length.

        The last prompt token is always left to compute (the model needs its logits), so at most
        len(tokens) - 1 tokens, rounded down to whole chunks, are loaded. (None, 0) when nothing is stored."""
        tokens = _token_array(tokens)
        T = self.chunk_tokens
        keys = self.client.keys(tokens[: max(len(tokens) - 1, 0) // T * T])
        hit = self.client.lookup(keys).chunks if keys else 0
        if hit == 0:
            return None, 0
        chunks = self.client.get(keys[:hit])  # [n, L, 2, T, H, D]; n < hit if chunks went meanwhile
        n = chunks.shape[0]
        if n == 0:
            return None, 0
        L, _, _, H, D = self.geometry.shape
        # [n, L, 2, T, H, D] -> [L, 2, H, n*T, D] in one copy (DynamicCache copies each layer once more)
        kv = chunks.permute(1, 2, 4, 0, 3, 5).reshape(L, 2, H, n * T, D).to(device)
        cache = DynamicCache([(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0)) for i in range(L)], config=self.config)
        return cache, n * T

    # ---- generate --------------------------------------------------------------------------------
    def generate(self, model: PreTrainedModel, input_ids: torch.Tensor, **gen_kwargs):
        """`model.generate(input_ids, **gen_kwargs)` with the stored prefix loaded instead of computed, and
        the prompt's full chunks stored afterwards. One unpadded prompt (beams and several returned
        sequences are fine). If the agent cannot be reached (or a chunk turns out unreadable) it warns
        and generates without reuse; misuse and misconfiguration (InvalidArgument, e.g. chunks larger
        than the agent's slabs) raise."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise InvalidArgument(f"input_ids of shape {tuple(input_ids.shape)}: HFKVCache handles batch size 1")
        if "past_key_values" in gen_kwargs:
            raise InvalidArgument("HFKVCache.generate supplies past_key_values itself")
        mask = gen_kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise InvalidArgument("padded prompts are not supported (the attention mask must be all ones)")
        gen_kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
        tokens = _token_array(input_ids)
        cache, self.last_reused_tokens = self._degrade(lambda: self.load(tokens, input_ids.device), (None, 0))
        if cache is None:
            cache = DynamicCache(config=self.config)
        else:  # generate grows the prompt to one row per beam or returned sequence, but not a given cache
            config = gen_kwargs.get("generation_config") or model.generation_config
            rows = max(gen_kwargs.get("num_beams", config.num_beams) or 1,
                       gen_kwargs.get("num_return_sequences", config.num_return_sequences) or 1)
            cache.batch_repeat_interleave(rows)
        output = model.generate(input_ids, past_key_values=cache, **gen_kwargs)
        # num_beams / num_return_sequences copy the prompt's KV into every row of the cache: row 0 has it
        self._degrade(lambda: self._store(tokens, self._cache_layers(cache, batch_one=False)), 0)
        return output

    def _degrade(self, step, fallback):
        """Run a load or store step of `generate`: an outage of the store costs reuse, never the output."""
        try:
            return step()
        except InvalidArgument:
            raise  # a bug or a misuse, not an outage
        except KVStoreError as exc:
            warnings.warn(f"kvstore: generating without KV reuse ({type(exc).__name__}: {exc})", RuntimeWarning,
                          stacklevel=3)
            return fallback


def _token_array(tokens) -> np.ndarray:
    """Token ids as a 1-D array (a [1, seq] tensor is taken as its one row)."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu()
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        tokens = tokens.numpy()
    return as_token_array(tokens)  # rejects anything but one sequence of valid token ids
