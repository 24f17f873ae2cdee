"""Real agents for tests: in process (a socket server thread over a real store) or `kvstore serve` in a
subprocess, each in the test's own directory with small sizes."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from kvstore.agent import AgentServer, NodeStore, close_agent
from kvstore.client import LocalClient
from kvstore.keys import Namespace
from kvstore.layout import Geometry
from kvstore.testing import agents
from kvstore.testing.agents import clean_env, spawn_agent, stop_agent

from .data import SMALL, SMALL_NS

__all__ = ["Agent", "agent_settings", "agent_subprocess", "clean_env", "spawn_agent", "stop_agent", "write_config"]


def agent_settings(tmp_path: Path, **overrides) -> dict:
    settings = {
        "agent.socket_path": str(tmp_path / "agent.sock"),
        "cpu.arena_bytes": "16MiB",
        "cpu.slab_bytes": "1MiB",
        "disk.path": str(tmp_path / "disk"),
        "disk.capacity_bytes": "256MiB",
        "disk.segment_bytes": "8MiB",
        "disk.batch_bytes": "64KiB",
        "control.enabled": False,  # a spawned `kvstore serve` would bind the controller's default ports
    }
    settings.update(overrides)
    return settings


def write_config(tmp_path: Path, settings: dict) -> Path:
    """`settings` as tmp_path/config.yaml."""
    return agents.write_config(tmp_path / "config.yaml", settings)


@dataclass
class Agent:
    store: NodeStore
    server: AgentServer
    socket_path: str

    def client(self, namespace: Namespace = SMALL_NS, geometry: Geometry = SMALL, **kw) -> LocalClient:
        return LocalClient(namespace, geometry, socket_path=self.socket_path, **kw)

    def stop(self) -> None:
        close_agent(self.server)


@contextmanager
def agent_subprocess(tmp_path: Path, **overrides) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real `kvstore serve` subprocess with the test settings (and `overrides`): (process, socket path);
    stopped afterwards, whatever the test did to it."""
    settings = agent_settings(tmp_path, **overrides)
    agent = spawn_agent(write_config(tmp_path, settings), settings["agent.socket_path"])
    try:
        yield agent, settings["agent.socket_path"]
    finally:
        stop_agent(agent)
