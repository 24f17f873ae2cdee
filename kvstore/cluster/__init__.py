"""The distributed cache on Ray: node agents as actors, a partitioned cluster directory, remote pulls,
replication and failure handling (docs/cluster.md). Importing this package needs Ray; the engine-side
client never does."""

from .runtime import init_ray, pin_ray_to_loopback, serve_cluster, start_agent, stop_agent

__all__ = ["init_ray", "pin_ray_to_loopback", "serve_cluster", "start_agent", "stop_agent"]
