"""A real agent (tests/conftest.py) behind a real ControlServer on 127.0.0.1, port 0, and real gRPC clients."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kvstore.config import load_config
from kvstore.control.auth import Principal, TokenAuth
from kvstore.control.client import ControlClient
from kvstore.control.server import ControlServer
from kvstore.keys import Namespace
from tests.conftest import Agent, agent_settings

ADMIN, ALICE, BOB = "admin-token", "alice-token", "bob-token"
NS_A = Namespace(model="test-model", chunk_tokens=16, tenant="a")
NS_B = Namespace(model="test-model", chunk_tokens=16, tenant="b")


@dataclass
class Control:
    agent: Agent
    server: ControlServer

    def client(self, token: str | None = ADMIN, timeout: float = 10.0) -> ControlClient:
        return ControlClient(self.server.address, token, timeout=timeout)


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
