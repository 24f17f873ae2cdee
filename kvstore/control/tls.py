"""TLS for the controller (docs/control.md): server credentials and a client's TLS material.

Key names pair up: `tls_cert` / `tls_key` are the controller's identity and `tls_ca` the CA a client
verifies it with; `tls_client_cert` / `tls_client_key` are a client's identity and `tls_client_ca` the
CA the controller verifies clients with. With `control.tls_client_ca` set, the controller refuses a
connection without a certificate that CA signed (mTLS). Bearer tokens are checked as before, over TLS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from ..config import ControlConfig
from ..errors import ConfigError


def read_pem(path: str, name: str) -> bytes:
    """The bytes of the PEM file at `path`; ConfigError naming `name` (a key or flag) if it cannot be."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{name}: {path} is not a PEM file")
    return data


def server_credentials(control: ControlConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from control.tls_cert / tls_key (and tls_client_ca: mTLS); None for plaintext."""
    if not control.tls_cert:
        return None
    pair = (read_pem(control.tls_key, "control.tls_key"), read_pem(control.tls_cert, "control.tls_cert"))
    client_ca = read_pem(control.tls_client_ca, "control.tls_client_ca") if control.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def server_scheme(control: ControlConfig) -> str:
    """How the controller listens: "mTLS", "TLS" or "plaintext"."""
    return "mTLS" if control.tls_client_ca else "TLS" if control.tls_cert else "plaintext"


@dataclass(frozen=True)
class ClientTLS:
    """A client's TLS material, as PEM file paths. `ca` verifies the controller ("": the system's
    roots); `cert` and `key` (both or neither) are presented to a controller that asks (mTLS)."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    @classmethod
    def from_options(cls, ca: str = "", cert: str = "", key: str = "") -> "ClientTLS | None":
        """TLS if any of the three is given, else None (plaintext)."""
        return cls(ca, cert, key) if ca or cert or key else None

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ConfigError("--tls-cert (control.tls_client_cert) and --tls-key (control.tls_client_key) "
                              "go together: give both or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca, "--tls-ca (control.tls_ca)") if self.ca else None,
            private_key=read_pem(self.key, "--tls-key (control.tls_client_key)") if self.key else None,
            certificate_chain=read_pem(self.cert, "--tls-cert (control.tls_client_cert)") if self.cert else None)
