"""`kvstore serve --cluster`: an embedded single-node Ray on loopback, the agent as its actor."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import psutil
import torch

from kvstore.client import LocalClient
from kvstore.control.client import ControlClient
from kvstore.proto import kvstore_pb2 as pb

from ..support.cluster import is_loopback as _is_loopback
from ..support.agents import agent_settings, clean_env, write_config
from ..support.data import SMALL, small_chunks, SMALL_NS, tokens
import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cluster_starts_embedded_ray_and_serves_the_local_protocol(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    settings = agent_settings(tmp_path, **{"cluster.namespace": "kvstore-serve-test",
                                           "cluster.object_store_bytes": "96MiB", "control.enabled": True,
                                           "control.address": address, "control.metrics_address": "",
                                           "control.token": "serve-test-token"})
    config = write_config(tmp_path, settings)
    socket_path = settings["agent.socket_path"]
    env = clean_env(RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "serve", "--cluster", "--config", str(config)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "agent.sock").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no socket"
            time.sleep(0.1)
        client = LocalClient(SMALL_NS, SMALL, socket_path=socket_path)
        assert client.conn.cluster  # the agent is a cluster member
        keys = client.keys(tokens(3))
        data = small_chunks(3)
        client.put(keys, data)
        assert client.flush(timeout=30)
        result = client.cluster_lookup(keys)
        assert result.chunks == 3 and [n for _, n, _ in result.nodes] == [3]  # one node: this one
        assert torch.equal(client.get(keys), data)
        # The controller runs in front of the cluster agent and answers with the cluster's nodes.
        with ControlClient(address, "serve-test-token", timeout=10) as control:
            query = pb.ChunkQuery(namespace=SMALL_NS.digest, chunk_hashes_packed=b"".join(keys))
            reply = control.Lookup(pb.LookupRequest(query=query), wait_for_ready=True)  # it starts just after
            assert reply.matched_chunks == 3
            assert [(n.node, n.matched_chunks) for n in reply.nodes] == [(result.node, 3)]  # the Ray node id
            assert list(reply.nodes[0].tiers) == [pb.TIER_CPU] * 3
            score = control.Score(pb.ScoreRequest(query=query))
            assert dict(score.matched_tokens_by_node) == {result.node: 3 * SMALL_NS.chunk_tokens}
        client.close()
        listening = [(p.name(), c.laddr.ip) for p in psutil.Process(proc.pid).children(recursive=True)
                     for c in _connections(p) if c.status == psutil.CONN_LISTEN]
        assert listening and all(_is_loopback(ip) for _, ip in listening), listening  # embedded Ray: loopback
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stderr.read()
    assert not (tmp_path / "agent.sock").exists()  # the agent stopped cleanly


def _connections(process: psutil.Process) -> list:
    try:
        return process.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
