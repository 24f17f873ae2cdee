"""A 3-node Ray cluster on loopback for tests (ray.cluster_utils.Cluster: real raylets and object stores
per node) with a kvstore agent actor on each node, each with its own socket, arena and SSD."""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from kvstore.client import LocalClient
from kvstore.config import KVStoreConfig, load_config
from kvstore.keys import Namespace
from kvstore.layout import Geometry

from .data import SMALL, SMALL_NS

RAY_NAMESPACE = "kvstore-test"
NODE_NAMES = ("a", "b", "c")


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


def link_call(agent: NodeAgent, op: str, args: dict) -> list:
    """One request on `agent`'s peer link, as another agent sends it (its address and secret from a ping,
    as members learn them): the wire reply."""
    import socket

    import ray

    from kvstore.wire.framing import FrameReader, pack

    _, (host, port, secret) = ray.get(agent.handle.ping.remote(), timeout=30)
    with socket.create_connection((host, port), timeout=10) as sock:
        frames = FrameReader(sock, 1 << 20)
        sock.sendall(pack(["hello", {"secret": secret}]))
        assert frames.read()[0] == "ok"
        sock.sendall(pack([op, args]))
        return frames.read()


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # '::ffff:127.0.0.1': IPv4 loopback on a dual socket
    return (mapped or address).is_loopback
