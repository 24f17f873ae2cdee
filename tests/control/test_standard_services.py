"""The standard services beside ControlService: grpc.health.v1 (following the agent) and server
reflection, both without a token, on a real server with a real agent."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from kvstore.control.server import CONTROL_SERVICE

pytestmark = pytest.mark.integration

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def status(stub, service: str) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_for(stub, wanted: int, within: float = 5.0) -> None:
    """Poll Check for "" and ControlService until both are `wanted`; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while {status(stub, s) for s in ("", CONTROL_SERVICE)} != {wanted}:
        assert time.monotonic() < deadline, f"health is not {health_pb2.HealthCheckResponse.ServingStatus.Name(wanted)}"
        time.sleep(0.05)


def test_health_follows_the_agent_without_a_token(control, start_agent, tmp_path):
    stub = health_pb2_grpc.HealthStub(control.client(token=None).channel)  # no token at all
    assert status(stub, "") == SERVING and status(stub, CONTROL_SERVICE) == SERVING
    with pytest.raises(grpc.RpcError) as info:
        status(stub, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=CONTROL_SERVICE), timeout=15)
    assert next(watch).status == SERVING
    control.agent.stop()
    assert next(watch).status == NOT_SERVING  # sent on the change (not on every check)
    wait_for(stub, NOT_SERVING)
    start_agent(**{"disk.path": str(tmp_path / "disk2")})  # the same socket path: the agent is back
    wait_for(stub, SERVING)
    assert next(watch).status == SERVING
    watch.cancel()


def test_health_is_not_serving_once_the_server_stops(control):
    stub = health_pb2_grpc.HealthStub(control.client(token=None).channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=15)
    assert next(watch).status == SERVING
    control.server.stop(grace=1.0)
    assert next(watch).status == NOT_SERVING  # told while the server drains


def test_reflection_describes_the_control_service_without_a_token(control):
    database = ProtoReflectionDescriptorDatabase(control.client(token=None).channel)
    assert {CONTROL_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= \
        set(database.get_services())
    service = DescriptorPool(database).FindServiceByName(CONTROL_SERVICE)
    assert {"Lookup", "Score", "Stats", "Health", "WatchEvents"} <= set(service.methods_by_name)
    assert service.methods_by_name["Lookup"].input_type.fields_by_name["query"].message_type.full_name == \
        "kvstore.v1.ChunkQuery"
