"""Fixtures: real agents (real Unix sockets, real shared memory, real files) in tmp dirs; and a check
that every test says which tier it belongs to (pytest -m unit | integration | e2e)."""

from __future__ import annotations

import pytest

from kvstore.agent import open_agent
from kvstore.config import load_config

from .support.agents import Agent, agent_settings

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items) -> None:
    """Every test carries exactly one tier marker (its module's `pytestmark`), so `make test-fast` (the
    unit tier) never silently misses a test nor runs a slow one."""
    wrong = [item.nodeid for item in items if sum(item.get_closest_marker(t) is not None for t in TIERS) != 1]
    if wrong:
        raise pytest.UsageError(f"tests without exactly one of the markers {TIERS}: {wrong[:5]}")


@pytest.fixture
def start_agent(tmp_path):
    """Start an in-process agent (socket server thread) with test settings; stopped at teardown."""
    started: list[Agent] = []

    def start(**overrides) -> Agent:
        cfg = load_config(env={}, overrides=agent_settings(tmp_path, **overrides))
        server = open_agent(cfg).start()
        agent = Agent(server.store, server, cfg.socket_path)
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
