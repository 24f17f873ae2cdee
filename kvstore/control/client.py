"""Talking to a controller: a channel (plaintext or TLS) and the bearer token the CLI and tests send."""

from __future__ import annotations


import grpc

from ..proto import kvstore_pb2_grpc as pb_grpc
from .auth import default_token_path
from .tls import ClientTLS


def resolve_token(explicit: str | None, configured: str = "") -> str | None:
    """--token, else control.token (env KVSTORE_CONTROL__TOKEN), else the embedded default's token file."""
    if explicit:
        return explicit
    if configured:
        return configured
    try:
        return default_token_path().read_text().strip() or None
    except OSError:
        return None


class ControlClient:
    """A ControlService stub whose calls carry the token and a deadline; over TLS when `tls` is given
    (ConfigError naming the file if one cannot be read)."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 5.0, tls: ClientTLS | None = None):
        self.channel = grpc.secure_channel(address, tls.credentials()) if tls else grpc.insecure_channel(address)
        self.stub = pb_grpc.ControlServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def __getattr__(self, name: str):
        method = getattr(self.stub, name)

        def call(request, timeout: float | None = None, **kw):
            return method(request, metadata=self.metadata, timeout=timeout or self.timeout, **kw)

        return call

    def watch(self, request):
        """A server stream without a deadline (cancel it to stop)."""
        return self.stub.WatchEvents(request, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
