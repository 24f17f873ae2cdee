"""One session-scoped 3-node Ray cluster on loopback (tests/support/cluster.py) with a kvstore agent actor on
each node, each with its own socket, arena and SSD."""

from __future__ import annotations

import os

import pytest

from kvstore.config import load_config

from ..support.cluster import NODE_NAMES, RAY_NAMESPACE, NodeAgent, RayCluster, node_config


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
    agents = {name: NodeAgent(name, node.node_id, node_config(root, name)).start()
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
