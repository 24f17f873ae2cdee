"""deploy/: the Grafana dashboard is a valid dashboard whose every metric name is documented in
docs/metrics.md and really exported by a real agent's and a real controller's endpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvstore.client import AgentConnection
from kvstore.config import load_config
from kvstore.control.client import ControlClient
from kvstore.control.server import ControlServer
from kvstore.proto import kvstore_pb2 as pb

from .support.agents import agent_settings

from .support.data import small_chunks, SMALL_NS, tokens
from .support.metrics import scrape

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
METRIC = re.compile(r"\bkvstore_[a-z0-9_]+")
HISTOGRAM_SAMPLES = ("_bucket", "_count", "_sum")


def documented() -> dict[str, str]:
    """Name -> type, from the table in docs/metrics.md."""
    rows = re.findall(r"^\| `(kvstore_[a-z0-9_]+)` \| (\w+) \|", (ROOT / "docs" / "metrics.md").read_text(), re.M)
    assert rows, "no metrics table in docs/metrics.md"
    return dict(rows)


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def sample_name_of(name: str, docs: dict[str, str]) -> str | None:
    """The documented family a sample name belongs to (a histogram's _bucket/_count/_sum included, and
    the _created samples prometheus-client adds to its own counters and histograms)."""
    if name in docs:
        return name
    if name.endswith("_created"):
        base = name.removesuffix("_created")
        return base + "_total" if base + "_total" in docs else base if docs.get(base) == "histogram" else None
    for suffix in HISTOGRAM_SAMPLES:
        base = name.removesuffix(suffix)
        if base != name and docs.get(base) == "histogram":
            return base
    return None


def test_dashboard_is_a_grafana_dashboard_over_a_prometheus_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
    for expr in dashboard_exprs(dashboard):
        depth = 0
        for char in expr:
            depth += {"(": 1, ")": -1}.get(char, 0)
            assert depth >= 0, expr
        assert depth == 0 and expr.count("{") == expr.count("}"), expr
    quantiles = [e for e in dashboard_exprs(dashboard) if "histogram_quantile" in e]
    assert any("kvstore_agent_request_seconds_bucket" in e and 'op="acquire"' in e for e in quantiles)
    assert any("kvstore_control_rpc_seconds_bucket" in e for e in quantiles)


@pytest.fixture
def endpoints(start_agent, tmp_path):
    """A real agent with its own endpoint and a real controller with its own, after real traffic."""
    agent = start_agent(**{"agent.metrics_address": "127.0.0.1:0"})
    cfg = load_config(env={}, overrides=agent_settings(tmp_path, **{
        "control.enabled": True, "control.address": "127.0.0.1:0", "control.metrics_address": "127.0.0.1:0",
        "control.insecure": True}))
    controller = ControlServer(cfg, agent.socket_path).start()
    client = agent.client()
    keys = [bytes(k) for k in client.keys(tokens(4))]
    client.put(keys[:2], small_chunks(2))
    client.get(keys[:2])
    assert client.flush(timeout=30)
    agent.store.evict(SMALL_NS.digest, keys[:1], ("cpu",))
    client.get(keys[:2])  # one from disk
    conn = AgentConnection(agent.socket_path)
    conn.call("lookup", {"ns": SMALL_NS.digest, "keys": b"".join(keys)})
    conn.call("acquire", {"ns": SMALL_NS.digest, "keys": b"".join(keys)})  # misses
    conn.close()
    with ControlClient(controller.address, None) as control:
        control.Stats(pb.StatsRequest())
        control.Lookup(pb.LookupRequest(query=pb.ChunkQuery(namespace=SMALL_NS.digest,
                                                            chunk_hashes_packed=b"".join(keys))))
    yield agent.server.metrics_port, controller.metrics_port
    client.close()
    controller.stop(0)


def test_every_dashboard_name_is_documented_and_exported(endpoints):
    agent_port, controller_port = endpoints
    docs = documented()
    exported = {name for port in (agent_port, controller_port) for name, _ in scrape(port)}
    used = {name for expr in dashboard_exprs(json.loads(DASHBOARD.read_text())) for name in METRIC.findall(expr)}
    assert len(used) >= 12
    undocumented = sorted(name for name in used if sample_name_of(name, docs) is None)
    assert not undocumented, f"dashboard names not in docs/metrics.md: {undocumented}"
    missing = sorted(used - exported)
    assert not missing, f"dashboard names no endpoint exports: {missing}"


def test_every_documented_name_is_exported(endpoints):
    agent_port, controller_port = endpoints
    agent_names = {name for name, _ in scrape(agent_port)}
    exported = agent_names | {name for name, _ in scrape(controller_port)}
    families = {sample_name_of(name, documented()) for name in exported} - {None}
    assert set(documented()) - families == set()
    undocumented = sorted(n for n in exported if n.startswith("kvstore_") and sample_name_of(n, documented()) is None)
    assert not undocumented, f"exported but not in docs/metrics.md: {undocumented}"
    assert not any(name.startswith("kvstore_control_") for name in agent_names)  # the agent's own endpoint
