"""Identity under attack: expired and wrong-role certificates (issue 9, point 4, in part)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from centinela.server import certs
from centinela.server.testing import ServerThread, secure_channel
from centinela.v1 import registry_service_pb2 as rpb
from centinela.v1 import registry_service_pb2_grpc as rgrpc


def _ca(server: ServerThread) -> certs.TlsFiles:
    d = server.certs_dir
    return certs.TlsFiles(d / "ca.crt", d / "ca.key", d / "ca.crt")


def test_expired_certificate_is_refused(server: ServerThread, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    ident = next(i for i in certs.DEV_IDENTITIES if i.name == "muni-miraflores")
    expired = certs.issue_client(
        _ca(server),
        tmp_path,
        ident,
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    with secure_channel(server.target, expired) as ch, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_of_the_wrong_role_is_denied_and_audited(server: ServerThread) -> None:
    audit = server.app.components.audit
    before = audit.size
    with server.channel("muni-miraflores") as ch, pytest.raises(grpc.RpcError) as err:
        rgrpc.RegistryServiceStub(ch).RemoveSubject(
            rpb.RemoveSubjectRequest(dni="41234567"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert audit.size == before + 1  # the attempt is in the log, without the DNI
    assert b"41234567" not in audit.entries(before, before + 1)[0]
