"""Administrative and registry changes commit with their audit entry, or not at all.

Each test breaks the audit log of a running server (real SQLite or PostgreSQL, real mTLS,
real store) and checks that every change RPC answers UNAVAILABLE and leaves every table of
records and templates exactly as it was; then that the server recovers and a change is in
the audit log with its record changed.

* SQLite: the leaf table is renamed away, as the match fail-closed test does, so the append
  fails before anything of its transaction is written.
* PostgreSQL: a deferred constraint trigger refuses the audit leaf *at commit time*, after
  the change's rows were written in the same transaction: only a change that is truly part
  of the entry's transaction disappears with it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import sqlalchemy as sa
from google.protobuf.field_mask_pb2 import FieldMask

from centinela.config import Settings
from centinela.matcher.synth import identities
from centinela.server.testing import ServerThread
from centinela.v1 import common_pb2 as c
from centinela.v1 import registry_service_pb2 as rpb
from centinela.v1 import registry_service_pb2_grpc as rgrpc
from centinela.v1 import watchlist_service_pb2 as wpb
from centinela.v1 import watchlist_service_pb2_grpc as wgrpc

#: Every table an administrative or registry change may write.
TABLES = {
    "sites": "site_id",
    "authorisations": "authorisation_id",
    "requisitions": "requisition_id",
    "vehicles": "vehicle_id",
    "matcher_subjects": "subject_ref",
    "matcher_templates": "template_id",
    "matcher_plates": "plate_ref",
    "matcher_seq": "id",
}
SITE = "mira-cam-0001"
REGISTRY_DNIS = ["71000001", "71000002", "71000003"]
OBJECTOR_DNI = "71000003"


def _ts(when: dt.datetime) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    t.FromDatetime(when)
    return t


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ctx(reference: str = "ORD-2026-000123") -> c.RequestContext:
    return c.RequestContext(
        reference=reference, operator_id="op-pnp-admin-0001", client_request_id=uuid.uuid4().hex
    )


@dataclasses.dataclass
class Handles:
    """Stubs and the objects the setup created."""

    server: ServerThread
    admin: wgrpc.WatchlistServiceStub
    registry: rgrpc.RegistryServiceStub
    model: str
    vectors: np.ndarray
    requisition: str = ""
    vehicle: str = ""

    @property
    def engine(self) -> sa.Engine:
        engine: sa.Engine = self.server.app.components.engine
        return engine

    def fingerprint(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table a change may write."""
        out = {}
        with self.engine.connect() as conn:
            for table, key in TABLES.items():
                rows = conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY {key}")  # noqa: S608
                out[table] = [tuple(r) for r in rows]
        return out

    def entries(self, start: int) -> list[dict[str, Any]]:
        log = self.server.app.components.audit
        return [json.loads(e) for e in log.entries(start, log.size)]


def _import(h: Handles, dnis: list[str], vecs: np.ndarray, number: int = 0) -> Any:
    records = [
        rpb.RegistryRecord(dni=d, model_id=h.model, vector=v.tolist())
        for d, v in zip(dnis, vecs, strict=True)
    ]
    msg = rpb.ImportTemplatesRequest(
        context=c.RequestContext(reference="RES-REN-2026-01"), batch_number=number, records=records
    )
    return h.registry.ImportTemplates(iter([msg]), timeout=30)


def _requisition(h: Handles, warrant: str, vec: np.ndarray) -> Any:
    return h.admin.CreateRequisition(
        wpb.CreateRequisitionRequest(
            context=_ctx(),
            warrant_id=warrant,
            issuing_court="Juzgado Penal 3 de Lima",
            offence_category="ROBO_AGRAVADO",
            expires_at=_ts(_now() + dt.timedelta(days=60)),
            templates=wpb.TemplateSet(templates=[c.FaceTemplate(model_id=h.model, vector=vec)]),
        ),
        timeout=30,
    )


def _setup(server: ServerThread) -> Handles:
    """One of everything the change RPCs act on, made through the API."""
    model = str(server.app.components.face_model_id)
    h = Handles(
        server,
        wgrpc.WatchlistServiceStub(server.channel("pnp-admin")),
        rgrpc.RegistryServiceStub(server.channel("reniec")),
        model,
        identities(12, seed=31),
    )
    h.admin.RegisterSite(
        wpb.RegisterSiteRequest(
            context=_ctx(),
            site=wpb.Site(
                site_id=SITE,
                municipality="muni-miraflores",
                region="lima",
                kind=wpb.SITE_KIND_CAMERA,
            ),
        ),
        timeout=30,
    )
    h.requisition = _requisition(h, "W-2026-000001", h.vectors[0]).requisition.requisition_id
    h.vehicle = h.admin.ReportStolenVehicle(
        wpb.ReportStolenVehicleRequest(
            context=_ctx("DEN-2026-000777"),
            plate="ABC-123",
            police_report_id="DEN-2026-000777",
            report_category="ROBO",
        ),
        timeout=30,
    ).vehicle.vehicle_id
    h.admin.RegisterAuthorisation(_authorisation("AUT-2026-000001", []), timeout=30)
    _import(h, REGISTRY_DNIS, h.vectors[1:4])
    h.registry.RecordObjection(
        rpb.RecordObjectionRequest(context=_ctx("OBJ-2026-000001"), dni=OBJECTOR_DNI), timeout=30
    )
    server.app.components.matcher.catch_up()
    return h


def _authorisation(auth_id: str, dnis: list[str]) -> wpb.RegisterAuthorisationRequest:
    return wpb.RegisterAuthorisationRequest(
        context=_ctx(),
        authorisation=wpb.JudicialAuthorisation(
            authorisation_id=auth_id,
            court="Juzgado de Investigacion Preparatoria Lima 2",
            site_ids=[SITE],
            offence_categories=["ROBO_AGRAVADO"],
            not_before=_ts(_now() - dt.timedelta(days=1)),
            not_after=_ts(_now() + dt.timedelta(days=30)),
        ),
        named_dnis=dnis,
    )


def _changes(h: Handles) -> dict[str, Callable[[], Any]]:
    """Every administrative and registry change RPC, each one that would succeed."""
    a, r = h.admin, h.registry
    later = _ts(_now() + dt.timedelta(days=90))
    return {
        "RegisterSite": lambda: a.RegisterSite(
            wpb.RegisterSiteRequest(
                context=_ctx(),
                site=wpb.Site(
                    site_id="mira-cam-0002",
                    municipality="muni-miraflores",
                    region="lima",
                    kind=wpb.SITE_KIND_CAMERA,
                ),
            ),
            timeout=30,
        ),
        "DeactivateSite": lambda: a.DeactivateSite(
            wpb.DeactivateSiteRequest(context=_ctx(), site_id=SITE), timeout=30
        ),
        "CreateRequisition": lambda: _requisition(h, "W-2026-000002", h.vectors[5]),
        "CreateRequisition(dni)": lambda: a.CreateRequisition(
            wpb.CreateRequisitionRequest(
                context=_ctx(),
                warrant_id="W-2026-000003",
                issuing_court="Juzgado Penal 3 de Lima",
                offence_category="ROBO_AGRAVADO",
                expires_at=later,
                dni=REGISTRY_DNIS[0],
            ),
            timeout=30,
        ),
        "UpdateRequisition": lambda: a.UpdateRequisition(
            wpb.UpdateRequisitionRequest(
                context=_ctx(),
                requisition_id=h.requisition,
                requisition=wpb.Requisition(expires_at=later),
                update_mask=FieldMask(paths=["expires_at"]),
            ),
            timeout=30,
        ),
        "LiftRequisition": lambda: a.LiftRequisition(
            wpb.LiftRequisitionRequest(
                context=_ctx(), requisition_id=h.requisition, reason="captured"
            ),
            timeout=30,
        ),
        "ReportStolenVehicle": lambda: a.ReportStolenVehicle(
            wpb.ReportStolenVehicleRequest(
                context=_ctx("DEN-2026-000778"),
                plate="XYZ-987",
                police_report_id="DEN-2026-000778",
                report_category="ROBO",
            ),
            timeout=30,
        ),
        "RecoverVehicle": lambda: a.RecoverVehicle(
            wpb.RecoverVehicleRequest(context=_ctx(), vehicle_id=h.vehicle), timeout=30
        ),
        "RegisterAuthorisation": lambda: a.RegisterAuthorisation(
            _authorisation("AUT-2026-000002", ["72000001"]), timeout=30
        ),
        "RevokeAuthorisation": lambda: a.RevokeAuthorisation(
            wpb.RevokeAuthorisationRequest(context=_ctx(), authorisation_id="AUT-2026-000001"),
            timeout=30,
        ),
        "ImportTemplates": lambda: _import(h, ["72000002", "72000003"], h.vectors[6:8], 1),
        "ImportTemplates(replace)": lambda: _import(h, REGISTRY_DNIS[1:2], h.vectors[8:9], 2),
        "RemoveSubject": lambda: r.RemoveSubject(
            rpb.RemoveSubjectRequest(context=_ctx(), dni=REGISTRY_DNIS[1]), timeout=30
        ),
        "RecordObjection": lambda: r.RecordObjection(
            rpb.RecordObjectionRequest(context=_ctx("OBJ-2026-000002"), dni=REGISTRY_DNIS[0]),
            timeout=30,
        ),
        "RecordObjection(new subject)": lambda: r.RecordObjection(
            rpb.RecordObjectionRequest(context=_ctx("OBJ-2026-000003"), dni="72000009"),
            timeout=30,
        ),
        "WithdrawObjection": lambda: r.WithdrawObjection(
            rpb.WithdrawObjectionRequest(context=_ctx("OBJ-2026-000001-W"), dni=OBJECTOR_DNI),
            timeout=30,
        ),
    }


def _code(fn: Callable[[], Any]) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


def _assert_nothing_applied(h: Handles) -> None:
    """Every change RPC answers UNAVAILABLE and writes nothing (all checked, all reported)."""
    faults = []
    for name, call in _changes(h).items():
        before = h.fingerprint()
        code = _code(call)
        if code != grpc.StatusCode.UNAVAILABLE:
            faults.append(f"{name} answered {code.name}")
        if h.fingerprint() != before:
            faults.append(f"{name} changed the database without its entry")
    assert faults == []


def _assert_recovered_and_audited(h: Handles) -> None:
    """A lift and an import after the audit is back: both applied, both in the log."""
    start = h.server.app.components.audit.size
    lifted = _changes(h)["LiftRequisition"]()
    assert lifted.requisition.state == wpb.REQUISITION_STATE_LIFTED
    stored = h.server.app.components.records.get_requisition(h.requisition)
    assert stored.lifted_at is not None
    imported = _import(h, ["72000002", "72000003"], h.vectors[6:8], 1)
    assert imported.accepted == 2
    store = h.server.app.components.matcher.store
    subject = store.find_subject("reniec", "72000002")
    assert subject is not None
    assert len(store.templates_of(subject)) == 1
    entries = h.entries(start)
    lift = [e for e in entries if e["decision_id"] == lifted.decision.decision_id]
    assert [(x["type"], x["outcome"], x["refs"]["requisition"]) for x in lift] == [
        ("ADMIN_CHANGE", "CHANGED", h.requisition)
    ]
    batch = [e for e in entries if e["decision_id"] == imported.decision.decision_id]
    assert [(x["type"], x["outcome"], x["metrics"]["accepted"]) for x in batch] == [
        ("REGISTRY_CHANGE", "IMPORTED", 2)
    ]
    # The answers cite the entries that recorded them.
    log = h.server.app.components.audit
    cited = json.loads(log.entries(lifted.decision.audit_index, lifted.decision.audit_index + 1)[0])
    assert cited["decision_id"] == lifted.decision.decision_id


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0")) as server:
        yield server


def test_audit_failure_applies_no_change_sqlite(sqlite_server: ServerThread) -> None:
    h = _setup(sqlite_server)
    saboteur = sa.create_engine(sqlite_server.settings.effective_database_url)
    with saboteur.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE audit_leaves RENAME TO audit_leaves_gone")
    try:
        _assert_nothing_applied(h)
    finally:
        with saboteur.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE audit_leaves_gone RENAME TO audit_leaves")
        saboteur.dispose()
    _assert_recovered_and_audited(h)


@pytest.mark.postgres
def test_change_and_entry_are_one_transaction_postgresql(pg_url: str, tmp_path: Path) -> None:
    """The audit leaf is refused at COMMIT, after the change's rows were written."""
    settings = Settings(data_dir=tmp_path / "d", database_url=pg_url, listen="127.0.0.1:0")
    with ServerThread(settings) as server:
        h = _setup(server)
        saboteur = sa.create_engine(pg_url)
        with saboteur.begin() as conn:
            conn.exec_driver_sql(
                "CREATE FUNCTION test_refuse_leaf() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'audit leaf refused at commit (test)'; END $$"
            )
            conn.exec_driver_sql(
                "CREATE CONSTRAINT TRIGGER test_refuse_leaf AFTER INSERT ON audit_leaves "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_refuse_leaf()"
            )
        try:
            _assert_nothing_applied(h)
        finally:
            with saboteur.begin() as conn:
                conn.exec_driver_sql("DROP TRIGGER test_refuse_leaf ON audit_leaves")
            saboteur.dispose()
        _assert_recovered_and_audited(h)
