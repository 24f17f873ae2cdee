"""Shared fixtures: real agents (real Unix sockets, real shared memory, real files) in tmp dirs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import yaml

from kvstore.client import LocalClient
from kvstore.config import load_config
from kvstore.keys import Namespace
from kvstore.layout import Geometry
from kvstore.node import AgentServer, NodeStore

# A small geometry keeps tests fast: 2 layers, K+V, 16 tokens, 2 heads, head_dim 32, bf16 = 8 KiB.
SMALL = Geometry(layers=2, heads=2, head_dim=32, tokens=16, dtype="bfloat16")
SMALL_NS = Namespace(model="test-model", chunk_tokens=16)


def tokens(n_chunks: int, start: int = 0) -> np.ndarray:
    """Token ids for `n_chunks` full chunks of the SMALL geometry."""
    return np.arange(n_chunks * SMALL.tokens) + start


def small_chunks(n: int, seed: int = 0, geometry: Geometry = SMALL) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *geometry.shape), generator=gen).to(geometry.torch_dtype)


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


@dataclass
class Agent:
    store: NodeStore
    server: AgentServer
    socket_path: str

    def client(self, namespace: Namespace = SMALL_NS, geometry: Geometry = SMALL, **kw) -> LocalClient:
        return LocalClient(namespace, geometry, socket_path=self.socket_path, **kw)

    def stop(self) -> None:
        self.server.shutdown()
        self.store.close()


@pytest.fixture
def start_agent(tmp_path):
    """Start an in-process agent (socket server thread) with test settings; stopped at teardown."""
    started: list[Agent] = []

    def start(**overrides) -> Agent:
        cfg = load_config(env={}, overrides=agent_settings(tmp_path, **overrides))
        store = NodeStore(cfg)
        server = AgentServer(store, cfg.socket_path).start()
        agent = Agent(store, server, cfg.socket_path)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        try:
            agent.stop()
        except Exception:
            pass


@pytest.fixture
def agent(start_agent) -> Agent:
    return start_agent()


def write_config(tmp_path: Path, settings: dict) -> Path:
    config: dict = {}
    for dotted, value in settings.items():
        section, _, key = dotted.rpartition(".")
        (config.setdefault(section, {}) if section else config)[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(extra)
    return env


def spawn_agent(config_path: Path, socket_path: str, env: dict | None = None) -> subprocess.Popen:
    """`kvstore serve --config` as a real subprocess; returns once its socket exists."""
    proc = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "serve", "--config", str(config_path)],
                            env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(socket_path):
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("agent did not start")
        time.sleep(0.05)
    return proc


@contextmanager
def agent_subprocess(tmp_path: Path, **overrides) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real `kvstore serve` subprocess with the test settings (and `overrides`): (process, socket
    path); stopped afterwards, whatever the test did to it."""
    settings = agent_settings(tmp_path, **overrides)
    agent = spawn_agent(write_config(tmp_path, settings), settings["agent.socket_path"])
    try:
        yield agent, settings["agent.socket_path"]
    finally:
        stop_agent(agent)


def stop_agent(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
