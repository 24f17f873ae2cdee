"""A real agent (tests/conftest.py) behind a real ControlServer on 127.0.0.1, port 0, and real gRPC clients."""

from __future__ import annotations

import re
import select
import time

import pytest

from kvstore.config import load_config
from kvstore.control.auth import Principal, TokenAuth
from kvstore.control.server import ControlServer

from ..support.agents import agent_settings, spawn_agent, stop_agent, write_config
from ..support.control import ADMIN, ALICE, BOB, CLI_TOKEN, Control


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

