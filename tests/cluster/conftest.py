"""One session-scoped 3-node Ray cluster on loopback (ray.cluster_utils.Cluster: real raylets and object
stores per node) with a kvstore agent actor on each node, each with its own socket, arena and SSD."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvstore.client import LocalClient
from kvstore.config import KVStoreConfig, load_config
from kvstore.keys import Namespace
from kvstore.layout import Geometry

from ..conftest import SMALL, SMALL_NS

RAY_NAMESPACE = "kvstore-test"
NODE_NAMES = ("a", "b", "c")
RAY_ONLY = {"c": {"cluster.peer_link": "false"}}


def node_config(root: Path, name: str, **overrides) -> KVStoreConfig:
    settings = {
        "agent.socket_path": str(root / name / "agent.sock"),
        "cpu.arena_bytes": "32MiB",
        "cpu.slab_bytes": "1MiB",
        "cpu.prefault": "false",
        "disk.path": str(root / name / "disk"),
        "disk.capacity_bytes": "64MiB",
        "disk.segment_bytes": "4MiB",
        "disk.batch_bytes": "64KiB",
        "cluster.enabled": "true",
        "cluster.namespace": RAY_NAMESPACE,
        "cluster.replication": "2",
        "cluster.heartbeat_s": "0.5",
        "cluster.call_timeout_s": "2",
        "cluster.pull_timeout_s": "4",
    }
    settings.update(overrides)
    return load_config(env={}, overrides=settings)


@dataclass
class NodeAgent:
    name: str
    node_id: str
    cfg: KVStoreConfig
    handle: object = None

    @property
    def socket_path(self) -> str:
        return self.cfg.socket_path

    def client(self, namespace: Namespace = SMALL_NS, geometry: Geometry = SMALL, **kw) -> LocalClient:
        return LocalClient(namespace, geometry, socket_path=self.socket_path, **kw)

    def start(self) -> "NodeAgent":
        from kvstore.cluster import start_agent

        self.handle, _ = start_agent(self.cfg, self.node_id)
        return self

    def kill(self) -> None:
        """SIGKILL-like death of the agent's actor process (no clean stop)."""
        import ray

        ray.kill(self.handle, no_restart=True)
        self.handle = None
        # ray.kill only asks: wait until the process is really gone (its socket refuses connections),
        # so that a test's next call cannot still reach it.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.socket_path)
            except OSError:
                return
            finally:
                probe.close()
            time.sleep(0.05)
        raise AssertionError(f"agent at {self.socket_path} still accepts connections 30 s after ray.kill")


@dataclass
class RayCluster:
    ray_cluster: object
    agents: dict[str, NodeAgent]

    def __getitem__(self, name: str) -> NodeAgent:
        return self.agents[name]

    def wait_members(self, count: int, timeout: float = 60.0) -> None:
        """Until every live agent sees `count` members (bounded)."""
        import ray

        deadline = time.monotonic() + timeout
        while True:
            live = [a for a in self.agents.values() if a.handle is not None]
            seen = ray.get([a.handle.info.remote() for a in live], timeout=30)
            if all(len(info["members"]) == count for info in seen):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"members never converged: {[len(i['members']) for i in seen]}")
            time.sleep(0.2)


# Package scope: the three-node Ray cluster (raylets, GCS, agents with their heartbeats) stops once the
# cluster tests are done, instead of running behind every later test on this 2-core machine.
@pytest.fixture(scope="package")
def ray_cluster(tmp_path_factory):
    from kvstore.cluster import pin_ray_to_loopback

    pin_ray_to_loopback()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray.cluster_utils import Cluster

    node_args = dict(num_cpus=1, object_store_memory=96 << 20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    nodes = [cluster.head_node] + [cluster.add_node(**node_args) for _ in NODE_NAMES[1:]]
    ray.init(address=cluster.address, namespace=RAY_NAMESPACE, log_to_driver=False)
    root = tmp_path_factory.mktemp("cluster")
    # a and b reach each other over peer links; c has none (cluster.peer_link false), so everything
    # to and from c goes over Ray actor calls and object transfers: both paths run in every test.
    agents = {name: NodeAgent(name, node.node_id, node_config(root, name, **RAY_ONLY.get(name, {}))).start()
              for name, node in zip(NODE_NAMES, nodes)}
    harness = RayCluster(cluster, agents)
    try:
        harness.wait_members(len(NODE_NAMES))
        yield harness
    finally:
        from kvstore.cluster import stop_agent

        for agent in agents.values():
            if agent.handle is not None:
                stop_agent(agent.handle)
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def cluster(ray_cluster):
    """The session cluster with every agent alive and every agent seeing all three."""
    for agent in ray_cluster.agents.values():
        if agent.handle is None:
            agent.start()
    ray_cluster.wait_members(3)
    return ray_cluster


def store_only_on_a(cluster: RayCluster, prompt_tokens, data) -> tuple[list[bytes], object]:
    """Store `data` (chunks of `prompt_tokens`) through node a, then drop the replicas b and c got:
    a is the only holder, so the next get on b or c must pull. Returns (keys, data)."""
    a = cluster["a"].client()
    keys = a.keys(prompt_tokens)
    assert a.put(keys, data).stored == len(keys)
    assert a.flush(timeout=30)
    a.close()
    for name in ("b", "c"):
        other = cluster[name].client()
        other.evict(keys, tiers=("cpu", "disk"))
        assert other.flush(timeout=30)
        other.close()
    return keys, data


@pytest.fixture
def control_a(cluster):
    """A real ControlServer on loopback (no auth) in front of agent a, and a gRPC client of it."""
    from kvstore.control.client import ControlClient
    from kvstore.control.server import ControlServer

    cfg = load_config(env={}, overrides={"agent.socket_path": cluster["a"].socket_path, "control.insecure": True,
                                         "control.address": "127.0.0.1:0", "control.metrics_address": ""})
    server = ControlServer(cfg).start()
    try:
        with ControlClient(server.address, timeout=20) as control:
            yield control
    finally:
        server.stop(0)
