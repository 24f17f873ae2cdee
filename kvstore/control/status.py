"""How the controller ends a call: typed errors to gRPC status codes, and the wrapper of every unary RPC."""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable, NoReturn

import grpc

from ..errors import (AgentUnavailable, CapacityExhausted, InvalidArgument, NotFound, PermissionDenied,
                      Unauthenticated)
from .auth import ANYONE

log = logging.getLogger("kvstore.control")

_CODES = ((Unauthenticated, grpc.StatusCode.UNAUTHENTICATED), (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
          (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT), (NotFound, grpc.StatusCode.NOT_FOUND),
          (CapacityExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED))


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception raised while serving a call (INTERNAL: a bug, not bad input)."""
    if isinstance(exc, AgentUnavailable):
        return grpc.StatusCode.DEADLINE_EXCEEDED if "timed out" in str(exc) else grpc.StatusCode.UNAVAILABLE
    return next((code for kind, code in _CODES if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)


def abort(name: str, exc: Exception, context: grpc.ServicerContext) -> NoReturn:
    """End a failed call with its status and a message naming the RPC; an INTERNAL one is logged with its
    traceback. context.abort raises."""
    code = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", name)
    context.abort(code, f"{name}: {exc}")


def rpc(method: Callable) -> Callable:
    """Auth, error mapping and latency metrics around one unary RPC of the servicer: the method gets the
    caller's Principal after the context."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self, request, context: grpc.ServicerContext):
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            principal = ANYONE if name == "Health" else self.auth.check(context.invocation_metadata())
            return method(self, request, context, principal)
        except Exception as exc:
            code = status_of(exc)
            abort(name, exc, context)
        finally:
            self.metrics.rpc_seconds.labels(name, code.name).observe(time.perf_counter() - started)

    return wrapper
