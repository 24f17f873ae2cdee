"""Controller helpers: tokens and tenants, a real agent behind a real ControlServer, the `kvstore` CLI as a
subprocess, and small calls the control tests share."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import grpc
import pytest

from kvstore.control.client import ControlClient
from kvstore.control.server import ControlServer
from kvstore.control.tls import ClientTLS
from kvstore.keys import Namespace
from kvstore.testing.agents import clean_env

from .agents import Agent
from .data import small_chunks, tokens

ADMIN, ALICE, BOB = "admin-token", "alice-token", "bob-token"
NS_A = Namespace(model="test-model", chunk_tokens=16, tenant="a")
NS_B = Namespace(model="test-model", chunk_tokens=16, tenant="b")
CLI_TOKEN = "cli-test-token"


@dataclass
class Control:
    agent: Agent
    server: ControlServer

    def client(self, token: str | None = ADMIN, timeout: float = 10.0, tls: ClientTLS | None = None) -> ControlClient:
        return ControlClient(self.server.address, token, timeout=timeout, tls=tls)


def kvstore(*args: str, token: str | None = CLI_TOKEN) -> subprocess.CompletedProcess:
    """Run the `kvstore` CLI (a real subprocess) with the test token."""
    extra = ["--token", token] if token else []
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args, *extra], env=clean_env(),
                          capture_output=True, text=True, timeout=60)


def put(agent, namespace, n_stored: int, n_total: int = 8, start: int = 0):
    """Store the first `n_stored` of `n_total` chunks of a prompt; returns (token ids, keys)."""
    client = agent.client(namespace)
    t = tokens(n_total, start)
    keys = [bytes(k) for k in client.keys(t)]
    assert client.put(keys[:n_stored], small_chunks(n_stored)).stored == n_stored
    client.close()
    return t, keys


def code_of(call, *args, **kw) -> grpc.StatusCode:
    """The status code a call fails with (it must fail)."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return info.value.code()
