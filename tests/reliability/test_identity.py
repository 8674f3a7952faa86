"""Identity under attack (issue 9, point 4): no certificate, another CA, an expired
certificate, the wrong role, a revoked certificate, and a revocation list that cannot be
trusted. Each is refused; each refusal the service can see is a structured ``security`` log
event naming the reason, the peer address and the certificate (serial, SHA-256 fingerprint,
subject CN), and no log line carries key material.

TLS refuses a missing certificate, another CA's and an expired one during the handshake:
those never reach the service, so the tests show that nothing reached it (no call event, no
audit entry), and one test shows that the server process still logs each (gRPC core writes
the failed handshake with its reason on stderr; not structlog, and no peer address).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from centinela import logs
from centinela.cli import main as cli_main
from centinela.config import Settings
from centinela.server import certs
from centinela.server.testing import ServerThread, secure_channel
from centinela.v1 import match_service_pb2 as mpb
from centinela.v1 import match_service_pb2_grpc as mgrpc
from centinela.v1 import registry_service_pb2 as rpb
from centinela.v1 import registry_service_pb2_grpc as rgrpc

from ._proc import start_serve, terminate

# ---- helpers -------------------------------------------------------------------------------


@dataclasses.dataclass
class Logs:
    """Every structlog line the process wrote, as the JSON documents production writes."""

    buffer: io.StringIO

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = [json.loads(line) for line in self.text.splitlines() if line.startswith("{")]
        return [e for e in out if name is None or e.get("event") == name]


@pytest.fixture
def captured() -> Iterator[Logs]:
    """Route structlog to a buffer with the production configuration (JSON, redaction)."""
    previous = structlog.get_config()
    buffer = io.StringIO()
    logs.configure("debug", stream=buffer)
    try:
        yield Logs(buffer)
    finally:
        structlog.configure(**previous)


@pytest.fixture
def live(captured: Logs, settings: Settings) -> Iterator[ServerThread]:
    """A real server started after the log capture, so its every line is captured."""
    with ServerThread(settings) as srv:
        yield srv


def _ca(server: ServerThread) -> certs.TlsFiles:
    d = server.certs_dir
    return certs.TlsFiles(d / "ca.crt", d / "ca.key", d / "ca.crt")


def _info(ch: grpc.Channel) -> mpb.GetServerInfoResponse:
    return mgrpc.MatchServiceStub(ch).GetServerInfo(mpb.GetServerInfoRequest(), timeout=10)


def _code(call: Any) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def key_material(certs_dir: Path) -> list[str]:
    """What must never appear in a log: PEM headers and the bodies of every private key."""
    needles = ["PRIVATE KEY"]
    for key_file in certs_dir.glob("*.key"):
        body = "".join(
            line for line in key_file.read_text().splitlines() if not line.startswith("-----")
        )
        needles += [body[i : i + 40] for i in range(0, len(body) - 40, 40)]
    return needles


def assert_no_key_material(text: str, certs_dir: Path) -> None:
    for needle in key_material(certs_dir):
        assert needle not in text, "a log line carries key material"


def assert_nothing_reached_the_service(live: ServerThread, captured: Logs, before: int) -> None:
    assert not captured.events("rpc")
    assert not captured.events("identity.refused")
    assert live.app.components.audit.size == before


# ---- refused by TLS ------------------------------------------------------------------------


def test_no_certificate_never_reaches_the_service(live: ServerThread, captured: Logs) -> None:
    before = live.app.components.audit.size
    creds = grpc.ssl_channel_credentials(root_certificates=(live.certs_dir / "ca.crt").read_bytes())
    with grpc.secure_channel(live.target, creds) as ch:
        assert _code(lambda: _info(ch)) == grpc.StatusCode.UNAVAILABLE
    assert_nothing_reached_the_service(live, captured, before)


def test_certificate_of_another_ca_never_reaches_the_service(
    live: ServerThread, captured: Logs, tmp_path: Path
) -> None:
    before = live.app.components.audit.size
    # Same CA name as the real one: only the signature tells them apart.
    rogue_ca = certs.create_ca(tmp_path / "rogue")
    ident = next(i for i in certs.DEV_IDENTITIES if i.name == "pnp-admin")
    rogue = certs.issue_client(rogue_ca, tmp_path / "rogue", ident)
    files = certs.TlsFiles(rogue.cert, rogue.key, live.certs_dir / "ca.crt")
    with secure_channel(live.target, files) as ch:
        assert _code(lambda: _info(ch)) == grpc.StatusCode.UNAVAILABLE
    assert_nothing_reached_the_service(live, captured, before)


def test_expired_certificate_is_refused(live: ServerThread, captured: Logs, tmp_path: Path) -> None:
    before = live.app.components.audit.size
    now = dt.datetime.now(dt.UTC)
    ident = next(i for i in certs.DEV_IDENTITIES if i.name == "muni-miraflores")
    expired = certs.issue_client(
        _ca(live),
        tmp_path,
        ident,
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    with secure_channel(live.target, expired) as ch, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert_nothing_reached_the_service(live, captured, before)


def test_refused_handshakes_are_logged_by_the_server_process(tmp_path: Path) -> None:
    """The three TLS refusals above, against ``centinela serve`` in its own process: each is
    in the server's output, written by gRPC core (the Python service never sees a handshake,
    so these lines are gRPC's, not structured events), with the reason and no key material.

    gRPC core logs no peer address for a failed handshake; the reason is what tells the
    three apart.
    """
    data = tmp_path / "data"
    out = tmp_path / "server.log"
    proc, port = start_serve(data, out)
    try:
        target = f"127.0.0.1:{port}"
        certs_dir = data / "certs"
        ca = certs.TlsFiles(certs_dir / "ca.crt", certs_dir / "ca.key", certs_dir / "ca.crt")
        ident = next(i for i in certs.DEV_IDENTITIES if i.name == "muni-miraflores")
        now = dt.datetime.now(dt.UTC)
        rogue = certs.issue_client(certs.create_ca(tmp_path / "rogue"), tmp_path / "rogue", ident)
        expired = certs.issue_client(
            ca,
            tmp_path / "expired",
            ident,
            not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
        )
        no_cert = grpc.ssl_channel_credentials(root_certificates=ca.cert.read_bytes())
        attempts: list[tuple[str, Callable[[], grpc.Channel]]] = [
            ("no certificate", lambda: grpc.secure_channel(target, no_cert)),
            (
                "another CA",
                lambda: secure_channel(target, certs.TlsFiles(rogue.cert, rogue.key, ca.cert)),
            ),
            ("expired", lambda: secure_channel(target, expired)),
        ]
        for what, channel in attempts:
            before = out.read_text(errors="replace").count("Handshake failed")
            with channel() as ch:
                assert _code(lambda: _info(ch)) == grpc.StatusCode.UNAVAILABLE, what
            deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
            while out.read_text(errors="replace").count("Handshake failed") == before:
                assert dt.datetime.now(dt.UTC) < deadline, f"{what}: no handshake failure logged"
                time.sleep(0.05)
    finally:
        assert terminate(proc) == 0
    text = out.read_text(errors="replace")
    reasons = [line for line in text.splitlines() if "Handshake failed" in line]
    assert any("PEER_DID_NOT_RETURN_A_CERTIFICATE" in r for r in reasons), reasons
    assert any("unable to get local issuer certificate" in r for r in reasons), reasons
    assert any("certificate has expired" in r for r in reasons), reasons
    assert_no_key_material(text, certs_dir)
    assert_no_key_material(text, tmp_path / "rogue")
    assert_no_key_material(text, tmp_path / "expired")


# ---- refused by the service ----------------------------------------------------------------


def test_certificate_naming_no_caller_is_refused_and_logged(
    live: ServerThread, captured: Logs, tmp_path: Path
) -> None:
    odd = certs.issue(_ca(live), tmp_path, "odd", common_name="odd-system", org="odd", uris=())
    with secure_channel(live.target, odd) as ch:
        assert _code(lambda: _info(ch)) == grpc.StatusCode.UNAUTHENTICATED
    (event,) = captured.events("identity.refused")
    cert = _cert(odd.cert)
    assert event["reason"] == "not_a_centinela_identity"
    assert event["code"] == "UNAUTHENTICATED"
    assert event["method"] == "/centinela.v1.MatchService/GetServerInfo"
    assert event["peer"].startswith("ipv4:127.0.0.1:")
    assert event["cert_serial"] == format(cert.serial_number, "x")
    assert event["cert_fingerprint"] == cert.fingerprint(hashes.SHA256()).hex()
    assert event["cert_cn"] == "odd-system"
    assert event["level"] == "warning"
    assert_no_key_material(captured.text, live.certs_dir)
    assert_no_key_material(captured.text, tmp_path)


def test_certificate_of_the_wrong_role_is_denied_audited_and_logged(
    live: ServerThread, captured: Logs
) -> None:
    audit = live.app.components.audit
    before = audit.size
    with live.channel("muni-miraflores") as ch, pytest.raises(grpc.RpcError) as err:
        rgrpc.RegistryServiceStub(ch).RemoveSubject(
            rpb.RemoveSubjectRequest(dni="41234567"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert audit.size == before + 1  # the attempt is in the log, without the DNI
    assert b"41234567" not in audit.entries(before, before + 1)[0]
    (event,) = captured.events("access.denied")
    cert = _cert(live.certs_dir / "muni-miraflores.crt")
    assert event["caller"] == "muni-miraflores"
    assert event["rule_ids"]
    assert event["decision_id"]
    assert event["cert_serial"] == format(cert.serial_number, "x")
    assert event["cert_cn"] == "muni-miraflores"
    assert event["peer"].startswith("ipv4:127.0.0.1:")
    assert "41234567" not in captured.text
    assert_no_key_material(captured.text, live.certs_dir)


# ---- revocation ----------------------------------------------------------------------------


def test_revoked_certificate_is_refused_and_others_pass(
    live: ServerThread, captured: Logs, settings: Settings
) -> None:
    officer = live.channel("pnp-officer")  # connected before the revocation
    assert _info(officer).caller_org == "pnp-lima"
    assert cli_main(["certs", "revoke", "pnp-officer", "--data-dir", str(settings.data_dir)]) == 0
    crl = x509.load_pem_x509_crl(settings.effective_crl_file.read_bytes())
    serial = _cert(live.certs_dir / "pnp-officer.crt").serial_number
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    # The open connection is refused from its next call, and so is a new one; streams too.
    assert _code(lambda: _info(officer)) == grpc.StatusCode.UNAUTHENTICATED
    with live.channel("pnp-officer") as again:
        assert _code(lambda: _info(again)) == grpc.StatusCode.UNAUTHENTICATED
        stream = mgrpc.MatchServiceStub(again).SubscribeAlerts(
            mpb.SubscribeAlertsRequest(), timeout=10
        )
        assert _code(lambda: list(stream)) == grpc.StatusCode.UNAUTHENTICATED
    officer.close()
    for other in ("pnp-admin", "pnp-center-lima", "muni-miraflores", "compliance"):
        with live.channel(other) as ch:
            assert _code(lambda ch=ch: _info(ch)) == grpc.StatusCode.OK, other
    refused = captured.events("identity.refused")
    assert len(refused) == 3
    for event in refused:
        assert event["reason"] == "revoked"
        assert event["code"] == "UNAUTHENTICATED"
        assert event["cert_serial"] == format(serial, "x")
        assert event["cert_cn"] == "pnp-officer"
        assert event["peer"].startswith("ipv4:127.0.0.1:")
    assert captured.events("identity.revocation_list_loaded")
    assert_no_key_material(captured.text, live.certs_dir)
    # Re-running the command changes nothing but the CRL's dates.
    assert cli_main(["certs", "revoke", "pnp-officer", "--data-dir", str(settings.data_dir)]) == 0
    assert len(list(x509.load_pem_x509_crl(settings.effective_crl_file.read_bytes()))) == 1


def _write_crl(ca: certs.TlsFiles, path: Path, *, last: dt.datetime, next_: dt.datetime) -> None:
    """A CRL with chosen dates (the CLI only writes current ones)."""
    ca_cert = _cert(ca.cert)
    key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(last)
        .next_update(next_)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def test_an_untrustworthy_revocation_list_refuses_everyone_until_fixed(
    live: ServerThread, captured: Logs, settings: Settings, tmp_path: Path
) -> None:
    """Fail closed: a CRL that does not verify, expired, is garbage or vanished refuses every
    call with UNAVAILABLE and logs one error; a valid CRL restores service without a
    restart."""
    crl_path = settings.effective_crl_file
    ca = _ca(live)
    now = dt.datetime.now(dt.UTC)
    rogue = certs.create_ca(tmp_path / "rogue")  # same name as the real CA, another key

    def valid() -> None:
        crl_path.unlink(missing_ok=True)
        certs.renew_crl(ca, crl_path)

    def tampered() -> None:
        data = bytearray(crl_path.read_bytes())
        der = bytearray(
            x509.load_pem_x509_crl(bytes(data)).public_bytes(serialization.Encoding.DER)
        )
        der[-5] ^= 0x01  # inside the signature
        crl_path.write_bytes(bytes(der))

    breakers: dict[str, Callable[[], object]] = {
        "signed by another CA": lambda: _write_crl(
            rogue, crl_path, last=now, next_=now + dt.timedelta(days=1)
        ),
        "tampered": tampered,
        "expired": lambda: _write_crl(
            ca, crl_path, last=now - dt.timedelta(days=2), next_=now - dt.timedelta(seconds=1)
        ),
        "dated in the future": lambda: _write_crl(
            ca, crl_path, last=now + dt.timedelta(days=1), next_=now + dt.timedelta(days=2)
        ),
        "garbage": lambda: crl_path.write_bytes(os.urandom(300)),
        "deleted": lambda: crl_path.unlink(),
    }
    with live.channel("pnp-admin") as admin, live.channel("compliance") as compliance:
        for what, breaker in breakers.items():
            valid()
            assert _code(lambda: _info(admin)) == grpc.StatusCode.OK, what
            errors_before = len(captured.events("identity.revocation_unavailable"))
            breaker()
            for ch in (admin, compliance, admin):
                assert _code(lambda ch=ch: _info(ch)) == grpc.StatusCode.UNAVAILABLE, what
            errors = captured.events("identity.revocation_unavailable")
            assert len(errors) == errors_before + 1, what  # once per change, not per call
            assert errors[-1]["level"] == "error"
            valid()
            assert _code(lambda: _info(compliance)) == grpc.StatusCode.OK, what
    refused = captured.events("identity.refused")
    assert {e["reason"] for e in refused} == {"revocation_unavailable"}
    assert {e["code"] for e in refused} == {"UNAVAILABLE"}
    assert_no_key_material(captured.text, live.certs_dir)


def test_an_explicitly_configured_crl_must_exist(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        listen="127.0.0.1:0",
        shutdown_grace_s=0.5,
        crl_file=tmp_path / "missing-crl.pem",
    )
    with ServerThread(settings) as srv, srv.channel("pnp-admin") as ch:
        assert _code(lambda: _info(ch)) == grpc.StatusCode.UNAVAILABLE
        certs.renew_crl(_ca(srv), tmp_path / "missing-crl.pem")
        assert _code(lambda: _info(ch)) == grpc.StatusCode.OK


def test_checker_reads_the_list_at_each_change_and_checks_expiry(tmp_path: Path) -> None:
    ca = certs.create_ca(tmp_path / "ca")
    ident = next(i for i in certs.DEV_IDENTITIES if i.name == "pnp-officer")
    officer = _cert(certs.issue_client(ca, tmp_path / "ca", ident).cert)
    crl = tmp_path / "crl.pem"
    checker = certs.RevocationChecker(crl, ca.cert)
    assert not checker.is_revoked(officer.serial_number)  # no list yet: nothing revoked
    certs.revoke(ca, crl, officer, days=1)
    assert checker.is_revoked(officer.serial_number)
    assert not checker.is_revoked(officer.serial_number + 1)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1, seconds=1)
    with pytest.raises(certs.RevocationUnavailable, match="expired"):
        checker.is_revoked(officer.serial_number + 1, now=later)
    # Renewal keeps the entries (an expired list is carried over, not dropped).
    assert certs.renew_crl(ca, crl) == 1
    assert checker.is_revoked(officer.serial_number)
