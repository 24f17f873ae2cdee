"""The controller over TLS and mTLS: a throwaway PKI made here, a real agent, a real gRPC server on
127.0.0.1 and real clients (ControlClient and the `kvstore` CLI in process)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.cli import main
from kvstore.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from kvstore.cli.serve import _start_controller
from kvstore.config import load_config
from kvstore.control.tls import ClientTLS
from kvstore.errors import ConfigError
from kvstore.proto import kvstore_pb2 as pb
from ..support.agents import agent_settings

from ..support.control import ADMIN, Control, NS_A
from ..support.control import code_of, put

pytestmark = pytest.mark.integration

Code = grpc.StatusCode


def _pem(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


class Authority:
    """A throwaway CA that issues server and client certificates as PEM files in `directory`."""

    def __init__(self, directory: Path, name: str):
        self.directory, self.name = directory, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        self.cert = (self._builder(subject, subject, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca = _pem(directory / f"{name}-ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def issue(self, common_name: str, server: bool) -> tuple[str, str]:
        """(certificate, key) paths of a leaf for 127.0.0.1 and localhost (server) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
                                 self.cert.subject, key.public_key())
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return (_pem(self.directory / f"{self.name}-{common_name}.pem", cert.public_bytes(serialization.Encoding.PEM)),
                _pem(self.directory / f"{self.name}-{common_name}.key", key_pem))


@dataclass
class Pki:
    servers: Authority  # signs the controller's certificate
    clients: Authority  # signs the certificates mTLS accepts
    stranger: Authority  # signs certificates nobody should accept
    server_cert: str
    server_key: str

    def settings(self, mtls: bool = False) -> dict:
        tls = {"control.tls_cert": self.server_cert, "control.tls_key": self.server_key}
        return tls | ({"control.tls_client_ca": self.clients.ca} if mtls else {})


@pytest.fixture
def pki(tmp_path) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    servers = Authority(directory, "servers")
    return Pki(servers, Authority(directory, "clients"), Authority(directory, "stranger"),
               *servers.issue("controller", server=True))


@pytest.fixture
def tls_control(start_agent, start_control, pki):
    """start(mtls=False) -> a live agent behind a controller that speaks TLS (or mTLS)."""

    def start(mtls: bool = False) -> Control:
        agent = start_agent()
        return Control(agent, start_control(agent.socket_path, **pki.settings(mtls)))

    return start


def _lookup_request(t) -> pb.LookupRequest:
    return pb.LookupRequest(query=pb.ChunkQuery(namespace=NS_A.digest, token_ids=t.tolist()))


def test_lookup_over_tls_with_the_token(tls_control, pki):
    control = tls_control()
    assert control.server.scheme == "TLS"
    t, _ = put(control.agent, NS_A, 3)
    tls = ClientTLS(ca=pki.servers.ca)
    assert control.client(tls=tls).Lookup(_lookup_request(t)).matched_chunks == 3
    assert code_of(control.client(token=None, tls=tls).Lookup, _lookup_request(t)) == Code.UNAUTHENTICATED
    assert code_of(control.client(token="wrong", tls=tls).Stats, pb.StatsRequest()) == Code.UNAUTHENTICATED
    health = control.client(token=None, tls=tls).Health(pb.HealthRequest())  # no token needed, as in plaintext
    assert health.status == pb.HealthResponse.SERVING


def test_plaintext_or_untrusting_client_against_tls_is_unavailable_at_once(tls_control, pki):
    control = tls_control()
    for tls in (None, ClientTLS(ca=pki.stranger.ca)):  # no TLS; TLS without trust in the controller's CA
        client = control.client(timeout=5.0, tls=tls)
        started = time.monotonic()
        assert code_of(client.Stats, pb.StatsRequest()) == Code.UNAVAILABLE, tls
        assert time.monotonic() - started < 4.0, "the call waited for its deadline instead of failing"
        client.close()


def test_mtls_refuses_clients_without_a_certificate_from_its_ca(tls_control, pki):
    control = tls_control(mtls=True)
    assert control.server.scheme == "mTLS"
    t, _ = put(control.agent, NS_A, 2)
    own_cert, own_key = pki.clients.issue("router", server=False)
    foreign_cert, foreign_key = pki.stranger.issue("intruder", server=False)
    refused = [ClientTLS(ca=pki.servers.ca),  # no certificate
               ClientTLS(ca=pki.servers.ca, cert=foreign_cert, key=foreign_key),  # signed by another CA
               ClientTLS(ca=pki.servers.ca, cert=pki.server_cert, key=pki.server_key)]  # servers' CA, not clients'
    for tls in refused:
        client = control.client(timeout=5.0, tls=tls)
        assert code_of(client.Lookup, _lookup_request(t)) == Code.UNAVAILABLE, tls
        client.close()
    accepted = ClientTLS(ca=pki.servers.ca, cert=own_cert, key=own_key)
    assert control.client(tls=accepted).Lookup(_lookup_request(t)).matched_chunks == 2
    assert code_of(control.client(token=None, tls=accepted).Stats, pb.StatsRequest()) == Code.UNAUTHENTICATED
    # the standard health service needs no token, but over mTLS still a certificate
    check = health_pb2_grpc.HealthStub(control.client(tls=accepted).channel).Check
    assert check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_missing_or_bad_tls_files_are_config_errors_naming_the_key(start_agent, start_control, pki, tmp_path):
    agent = start_agent()
    missing = str(tmp_path / "missing.pem")
    not_pem = _pem(tmp_path / "not.pem", b"just some bytes\n")
    for key, value in [("control.tls_cert", missing), ("control.tls_key", missing),
                       ("control.tls_client_ca", missing), ("control.tls_cert", not_pem)]:
        with pytest.raises(ConfigError) as info:
            start_control(agent.socket_path, **(pki.settings(mtls=True) | {key: value}))
        assert str(info.value).startswith(f"{key}: ") and value in str(info.value)
    for settings, key in [({"control.tls_cert": pki.server_cert}, "control.tls_key"),
                          ({"control.tls_key": pki.server_key}, "control.tls_cert"),
                          ({"control.tls_client_ca": pki.clients.ca}, "control.tls_client_ca"),
                          ({"control.tls_client_cert": pki.server_cert}, "control.tls_client_key")]:
        with pytest.raises(ConfigError, match=f"^{key}: "):
            load_config(env={}, overrides=settings)
    with pytest.raises(ConfigError, match=r"^--tls-ca \(control.tls_ca\): cannot read"):
        ClientTLS(ca=missing).credentials()


def test_cli_flags_and_config_keys_reach_an_mtls_controller(tls_control, pki, capsys):
    control = tls_control(mtls=True)
    put(control.agent, NS_A, 2)
    cert, key = pki.clients.issue("cli", server=False)
    base = ["status", "--address", control.server.address, "--token", ADMIN, "--output", "json"]
    assert main(base + ["--tls-ca", pki.servers.ca, "--tls-cert", cert, "--tls-key", key]) == EXIT_OK
    (node,) = json.loads(capsys.readouterr().out)["nodes"]
    assert node["namespaces"][0]["digest"] == NS_A.digest.hex()
    by_config = ["--set", f"control.tls_ca={pki.servers.ca}", "--set", f"control.tls_client_cert={cert}",
                 "--set", f"control.tls_client_key={key}"]
    assert main(base + by_config) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["nodes"]
    assert main(base + ["--tls-ca", pki.servers.ca, "--timeout", "3"]) == EXIT_FAILURE  # no client certificate
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert main(base + ["--timeout", "3", "--set", f"control.tls_cert={pki.server_cert}",
                        "--set", f"control.tls_key={pki.server_key}"]) == EXIT_FAILURE  # plaintext
    assert "pass --tls-ca" in capsys.readouterr().err
    assert main(base + ["--tls-ca", str(Path(pki.servers.ca).with_name("gone.pem"))]) == EXIT_USAGE
    assert "--tls-ca (control.tls_ca): cannot read" in capsys.readouterr().err


def test_serve_names_its_scheme_and_refuses_an_unreadable_certificate(start_agent, pki, tmp_path, capsys):
    agent = start_agent()
    for mtls, scheme in [(False, "TLS"), (True, "mTLS")]:
        cfg = load_config(env={}, overrides=agent_settings(tmp_path, **{
            "control.address": "127.0.0.1:0", "control.metrics_address": "", "control.token": ADMIN,
            **pki.settings(mtls)}))
        (server,) = _start_controller(cfg, agent.socket_path)
        server.stop(0)
        assert f"kvstore controller listening on {server.address} ({scheme})" in capsys.readouterr().err
    settings = agent_settings(tmp_path, **{"control.enabled": True, "control.tls_cert": str(tmp_path / "gone.pem"),
                                           "control.tls_key": pki.server_key,
                                           "agent.socket_path": str(tmp_path / "never.sock")})
    assert main(["serve", *[f"--set={k}={v}" for k, v in settings.items()]]) == EXIT_USAGE
    assert "control.tls_cert: cannot read" in capsys.readouterr().err
    assert not (tmp_path / "never.sock").exists()  # refused before the agent started
