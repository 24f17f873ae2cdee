"""Prefix reuse with plain transformers: one long prompt, prefilled once, then loaded from kvstore.

Needs a running agent (this script starts nothing itself):

    kvstore serve &                                  # or: kvstore serve --config kvstore.yaml
    python examples/hf_prefix_reuse.py               # same config lookup as `kvstore serve`
    python examples/hf_prefix_reuse.py --socket /run/kvstore/agent.sock --dtype float32

It uses SmolLM2-135M-Instruct from kvstore.models (prepared on first use, ~30-45 s) and prints the time
to the first token without kvstore, with kvstore before anything is stored, and with the prefix stored.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never reach for the hub

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvstore.config import load_config
from kvstore.connectors.hf import HFKVCache
from kvstore.errors import AgentUnavailable
from kvstore.models import smollm2_path

CITIES = ["Oslo", "Lima", "Accra", "Hanoi", "Quito", "Perth", "Riga", "Cusco", "Turin", "Dakar"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def handbook(rules: int) -> str:
    """A long, deterministic system prompt: the shared prefix every question reuses."""
    lines = [f"Rule {i}: parcels for {CITIES[i % len(CITIES)]} district {i} leave dock {i % 7} on "
             f"{DAYS[i % len(DAYS)]} unless marked fragile." for i in range(rules)]
    return "You answer questions about this shipping handbook.\n" + "\n".join(lines)


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", metavar="FILE", help="kvstore YAML config (default: $KVSTORE_CONFIG)")
    parser.add_argument("--socket", help="agent socket (default: from the config)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--rules", type=int, default=80, help="handbook length (80 rules: ~1,900 tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()

    cfg = load_config(args.config)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    try:
        kv = HFKVCache(model, tenant="examples/hf_prefix_reuse", socket_path=args.socket, cfg=cfg)
    except AgentUnavailable as exc:
        raise SystemExit(str(exc)) from None
    kv.client.clear()  # this example's namespace only: the first kvstore run starts cold

    messages = [{"role": "system", "content": handbook(args.rules)},
                {"role": "user", "content": "On which day do parcels for Riga district 46 leave?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    first = {"max_new_tokens": 1, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    print(f"prompt: {ids.shape[1]} tokens, {args.dtype}, chunks of {kv.chunk_tokens} tokens, "
          f"agent at {kv.client.conn.socket_path}")

    _, plain = timed(lambda: model.generate(ids, **first))
    print(f"time to first token, no kvstore:           {plain:6.3f} s")
    _, cold = timed(lambda: kv.generate(model, ids, **first))
    stored = kv.client.lookup(ids[0]).chunks
    print(f"time to first token, kvstore, cold:        {cold:6.3f} s  (then {stored} chunks stored)")
    _, warm = timed(lambda: kv.generate(model, ids, **first))
    print(f"time to first token, kvstore, prefix kept: {warm:6.3f} s  ({kv.last_reused_tokens} tokens loaded, "
          f"{ids.shape[1] - kv.last_reused_tokens} computed)")

    answer = {**first, "max_new_tokens": args.max_new_tokens}
    reused = kv.generate(model, ids, **answer)
    baseline = model.generate(ids, **answer)
    print("answer:", tokenizer.decode(reused[0, ids.shape[1]:], skip_special_tokens=True).strip())
    print("greedy output identical to plain generate:", torch.equal(reused, baseline))
    kv.close()


if __name__ == "__main__":
    main()
