"""Mutual TLS from the first day: who is let in and who is not."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from centinela.server import certs
from centinela.server.testing import ServerThread, secure_channel
from centinela.v1 import match_service_pb2, match_service_pb2_grpc


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status)


def test_health_serving_over_mutual_tls(server: ServerThread) -> None:
    with server.channel("compliance") as ch:
        assert _health(ch) == health_pb2.HealthCheckResponse.SERVING


def test_every_dev_identity_is_recognised(server: ServerThread) -> None:
    for ident in certs.DEV_IDENTITIES:
        with server.channel(ident.name) as ch:
            info = match_service_pb2_grpc.MatchServiceStub(ch).GetServerInfo(
                match_service_pb2.GetServerInfoRequest(), timeout=10
            )
            assert (info.caller_org, info.caller_kind) == (ident.org, ident.kind)
            assert sorted(info.caller_roles) == sorted(ident.roles)


def test_client_without_certificate_is_refused(server: ServerThread) -> None:
    ca = (server.certs_dir / "ca.crt").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(server.target, creds) as ch, pytest.raises(grpc.RpcError) as err:
        _health(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_from_another_ca_is_refused(server: ServerThread, tmp_path: Path) -> None:
    rogue_ca = certs.create_ca(tmp_path / "rogue", "Rogue CA")
    rogue = certs.issue_client(rogue_ca, tmp_path / "rogue", certs.DEV_IDENTITIES[2])
    # Trust the real server CA so that only the client side is wrong.
    files = certs.TlsFiles(rogue.cert, rogue.key, server.certs_dir / "ca.crt")
    with secure_channel(server.target, files) as ch, pytest.raises(grpc.RpcError) as err:
        _health(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_without_caller_kind_is_unauthenticated(
    server: ServerThread, tmp_path: Path
) -> None:
    ca = certs.TlsFiles(
        server.certs_dir / "ca.crt", server.certs_dir / "ca.key", server.certs_dir / "ca.crt"
    )
    odd = certs.issue(ca, tmp_path, "odd", common_name="odd", org="odd", uris=())
    with secure_channel(server.target, odd) as ch:
        assert _health(ch) == health_pb2.HealthCheckResponse.SERVING  # TLS itself is fine
        with pytest.raises(grpc.RpcError) as err:
            match_service_pb2_grpc.MatchServiceStub(ch).GetServerInfo(
                match_service_pb2.GetServerInfoRequest(), timeout=10
            )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_server_negotiates_tls13(server: ServerThread) -> None:
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(server.certs_dir / "ca.crt"))
    ctx.load_cert_chain(server.certs_dir / "compliance.crt", server.certs_dir / "compliance.key")
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.3"
