"""Secrets hygiene (issue 9, point 6): after a batch of real calls, nothing the run produced
holds key material, a face vector, a plate, a DNI or a name.

One real server (mutual TLS, SQLite, data directory in ``tmp_path``) serves faces, plates,
1:1 verification, alert confirmation, a registry import over gRPC, objections, removals,
administrative calls, audit reads, and a set of failing calls (malformed vectors, DNIs and
plates, policy denials, duplicates, a broken stream message). Then everything produced is
scanned:

* the structlog output (the production JSON configuration, redaction included);
* every error the callers received: status message, trailers and the decoded
  ``google.rpc.Status`` details, stream error items, import rejects;
* the audit entries (from the log, and as the compliance export hands them out);
* every file under the data directory except the key files themselves (the key directory,
  ``certs/*.key``): the SQLite database with its encrypted stores, WAL and snapshots;

for: private-key PEM headers and bodies; the audit HMAC key, the audit signing key, every
owner's key-encryption keys and current data keys as raw bytes, hex and base64; the plates,
DNIs and the person's name used, and their plain SHA-256; and face vectors as Python and
float32 reprs of several components, fixed-point text, and raw float32 bytes. Every needle is
long enough (6 or more characters, 16 or more bytes) that ciphertext cannot hold it by chance.

``test_the_scan_finds_a_planted_plate`` shows the scan is not blind: a plate logged through
the same logger is found.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from centinela import logs
from centinela.config import Settings
from centinela.matcher import synth
from centinela.server.demo import (
    LIFTED_DNI,
    MIRA_SITE,
    PLATE,
    REGISTRY_DNIS,
    WANTED_DNI,
    World,
    populate,
    rid,
)
from centinela.server.testing import ServerThread
from centinela.v1 import audit_service_pb2 as apb
from centinela.v1 import audit_service_pb2_grpc as agrpc
from centinela.v1 import common_pb2 as c
from centinela.v1 import match_service_pb2 as mpb
from centinela.v1 import registry_service_pb2 as rpb
from centinela.v1 import registry_service_pb2_grpc as rgrpc
from centinela.v1 import watchlist_service_pb2 as wpb
from centinela.v1 import watchlist_service_pb2_grpc as wgrpc

#: A second stolen vehicle, reported by this test.
PLATE_2 = "XYZ-987"
#: Plate reads sent to MatchPlate: a look-alike of PLATE and an unlisted plate.
READS = ("ABC-128", "LMN-456")
#: DNIs of this test: imported by Reniec, named in an authorisation, wanted by a new
#: requisitoria, refused as malformed (still 8 characters, so findable).
IMPORT_DNIS = [f"6{i:07d}" for i in range(1, 9)]
NAMED_DNI = "45678912"
NEW_WANTED_DNI = "46789123"
#: A person's name, written where an operator might type one (an alert note, a free-text
#: legal basis); the server validates those fields and must not keep or repeat them.
NAME = "Rosa Quispe Mamani"


# ---- running the batch ---------------------------------------------------------------------


@dataclasses.dataclass
class Produced:
    """Everything the run produced, and everything that must not be in it."""

    server: ServerThread
    world: World
    logs: str = ""
    errors: list[str] = dataclasses.field(default_factory=list)
    audit: list[bytes] = dataclasses.field(default_factory=list)
    exported: list[bytes] = dataclasses.field(default_factory=list)
    files: dict[Path, bytes] = dataclasses.field(default_factory=dict)
    vectors: list[np.ndarray] = dataclasses.field(default_factory=list)
    key_needles: dict[str, bytes] = dataclasses.field(default_factory=dict)
    codes: list[grpc.StatusCode] = dataclasses.field(default_factory=list)


def _ts(delta: dt.timedelta) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(dt.datetime.now(dt.UTC) + delta)
    return t


def _describe(err: grpc.RpcError) -> str:
    """Everything a caller can read from a failed call."""
    e: Any = err
    parts = [str(e.code()), e.details() or ""]
    for key, value in e.trailing_metadata() or ():
        parts.append(key)
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            parts.append(str(status))
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                parts.append(str(info))
        else:
            parts.append(value if isinstance(value, str) else value.decode("latin-1"))
    return "\n".join(parts)


def _expect_error(out: Produced, call: Any) -> None:
    try:
        call()
    except grpc.RpcError as err:
        out.errors.append(_describe(err))
        out.codes.append(err.code())
        return
    raise AssertionError("the call was expected to fail")


def _unit(v: np.ndarray) -> list[float]:
    return [float(x) for x in (v / np.linalg.norm(v)).astype(np.float32)]


def run_batch(out: Produced) -> None:
    """Real calls of every kind, successful and failing."""
    w, srv = out.world, out.server
    muni = w.stub("muni-miraflores")
    # Faces: an alert, its confirmation with a note, a stranger, a denial, bad vectors.
    probe = w.genuine(0, seed=4321)
    out.vectors.append(np.asarray(probe, dtype=np.float32))
    hit = muni.MatchFace(w.face_request(probe), timeout=30)
    assert hit.alert
    muni.ConfirmAlert(
        mpb.ConfirmAlertRequest(
            context=c.RequestContext(operator_id="op-serenazgo-00001", client_request_id=rid()),
            alert_id=hit.candidates[0].alert_id,
            verdict=mpb.ALERT_VERDICT_CONFIRMED,
            note=f"seen on camera, looks like {NAME}",
        ),
        timeout=30,
    )
    stranger = w.stranger(seed=7)
    out.vectors.append(np.asarray(stranger, dtype=np.float32))
    muni.MatchFace(w.face_request(stranger), timeout=30)
    req = w.face_request(probe)
    req.context.legal_basis = f"orden judicial contra {NAME}"
    muni.MatchFace(req, timeout=30)
    _expect_error(out, lambda: w.stub("muni-la-victoria").MatchFace(w.face_request(probe), 30))
    _expect_error(out, lambda: muni.MatchFace(w.face_request([float("nan"), *probe[1:]]), 30))
    _expect_error(out, lambda: muni.MatchFace(w.face_request([x * 2 for x in probe]), 30))
    _expect_error(out, lambda: muni.MatchFace(w.face_request(probe[:-1]), 30))
    # Plates: the stolen one, a look-alike, an unlisted one, malformed reads.
    muni.MatchPlate(w.plate_request(PLATE), timeout=30)
    for text in READS:
        muni.MatchPlate(w.plate_request(text), timeout=30)
    _expect_error(out, lambda: muni.MatchPlate(w.plate_request(PLATE + "-99999999"), 30))
    bad_read = w.plate_request(PLATE)
    bad_read.read.alternatives.append(PLATE_2 + "!")
    _expect_error(out, lambda: muni.MatchPlate(bad_read, 30))
    # A stream with a good face, a bad one and a plate.
    bad = w.face_request(probe)
    bad.probe.vector.append(0.25)
    answers = list(
        muni.StreamMatch(
            iter(
                [
                    mpb.StreamMatchRequest(sequence=1, face=w.face_request(probe)),
                    mpb.StreamMatchRequest(sequence=2, face=bad),
                    mpb.StreamMatchRequest(sequence=3, plate=w.plate_request(PLATE)),
                ]
            ),
            timeout=60,
        )
    )
    out.errors += [str(a.error) for a in answers if a.WhichOneof("result") == "error"]
    # 1:1 verification: a match, a wrong person, a malformed DNI.
    officer = w.stub("pnp-officer")
    dni, vec = next(iter(w.registry.items()))
    verify_vec = [float(x) for x in synth.genuine_probes(vec[None, :], 3)[0]]
    out.vectors += [np.asarray(verify_vec, dtype=np.float32), vec.astype(np.float32)]

    def verify(d: str) -> mpb.VerifyFaceRequest:
        return mpb.VerifyFaceRequest(
            context=c.RequestContext(
                purpose=c.PURPOSE_IDENTITY_VERIFICATION, client_request_id=rid()
            ),
            probe=c.FaceProbe(model_id=w.model_id, quality=0.9, vector=verify_vec),
            dni=d,
        )

    officer.VerifyFace(verify(dni), timeout=30)
    officer.VerifyFace(verify(REGISTRY_DNIS[1]), timeout=30)
    _expect_error(out, lambda: officer.VerifyFace(verify(dni[:7] + "x"), 30))
    _expect_error(out, lambda: officer.VerifyFace(verify(dni + "9"), 30))
    # Reniec: an import over gRPC (with rejects), an objection, a removal; a denied removal.
    reniec_ch = srv.channel("reniec")
    reniec = rgrpc.RegistryServiceStub(reniec_ch)
    rng = np.random.default_rng(3)
    imported = [_unit(rng.standard_normal(len(probe)).astype(np.float32)) for _ in IMPORT_DNIS]
    out.vectors += [np.asarray(v, dtype=np.float32) for v in imported]
    records = [
        rpb.RegistryRecord(dni=d, model_id=w.model_id, vector=v)
        for d, v in zip(IMPORT_DNIS, imported, strict=True)
    ]
    records += [
        rpb.RegistryRecord(dni=IMPORT_DNIS[0][:7] + "y", model_id=w.model_id, vector=imported[0]),
        rpb.RegistryRecord(dni=IMPORT_DNIS[1], model_id=w.model_id, vector=imported[1][:-1]),
    ]
    ctx = c.RequestContext(reference="RES-REN-2026-07")
    answer = reniec.ImportTemplates(
        iter([rpb.ImportTemplatesRequest(context=ctx, batch_number=0, records=records)]),
        timeout=60,
    )
    assert answer.accepted == len(IMPORT_DNIS)
    assert answer.rejected == 2
    out.errors += [str(r) for r in answer.rejects]
    reniec.RecordObjection(
        rpb.RecordObjectionRequest(
            context=c.RequestContext(reference="OBJ-2026-0077"), dni=IMPORT_DNIS[2]
        ),
        timeout=30,
    )
    reniec.RemoveSubject(rpb.RemoveSubjectRequest(context=ctx, dni=IMPORT_DNIS[3]), timeout=30)
    muni_ch = srv.channel("muni-miraflores")
    muni_registry = rgrpc.RegistryServiceStub(muni_ch)
    _expect_error(
        out,
        lambda: muni_registry.RemoveSubject(
            rpb.RemoveSubjectRequest(context=ctx, dni=IMPORT_DNIS[4]), timeout=30
        ),
    )
    # PNP administration: a requisitoria with a DNI, a vehicle, an authorisation naming a
    # person; a duplicate warrant and a malformed plate.
    admin_ch = srv.channel("pnp-admin")
    admin = wgrpc.WatchlistServiceStub(admin_ch)
    admin_ctx = c.RequestContext(reference="ORD-2026-000555", operator_id="op-pnp-admin-0001")
    template = w.identities[5]
    out.vectors.append(template.astype(np.float32))
    create = wpb.CreateRequisitionRequest(
        context=admin_ctx,
        warrant_id="W-2026-000555",
        issuing_court="Juzgado Penal 3 de Lima",
        offence_category="ROBO_AGRAVADO",
        issued_at=_ts(-dt.timedelta(days=1)),
        expires_at=_ts(dt.timedelta(days=30)),
        dni=NEW_WANTED_DNI,
        templates=wpb.TemplateSet(
            templates=[c.FaceTemplate(model_id=w.model_id, vector=template.tolist())]
        ),
    )
    admin.CreateRequisition(create, timeout=30)
    _expect_error(out, lambda: admin.CreateRequisition(create, timeout=30))
    admin.ReportStolenVehicle(
        wpb.ReportStolenVehicleRequest(
            context=c.RequestContext(reference="DEN-2026-000888"),
            plate=PLATE_2,
            police_report_id="DEN-2026-000888",
            report_category="ROBO",
        ),
        timeout=30,
    )
    _expect_error(
        out,
        lambda: admin.ReportStolenVehicle(
            wpb.ReportStolenVehicleRequest(
                context=c.RequestContext(reference="DEN-2026-000889"),
                plate=PLATE_2 + "?",
                police_report_id="DEN-2026-000889",
                report_category="ROBO",
            ),
            timeout=30,
        ),
    )
    auth = wpb.JudicialAuthorisation(
        authorisation_id="AUT-2026-SECRETS-1",
        court="Juzgado de Investigacion Preparatoria Lima 2",
        site_ids=[MIRA_SITE],
        offence_categories=["ROBO_AGRAVADO"],
        not_before=_ts(-dt.timedelta(days=1)),
        not_after=_ts(dt.timedelta(days=30)),
    )
    admin.RegisterAuthorisation(
        wpb.RegisterAuthorisationRequest(
            context=c.RequestContext(reference="RJ-2026-0077"),
            authorisation=auth,
            named_dnis=[NAMED_DNI],
        ),
        timeout=30,
    )
    _expect_error(
        out,
        lambda: admin.RegisterAuthorisation(
            wpb.RegisterAuthorisationRequest(
                context=c.RequestContext(reference="RJ-2026-0078"),
                authorisation=auth,
                named_dnis=[NAMED_DNI + "0"],
            ),
            timeout=30,
        ),
    )
    # Compliance reads the log as it is handed out.
    audit_ch = srv.channel("compliance")
    stub = agrpc.AuditServiceStub(audit_ch)
    size = srv.app.components.audit.size
    for page in stub.ExportEntries(
        apb.ExportEntriesRequest(
            context=c.RequestContext(reference="CASE-2026-0077"), start=0, end=size
        ),
        timeout=60,
    ):
        out.exported += [e.entry for e in page.events]
    for ch in (reniec_ch, muni_ch, admin_ch, audit_ch):
        ch.close()


def _key_needles(srv: ServerThread) -> dict[str, bytes]:
    """Every secret of the run as raw bytes (text forms are derived in ``needles``)."""
    s = srv.settings
    keys_dir = s.effective_keys_dir
    found: dict[str, bytes] = {"audit HMAC key": (keys_dir / "audit-hmac.key").read_bytes()}
    signing = serialization.load_pem_private_key(
        (keys_dir / "audit-log.ed25519").read_bytes(), password=None
    )
    assert isinstance(signing, ed25519.Ed25519PrivateKey)
    found["audit signing key"] = signing.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    for kek in sorted(keys_dir.glob("*.kek")):
        found[f"KEK {kek.name}"] = bytes.fromhex(kek.read_text().strip())
    keyring = srv.app.components.matcher.store.keyring
    for owner in ("pnp", "reniec"):
        for purpose in ("data", "index"):
            _, key = keyring.current(owner, purpose)
            found[f"{owner} {purpose} key"] = bytes(key)
    for pem in sorted(s.effective_certs_dir.glob("*.key")):
        tls_key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
        assert isinstance(tls_key, ec.EllipticCurvePrivateKey)
        found[f"TLS key {pem.name}"] = tls_key.private_numbers().private_value.to_bytes(32, "big")
    return found


def _is_key_file(path: Path, settings: Settings) -> bool:
    keys_dir = settings.effective_keys_dir.resolve()
    return keys_dir in path.resolve().parents or path.suffix == ".key"


def _read_files(out: Produced, data_dir: Path, settings: Settings, moment: str) -> None:
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and not _is_key_file(path, settings):
            out.files[Path(moment) / path.relative_to(data_dir)] = path.read_bytes()


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Produced]:
    previous = structlog.get_config()
    buffer = io.StringIO()
    logs.configure("debug", stream=buffer)
    data_dir = tmp_path_factory.mktemp("secrets") / "data"
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", shutdown_grace_s=1.0)
    try:
        srv = ServerThread(settings).start()
        world = populate(srv)
        out = Produced(server=srv, world=world)
        out.vectors += [world.identities[i].astype(np.float32) for i in range(2)]
        out.vectors += [v.astype(np.float32) for v in list(world.registry.values())[:3]]
        run_batch(out)
        out.key_needles = _key_needles(srv)
        audit = srv.app.components.audit
        out.audit = list(audit.entries(0, audit.size))
        srv.app.components.matcher.save_snapshots()  # the encrypted HNSW snapshots too
        _read_files(out, data_dir, settings, "running")  # the WAL while the server runs
        world.close()
        srv.stop()  # then everything flushed to disk
        _read_files(out, data_dir, settings, "stopped")
        out.logs = buffer.getvalue()
        yield out
    finally:
        structlog.configure(**previous)


# ---- the needles ---------------------------------------------------------------------------


def _text_forms(raw: bytes) -> list[str]:
    return [
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
    ]


def _vector_needles(vec: np.ndarray) -> tuple[list[str], list[bytes]]:
    """Text and byte forms of a vector, from components large enough to be specific."""
    v = vec.astype(np.float32)
    texts: list[str] = []
    # Negative components: a minus sign before "0." never occurs in timestamps or durations.
    for x in [x for x in v if x < -0.01][:4]:
        texts += [repr(float(x)), str(np.float32(x)), f"{float(x):.6f}"]
    raw = v.tobytes()
    blobs = [raw[i : i + 16] for i in range(0, 64, 16)]
    blobs.append(v.astype(np.float64).tobytes()[:16])
    texts += [raw[:24].hex(), base64.b64encode(raw[:24]).decode()]
    texts.append(hashlib.sha256(raw).hexdigest())
    return texts, blobs


def needles(out: Produced) -> dict[str, tuple[list[str], list[bytes]]]:
    """What must appear nowhere, by kind: (text needles, byte needles)."""
    found: dict[str, tuple[list[str], list[bytes]]] = {}
    key_texts: list[str] = ["PRIVATE KEY"]
    key_bytes: list[bytes] = []
    for raw in out.key_needles.values():
        key_texts += _text_forms(raw)
        key_bytes.append(raw)
    found["key material"] = (key_texts, key_bytes)
    plates = [PLATE, PLATE_2, *READS]
    plate_texts = plates + [p.replace("-", "") for p in plates]
    found["plate"] = (plate_texts + [hashlib.sha256(p.encode()).hexdigest() for p in plates], [])
    dnis = [WANTED_DNI, LIFTED_DNI, NAMED_DNI, NEW_WANTED_DNI, *IMPORT_DNIS, *REGISTRY_DNIS[:3]]
    found["DNI"] = (dnis + [hashlib.sha256(d.encode()).hexdigest() for d in dnis], [])
    found["name"] = ([NAME, "Quispe Mamani", NAME.upper()], [])
    vec_texts: list[str] = []
    vec_bytes: list[bytes] = []
    for vec in out.vectors:
        t, b = _vector_needles(vec)
        vec_texts += t
        vec_bytes += b
    found["face vector"] = (vec_texts, vec_bytes)
    return found


def leaks(out: Produced, where: str, text: str, data: bytes | None = None) -> list[str]:
    """The kinds of secret found in ``text`` (and in ``data`` for binary forms)."""
    data = text.encode("utf-8", "surrogateescape") if data is None else data
    found = []
    for kind, (texts, blobs) in needles(out).items():
        hits = [t for t in texts if t and t.encode() in data]
        hits += ["<bytes>" for b in blobs if b in data]
        if hits:
            found.append(f"{where}: {kind} ({len(hits)} forms)")
    return found


# ---- the scans -----------------------------------------------------------------------------


def test_the_batch_ran_and_failed_where_it_should(produced: Produced) -> None:
    codes = set(produced.codes)
    assert codes >= {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ALREADY_EXISTS,
    }
    assert len(produced.errors) >= 15
    assert produced.logs.count('"event": "rpc"') >= 30
    assert len(produced.audit) >= 25
    assert produced.exported == produced.audit[: len(produced.exported)]
    names = {str(p) for p in produced.files}
    assert {"running/centinela.db", "stopped/centinela.db"} <= names
    assert any(n.startswith("running/snapshots/") for n in names)
    assert not any(p.suffix == ".kek" or p.suffix == ".key" for p in produced.files)
    # Every secret was found, so every needle list is real.
    assert len(produced.key_needles) >= 2 + 2 + 4 + 2
    assert all(len(v) >= 32 for v in produced.key_needles.values())


def test_no_secret_in_the_logs(produced: Produced) -> None:
    assert leaks(produced, "logs", produced.logs) == []


def test_no_secret_in_what_failed_callers_received(produced: Produced) -> None:
    assert leaks(produced, "errors", "\n".join(produced.errors)) == []


def test_no_secret_in_the_audit_entries(produced: Produced) -> None:
    entries = b"\n".join(produced.audit + produced.exported)
    assert leaks(produced, "audit", entries.decode(), entries) == []
    assert b"hmac-sha256:" in entries  # the audit keeps keyed digests instead


def test_no_secret_in_the_files_of_the_data_directory(produced: Produced) -> None:
    found: list[str] = []
    for path, data in produced.files.items():
        text = data.decode("latin-1")
        found += leaks(produced, str(path), text, data)
    assert found == []


def test_the_scan_finds_a_planted_plate(produced: Produced) -> None:
    """A plate logged by mistake through the same logger is caught (the scan is not blind);
    so are a DNI in an error text and a vector component in a file."""
    buffer = io.StringIO()
    previous = structlog.get_config()
    logs.configure("debug", stream=buffer)
    try:
        logs.get_logger("server.rpc").info("match.plate_read", read=PLATE.replace("-", ""))
    finally:
        structlog.configure(**previous)
    assert leaks(produced, "logs", produced.logs + buffer.getvalue())
    assert leaks(produced, "errors", f"dni: {IMPORT_DNIS[0]} must be 8 digits")
    vec = produced.vectors[0]
    assert leaks(produced, "file", "", b"\0" * 7 + vec.astype(np.float32).tobytes()[16:32])
    assert leaks(produced, "file", json.dumps([float(x) for x in vec]))
    hmac_key = next(iter(produced.key_needles.values()))
    assert leaks(produced, "logs", base64.b64encode(hmac_key).decode())
    assert leaks(produced, "file", "", struct.pack("<I", 7) + hmac_key)
