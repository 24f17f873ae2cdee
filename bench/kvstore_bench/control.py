"""`kvstore bench control`: Lookup latency over gRPC on loopback, for a 128-chunk prefix.

A `kvstore serve` subprocess runs the agent and its controller (disk tier off, controller on a free
loopback port, a token set in its config); this process stores a 128-chunk prompt with a LocalClient and
then times `requests` Lookup RPCs, one at a time, through a real gRPC channel with the bearer token:
  lookup_*      the prompt's token ids (128 x 256 = 32768 ids, packed as token_ids_le32): the controller
                hashes them, as it must for a router that knows only tokens;
  lookup_hashes_*  the 128 chunk hashes (chunk_hashes_packed), the router that hashes itself;
  lookup_repeated_tokens_p50_us  token ids as the repeated uint32 field (n/5 requests): what the packed
                field saves (building and parsing 32k repeated ints costs milliseconds in Python).
Baselines in the same run: `agent_rpc_*`, the same lookup asked of the agent directly over its Unix
socket; `grpc_floor_*`, a unary RPC carrying the same request bytes to a server in another Python
process that does nothing with them (grpcio's own cost of the round trip, the part no controller code
can remove); `lookup_over_floor_p50_us` is what the controller adds to that floor.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import torch

from kvstore.client import AgentConnection, LocalClient
from kvstore.control.client import ControlClient
from kvstore.keys import Namespace
from kvstore.layout import Geometry
from kvstore.proto import kvstore_pb2 as pb

from kvstore.testing.agents import agent_process

from . import bench_dir, log, percentiles_us, timed_calls

PREFIX_CHUNKS = 128
CHUNK_TOKENS = 256
GEOMETRY = Geometry(layers=1, heads=1, head_dim=8, tokens=CHUNK_TOKENS, planes=2, dtype="float16")
TOKEN = "bench-control-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _p50_p99(fn, n: int) -> tuple[float, float]:
    """p50, p99 (us) of n calls of fn(), after up to 100 warm-up calls (connections, caches)."""
    return percentiles_us(timed_calls(lambda _: fn(), n, warmup=100))


# A gRPC server that answers every call of /floor.Floor/Call with empty bytes: the transport floor.
_FLOOR_SERVER = """
import sys
from concurrent import futures
import grpc
handler = grpc.method_handlers_generic_handler(
    "floor.Floor", {"Call": grpc.unary_unary_rpc_method_handler(lambda request, context: b"")})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(sys.argv[1])
server.start()
sys.stdin.read()  # until the benchmark closes our stdin
"""


def _floor(request: bytes, n: int) -> tuple[float, float]:
    """p50, p99 (us) of a no-op unary RPC carrying `request` to another Python process."""
    import grpc

    address = f"127.0.0.1:{_free_port()}"
    server = subprocess.Popen([sys.executable, "-c", _FLOOR_SERVER, address], stdin=subprocess.PIPE)
    try:
        with grpc.insecure_channel(address) as channel:
            call = channel.unary_unary("/floor.Floor/Call")
            call(request, timeout=30, wait_for_ready=True)
            return _p50_p99(lambda: call(request, timeout=10), n)
    finally:
        server.stdin.close()
        server.wait(timeout=30)


def run(args) -> dict:
    workdir = bench_dir(args)
    n = max(1, args.requests)
    address = f"127.0.0.1:{_free_port()}"
    settings = {"cpu.arena_bytes": "64MiB", "cpu.slab_bytes": "1MiB", "disk.enabled": False, "control.enabled": True,
                "control.address": address, "control.metrics_address": "", "control.token": TOKEN,
                "agent.log_level": "warning", "agent.busy_poll_us": 0}
    try:
        with agent_process(settings, workdir) as (socket_path, _):
            namespace = Namespace(model="bench-control", chunk_tokens=CHUNK_TOKENS)
            client = LocalClient(namespace, GEOMETRY, socket_path=socket_path)
            tokens = np.arange(PREFIX_CHUNKS * CHUNK_TOKENS, dtype=np.int64) % 50_000
            keys = client.keys(tokens)
            put = client.put(keys, torch.zeros((PREFIX_CHUNKS, *GEOMETRY.shape), dtype=GEOMETRY.torch_dtype))
            log(f"stored {put.stored} chunks; timing {n} Lookup RPCs on {address}")
            control = ControlClient(address, TOKEN)
            deadline = time.monotonic() + 30
            while True:  # the controller starts just after the agent's socket appears
                try:
                    control.Health(pb.HealthRequest(), timeout=1.0)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            by_tokens = pb.LookupRequest(query=pb.ChunkQuery(namespace=namespace.digest,
                                                             token_ids_le32=tokens.astype("<u4").tobytes()))
            by_hashes = pb.LookupRequest(query=pb.ChunkQuery(namespace=namespace.digest,
                                                             chunk_hashes_packed=b"".join(keys)))
            by_repeated = pb.LookupRequest(query=pb.ChunkQuery(namespace=namespace.digest, token_ids=tokens.tolist()))
            reply = control.Lookup(by_tokens)
            if reply.matched_chunks != PREFIX_CHUNKS:
                raise RuntimeError(f"Lookup matched {reply.matched_chunks} of {PREFIX_CHUNKS} chunks")
            tokens_p50, tokens_p99 = _p50_p99(lambda: control.Lookup(by_tokens), n)
            hashes_p50, hashes_p99 = _p50_p99(lambda: control.Lookup(by_hashes), n)
            repeated_p50, _ = _p50_p99(lambda: control.Lookup(by_repeated), max(1, n // 5))
            conn = AgentConnection(socket_path)
            blob = b"".join(keys)
            agent_p50, agent_p99 = _p50_p99(lambda: conn.call("lookup", {"ns": namespace.digest, "keys": blob}), n)
            conn.close()
            control.close()
            client.close()
            floor_p50, floor_p99 = _floor(by_tokens.SerializeToString(), n)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"prefix_chunks": PREFIX_CHUNKS, "chunk_tokens": CHUNK_TOKENS, "requests": n,
            "lookup_p50_us": tokens_p50, "lookup_p99_us": tokens_p99,
            "lookup_hashes_p50_us": hashes_p50, "lookup_hashes_p99_us": hashes_p99,
            "lookup_repeated_tokens_p50_us": repeated_p50,
            "agent_rpc_p50_us": agent_p50, "agent_rpc_p99_us": agent_p99,
            "grpc_floor_p50_us": floor_p50, "grpc_floor_p99_us": floor_p99,
            "lookup_over_floor_p50_us": round(tokens_p50 - floor_p50, 1),
            "target_lookup_p50_us": 1000, "meets_target": tokens_p50 <= 1000}
