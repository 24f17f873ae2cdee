"""The controller process's gRPC server: `kvstore.v1.ControlService` (servicer.py) in front of the node agent.

Beside it, without a token: the standard grpc.health.v1 Health service, whose status for "" and for
kvstore.v1.ControlService a background thread keeps equal to whether the agent answers, and server
reflection (v1alpha). Plaintext, or TLS / mTLS (control.tls_*; tls.py). Several controllers may run side
by side: they keep no state of their own.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..config import KVStoreConfig
from ..metrics import ControllerMetrics
from ..proto import kvstore_pb2 as pb
from ..proto import kvstore_pb2_grpc as pb_grpc
from ..wire.messages import Stats
from .auth import TokenAuth
from .servicer import ControlServicer
from .tls import server_credentials, server_scheme

log = logging.getLogger("kvstore.control")

_HEALTH_CHECK_S = 1.0  # how often the grpc.health.v1 status is refreshed from the agent
CONTROL_SERVICE = pb.DESCRIPTOR.services_by_name["ControlService"].full_name  # "kvstore.v1.ControlService"


class ControlServer:
    """A gRPC server with the ControlService (and its metrics endpoint) for the agent at `socket_path`.

    Beside it, without a token: the standard grpc.health.v1 Health service, whose status for "" and
    for kvstore.v1.ControlService a background thread keeps equal to whether the agent answers (checked
    every _HEALTH_CHECK_S), and server reflection (v1alpha). Plaintext, or TLS / mTLS (control.tls_*).
    """

    def __init__(self, cfg: KVStoreConfig, socket_path: str | None = None, auth: TokenAuth | None = None):
        self.cfg = cfg
        self.auth = auth or TokenAuth.from_config(cfg)
        socket_path = socket_path or cfg.socket_path
        self.metrics = ControllerMetrics(lambda: self.servicer.agent.request(Stats(), None, cfg.control.call_timeout_s))
        self.servicer = ControlServicer(cfg, socket_path, self.auth, self.metrics)
        # so_reuseport off: a second controller on a taken port must fail, not share it silently
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.control.workers,
                                                              thread_name_prefix="kvstore-control"),
                                   options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ControlServiceServicer_to_server(self.servicer, self._server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((CONTROL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self._server)
        self._health_status: int | None = None
        self._stopping = threading.Event()
        self._health_thread = threading.Thread(target=self._watch_agent, name="kvstore-control-health", daemon=True)
        self.scheme = server_scheme(cfg.control)  # "plaintext", "TLS" or "mTLS"
        self.port = 0
        self.metrics_port = 0

    def start(self) -> "ControlServer":
        """Bind and serve; raises OSError if the address (or the metrics address) cannot be bound, and
        ConfigError naming the key if a TLS file (control.tls_*) cannot be read."""
        address = self.cfg.control.address
        host, _, _ = address.rpartition(":")
        credentials = server_credentials(self.cfg.control)
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        if self.cfg.control.metrics_address:
            self.metrics_port = self.metrics.serve(self.cfg.control.metrics_address)
        self._refresh_health()  # the first Check already tells the truth
        self._server.start()
        self._health_thread.start()
        self.address = f"{host}:{self.port}"
        return self

    def _refresh_health(self) -> None:
        """Set the grpc.health.v1 status of "" and of ControlService from the agent (only on a change,
        so that Watch streams see changes, not every check)."""
        try:
            problem = self.servicer.agent_problem(self.cfg.control.call_timeout_s)
        except Exception as exc:  # not a known agent failure, but not health either
            log.exception("health check failed")
            problem = f"health check failed: {exc!r}"
        status = health_pb2.HealthCheckResponse.NOT_SERVING if problem else health_pb2.HealthCheckResponse.SERVING
        if status != self._health_status:
            if problem:
                log.warning("agent not serving: %s", problem)
            self._health_status = status
            for service in ("", CONTROL_SERVICE):
                self.health.set(service, status)

    def _watch_agent(self) -> None:
        while not self._stopping.wait(_HEALTH_CHECK_S):
            self._refresh_health()

    def stop(self, grace: float = 1.0) -> None:
        self._stopping.set()
        self.health.enter_graceful_shutdown()  # NOT_SERVING to Check and Watch while draining
        self._server.stop(grace).wait(grace + 1)
        if self._health_thread.is_alive():
            self._health_thread.join(self.cfg.control.call_timeout_s + 1)
        self.metrics.close()
        self.servicer.close()
