"""A real agent (tests/conftest.py) behind a real ControlServer on 127.0.0.1, port 0, and real gRPC clients."""

from __future__ import annotations

import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from kvstore.config import load_config
from kvstore.control.auth import Principal, TokenAuth
from kvstore.control.client import ControlClient
from kvstore.control.server import ControlServer
from kvstore.control.tls import ClientTLS
from kvstore.keys import Namespace
from tests.conftest import Agent, agent_settings, clean_env, spawn_agent, stop_agent, write_config

ADMIN, ALICE, BOB = "admin-token", "alice-token", "bob-token"
NS_A = Namespace(model="test-model", chunk_tokens=16, tenant="a")
NS_B = Namespace(model="test-model", chunk_tokens=16, tenant="b")


@dataclass
class Control:
    agent: Agent
    server: ControlServer

    def client(self, token: str | None = ADMIN, timeout: float = 10.0, tls: ClientTLS | None = None) -> ControlClient:
        return ControlClient(self.server.address, token, timeout=timeout, tls=tls)


@pytest.fixture
def start_control(start_agent, tmp_path):
    servers: list[ControlServer] = []

    def start(socket_path: str | None = None, **overrides) -> ControlServer:
        settings = agent_settings(tmp_path, **{"control.enabled": True, "control.address": "127.0.0.1:0",
                                               "control.metrics_address": "127.0.0.1:0", **overrides})
        cfg = load_config(env={}, overrides=settings)
        auth = TokenAuth({ADMIN: Principal(None), ALICE: Principal(frozenset({"a"})),
                          BOB: Principal(frozenset({"b"}))})
        server = ControlServer(cfg, socket_path or cfg.socket_path, auth=auth).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(0)


@pytest.fixture
def control(start_agent, start_control) -> Control:
    agent = start_agent()
    return Control(agent, start_control(agent.socket_path))


CLI_TOKEN = "cli-test-token"


@pytest.fixture
def served(tmp_path):
    """A real `kvstore serve` subprocess with its controller on a free loopback port: (socket, address)."""
    settings = agent_settings(tmp_path, **{"control.enabled": True, "control.address": "127.0.0.1:0",
                                           "control.metrics_address": "", "control.token": CLI_TOKEN})
    proc = spawn_agent(write_config(tmp_path, settings), settings["agent.socket_path"])
    address = None
    deadline = time.monotonic() + 30
    while address is None and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stderr.readline() if ready else ""
        if not line:
            break  # no word in time, or the agent exited
        match = re.search(r"controller listening on (\S+?)(,|$|\s)", line)
        address = match.group(1) if match else None
    assert address, "the controller did not start"
    yield settings["agent.socket_path"], address
    stop_agent(proc)


def kvstore(*args: str, token: str | None = CLI_TOKEN) -> subprocess.CompletedProcess:
    """Run the `kvstore` CLI (a real subprocess) with the test token."""
    extra = ["--token", token] if token else []
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args, *extra], env=clean_env(),
                          capture_output=True, text=True, timeout=60)
