"""`kvstore serve --cluster`: an embedded single-node Ray on loopback, the agent as its actor."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import torch

from kvstore.client import LocalClient

from .test_cluster import _is_loopback
from ..conftest import SMALL, SMALL_NS, agent_settings, clean_env, small_chunks, tokens, write_config


def test_serve_cluster_starts_embedded_ray_and_serves_the_local_protocol(tmp_path):
    settings = agent_settings(tmp_path, **{"cluster.namespace": "kvstore-serve-test",
                                           "cluster.object_store_bytes": "96MiB"})
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
