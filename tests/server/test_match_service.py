"""MatchService end to end over mutual TLS: the legal rules as a scenario table.

Each scenario names the rule it exercises (LEGAL_RULES.md). The server is real: TLS with the
dev role certificates, SQLite, the embedded Rego engine with the shipped bundle, hnswlib.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import sqlalchemy as sa

from centinela.clients.retry import retryable
from centinela.config import Settings
from centinela.server.demo import LAV_SITE, MIRA_SITE, PLATE, World, populate, rid, serving_world
from centinela.server.testing import ServerThread, bundle_variant
from centinela.v1 import common_pb2 as c
from centinela.v1 import match_service_pb2 as mpb


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with serving_world(tmp_path_factory.mktemp("world")) as w:
        yield w


def _code(err: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    code: grpc.StatusCode = cast(Any, err.value).code()
    return code


def _trailer(err: grpc.RpcError, key: str) -> str:
    for k, v in cast(Any, err).trailing_metadata() or ():
        if k == key:
            return str(v)
    return ""


# ---- allowed cases -------------------------------------------------------------------------


def test_r2_r10_municipality_finds_wanted_person_with_minimal_answer(world: World) -> None:
    resp = world.stub("muni-miraflores").MatchFace(world.face_request(world.genuine(0)), timeout=30)
    assert resp.alert
    assert len(resp.candidates) == 1
    cand = resp.candidates[0]
    assert cand.reference == world.wanted_requisition
    assert cand.offence_category == "ROBO_AGRAVADO"
    assert cand.requires_human_review  # R9
    assert cand.alert_id.startswith("alt_")
    assert cand.subject_ref == ""  # R10: no pseudonymous subject for a municipality
    assert resp.decision.decision_id.startswith("dec_")
    assert resp.decision.audit_index > 0


def test_r10_stranger_raises_no_alert_and_no_candidates(world: World) -> None:
    resp = world.stub("muni-miraflores").MatchFace(world.face_request(world.stranger()), timeout=30)
    assert not resp.alert
    assert list(resp.candidates) == []  # never sub-threshold candidates


def test_r6_lifted_requisition_never_alerts(world: World) -> None:
    resp = world.stub("muni-miraflores").MatchFace(world.face_request(world.genuine(1)), timeout=30)
    assert not resp.alert


def test_r2_plate_alert_and_lookalike_read(world: World) -> None:
    stub = world.stub("muni-miraflores")
    exact = stub.MatchPlate(world.plate_request(PLATE), timeout=30)
    assert exact.alert
    assert exact.candidates[0].police_report_id == "DEN-2026-000777"
    lookalike = stub.MatchPlate(world.plate_request("A8C 123"), timeout=30)  # 8 for B
    assert lookalike.alert
    other = stub.MatchPlate(world.plate_request("AXC-123"), timeout=30)  # a real difference
    assert not other.alert


# ---- denied cases --------------------------------------------------------------------------


DENIALS = [
    # (rule, identity, request builder, expected code)
    (
        "R5",
        "muni-miraflores",
        lambda w: w.face_request(w.genuine(0), site=LAV_SITE),
        grpc.StatusCode.PERMISSION_DENIED,
    ),
    (
        "R2",
        "muni-miraflores",
        lambda w: w.face_request(w.genuine(0), galleries=(c.GALLERY_RENIEC_REGISTRY,)),
        grpc.StatusCode.PERMISSION_DENIED,
    ),
    (
        "R3",
        "pnp-investigator",
        lambda w: w.face_request(
            w.stranger(),
            site=MIRA_SITE,
            purpose=c.PURPOSE_JUDICIAL_INVESTIGATION,
            galleries=(c.GALLERY_RENIEC_REGISTRY,),
            mode=c.SEARCH_MODE_INVESTIGATION,
            authorisation_id="JUZ-UNKNOWN-0001",
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    ),
    ("R1", "compliance", lambda w: w.face_request(w.genuine(0)), grpc.StatusCode.PERMISSION_DENIED),
    (
        "R13",
        "muni-miraflores",
        lambda w: w.face_request(w.genuine(0), quality=0.1),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
]


@pytest.mark.parametrize(
    ("rule", "identity", "build", "code"), DENIALS, ids=[d[0] for d in DENIALS]
)
def test_denials_carry_rule_ids_and_are_audited(
    world: World, rule: str, identity: str, build: Any, code: grpc.StatusCode
) -> None:
    audit = world.server.app.components.audit
    before = audit.size
    with pytest.raises(grpc.RpcError) as err:
        world.stub(identity).MatchFace(build(world), timeout=30)
    assert _code(err) == code
    rules = _trailer(err.value, "x-centinela-rule-ids").split(",")
    decision_id = _trailer(err.value, "x-centinela-decision-id")
    if rule != "R1":  # a compliance officer is denied for having no grant at all
        assert rule in rules, rules
    assert decision_id.startswith("dec_")
    assert audit.size == before + 1  # the denial itself is in the log
    entry = json.loads(audit.entries(before, before + 1)[0])
    assert entry["type"] == "DENIAL"
    assert entry["decision_id"] == decision_id


@pytest.mark.parametrize(
    ("mutate", "code", "field"),
    [
        (
            lambda r: r.context.ClearField("purpose"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "context.purpose",
        ),
        (
            lambda r: r.probe.ClearField("model_id"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "probe.model_id",
        ),
        (
            lambda r: setattr(r.probe, "model_id", "other-model:0000"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "probe.model_id",
        ),
        (lambda r: r.probe.vector.extend([0.0]), grpc.StatusCode.INVALID_ARGUMENT, "probe.vector"),
        (
            lambda r: r.probe.vector.__setitem__(3, float("nan")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "probe.vector",
        ),
        (
            lambda r: r.context.ClearField("capture_time"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "context.capture_time",
        ),
        (
            lambda r: r.context.ClearField("site_id"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "context.site_id",
        ),
        # A site id the audit log cannot hold as a label is refused as input, not failed
        # closed as UNAVAILABLE when its entry is refused.
        (
            lambda r: setattr(r.context, "site_id", "9/portico"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "context.site_id",
        ),
    ],
)
def test_validation_names_the_field(
    world: World, mutate: Any, code: grpc.StatusCode, field: str
) -> None:
    req = world.face_request(world.genuine(0))
    mutate(req)
    with pytest.raises(grpc.RpcError) as err:
        world.stub("muni-miraflores").MatchFace(req, timeout=30)
    assert _code(err) == code
    assert field in (err.value.details() or "")


# ---- idempotency, streaming, confirmation ------------------------------------------------


def test_retry_with_same_request_id_is_answered_once_and_audited_once(world: World) -> None:
    audit = world.server.app.components.audit
    req = world.face_request(world.genuine(0), request_id="retry-" + rid())
    stub = world.stub("muni-miraflores")
    first = stub.MatchFace(req, timeout=30)
    size = audit.size
    second = stub.MatchFace(req, timeout=30)
    assert second.decision.decision_id == first.decision.decision_id
    assert audit.size == size


def test_reused_request_id_with_another_request_is_refused(world: World) -> None:
    stub = world.stub("muni-miraflores")
    req = world.face_request(world.genuine(0), request_id="reuse-" + rid())
    stub.MatchFace(req, timeout=30)
    other = world.face_request(world.stranger(), request_id=req.context.client_request_id)
    with pytest.raises(grpc.RpcError) as err:
        stub.MatchFace(other, timeout=30)
    assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert "client_request_id" in (err.value.details() or "")


def test_a_probe_that_meets_an_unreachable_database_fails_alone(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database error no component mapped, met by one StreamMatch probe, fails that probe
    UNAVAILABLE (the portico may send it again) and the stream goes on. Injected: every
    probe path maps its own database errors today (``tests/reliability`` stops a real
    PostgreSQL under StreamMatch), so only a raised error can reach this backstop."""
    servicer = world.server.app.servicers.match
    real = servicer._match_face
    calls = 0

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        return await real(*args, **kwargs)

    monkeypatch.setattr(servicer, "_match_face", flaky)
    msgs = [
        mpb.StreamMatchRequest(sequence=i, face=world.face_request(world.genuine(0)))
        for i in (1, 2)
    ]
    answers = list(world.stub("muni-miraflores").StreamMatch(iter(msgs), timeout=60))
    assert [a.sequence for a in answers] == [1, 2]
    assert answers[0].WhichOneof("result") == "error"
    assert answers[0].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "OperationalError" in answers[0].error.message
    assert "server closed" not in answers[0].error.message  # the class, never the text
    assert answers[1].face.alert


def test_stream_answers_in_order_and_survives_a_bad_message(world: World) -> None:
    good = world.face_request(world.genuine(0))
    bad = world.face_request(world.genuine(0))
    bad.probe.vector.append(0.5)
    plate = world.plate_request(PLATE)
    msgs = [
        mpb.StreamMatchRequest(sequence=1, face=good),
        mpb.StreamMatchRequest(sequence=2, face=bad),
        mpb.StreamMatchRequest(sequence=3, plate=plate),
    ]
    answers = list(world.stub("muni-miraflores").StreamMatch(iter(msgs), timeout=60))
    assert [a.sequence for a in answers] == [1, 2, 3]
    assert answers[0].face.alert
    assert answers[1].WhichOneof("result") == "error"
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers[1].error.field == "probe.vector"
    assert answers[2].plate.alert


def test_pipelined_stream_answers_every_probe_in_order(world: World) -> None:
    """A portico sends 48 probes without waiting: faces, plates and bad messages interleaved.

    The server works on several at once (STREAM_WINDOW) but answers in arrival order, each
    with its own result; the hits among them are exactly the genuine probes.
    """
    from centinela.server.match_service import STREAM_WINDOW

    n = 3 * STREAM_WINDOW
    msgs = []
    for i in range(n):
        if i % 6 == 0:
            bad = world.face_request(world.genuine(0))
            bad.probe.vector.append(0.5)
            msgs.append(mpb.StreamMatchRequest(sequence=i, face=bad))
        elif i % 3 == 0:
            msgs.append(mpb.StreamMatchRequest(sequence=i, plate=world.plate_request(PLATE)))
        elif i % 2 == 0:
            msgs.append(
                mpb.StreamMatchRequest(sequence=i, face=world.face_request(world.genuine(0)))
            )
        else:
            msgs.append(
                mpb.StreamMatchRequest(sequence=i, face=world.face_request(world.stranger(i)))
            )
    answers = list(world.stub("muni-miraflores").StreamMatch(iter(msgs), timeout=120))
    assert [a.sequence for a in answers] == list(range(n))
    for i, a in enumerate(answers):
        if i % 6 == 0:
            assert a.WhichOneof("result") == "error", i
            assert a.error.field == "probe.vector"
        elif i % 3 == 0:
            assert a.plate.alert, i
        else:
            assert a.WhichOneof("result") == "face", i
            assert a.face.alert == (i % 2 == 0), i
    ids = [a.face.decision.decision_id for a in answers if a.WhichOneof("result") == "face"]
    assert len(set(ids)) == len(ids)  # each probe its own decision and audit entry


def test_r9_interim_one_confirmation_makes_an_alert_actionable(world: World) -> None:
    resp = world.stub("muni-miraflores").MatchFace(world.face_request(world.genuine(0)), timeout=30)
    alert_id = resp.candidates[0].alert_id
    confirm = world.stub("muni-miraflores").ConfirmAlert(
        mpb.ConfirmAlertRequest(
            context=c.RequestContext(operator_id="op-serenazgo-00001", client_request_id=rid()),
            alert_id=alert_id,
            verdict=mpb.ALERT_VERDICT_CONFIRMED,
        ),
        timeout=30,
    )
    assert confirm.state == mpb.ALERT_STATE_CONFIRMED
    assert confirm.actionable
    assert confirm.confirmations_required == 1


def test_r10_other_municipality_cannot_confirm_an_alert(world: World) -> None:
    resp = world.stub("muni-miraflores").MatchFace(world.face_request(world.genuine(0)), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        world.stub("muni-la-victoria").ConfirmAlert(
            mpb.ConfirmAlertRequest(
                context=c.RequestContext(operator_id="op-lavictoria-0001"),
                alert_id=resp.candidates[0].alert_id,
                verdict=mpb.ALERT_VERDICT_CONFIRMED,
            ),
            timeout=30,
        )
    assert _code(err) == grpc.StatusCode.NOT_FOUND


def test_r4_verification_answers_match_and_score_only(world: World) -> None:
    dni, vec = next(iter(world.registry.items()))
    from centinela.matcher import synth

    probe = [float(x) for x in synth.genuine_probes(vec[None, :], seed=3)[0]]
    req = mpb.VerifyFaceRequest(
        context=c.RequestContext(
            purpose=c.PURPOSE_IDENTITY_VERIFICATION,
            client_request_id=rid(),
            operator_id="op-pnp-officer-01",
        ),
        probe=c.FaceProbe(model_id=world.model_id, vector=probe, quality=0.9),
        dni=dni,
    )
    resp = world.stub("pnp-officer").VerifyFace(req, timeout=30)
    assert resp.match
    assert 0.4 < resp.score <= 1.0
    assert set(f.name for f, _ in resp.ListFields()) <= {"decision", "match", "score"}
    req.dni = "79999999"  # nobody: no match, no error that reveals registry membership
    req.context.client_request_id = rid()
    resp = world.stub("pnp-officer").VerifyFace(req, timeout=30)
    assert not resp.match
    with pytest.raises(grpc.RpcError) as err:
        world.stub("muni-miraflores").VerifyFace(req, timeout=30)
    assert _code(err) == grpc.StatusCode.PERMISSION_DENIED


# ---- framework switches --------------------------------------------------------------------


def test_r12_kill_switch_stops_faces_but_not_plates(tmp_path: Path) -> None:
    bundle = bundle_variant(tmp_path, "interim", {"framework.facial_matching_enabled": False})
    settings = Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0", policy_bundle=str(bundle))
    with ServerThread(settings) as server:
        w = populate(server, registry=False)
        with pytest.raises(grpc.RpcError) as err:
            w.stub("muni-miraflores").MatchFace(w.face_request(w.genuine(0)), timeout=30)
        assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION
        assert "R12" in _trailer(err.value, "x-centinela-rule-ids")
        assert w.stub("muni-miraflores").MatchPlate(w.plate_request(PLATE), timeout=30).alert
        w.close()


def test_r14_rate_ceiling_sheds_with_resource_exhausted(tmp_path: Path) -> None:
    bundle = bundle_variant(
        tmp_path,
        "interim",
        {"rate_ceilings.municipality": {"caller_per_minute": 3, "site_per_minute": 3}},
    )
    settings = Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0", policy_bundle=str(bundle))
    with ServerThread(settings) as server:
        w = populate(server, registry=False)
        stub = w.stub("muni-miraflores")
        for _ in range(3):
            stub.MatchPlate(w.plate_request(PLATE), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            stub.MatchPlate(w.plate_request(PLATE), timeout=30)
        assert _code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "R14" in _trailer(err.value, "x-centinela-rule-ids")
        assert not retryable(err.value)  # an answer (a ceiling), not a shed: never re-sent
        w.close()


def test_r9_draft_2026_needs_two_distinct_people(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0", policy_bundle="draft-2026")
    with ServerThread(settings) as server:
        w = populate(server, registry=False)
        resp = w.stub("muni-miraflores").MatchFace(w.face_request(w.genuine(0)), timeout=30)
        assert resp.confirmations_required == 2
        alert_id = resp.candidates[0].alert_id

        def confirm(operator: str) -> mpb.ConfirmAlertResponse:
            return w.stub("muni-miraflores").ConfirmAlert(
                mpb.ConfirmAlertRequest(
                    context=c.RequestContext(operator_id=operator, client_request_id=rid()),
                    alert_id=alert_id,
                    verdict=mpb.ALERT_VERDICT_CONFIRMED,
                ),
                timeout=30,
            )

        assert confirm("op-serenazgo-00001").state == mpb.ALERT_STATE_PARTIALLY_CONFIRMED
        again = confirm("op-serenazgo-00001")  # the same person twice counts once
        assert again.confirmations == 1
        assert not again.actionable
        final = confirm("op-serenazgo-00002")
        assert final.state == mpb.ALERT_STATE_CONFIRMED
        assert final.actionable
        w.close()


# ---- fail closed and no personal data ------------------------------------------------------


def test_audit_failure_fails_closed_and_recovers(tmp_path: Path) -> None:
    """Break the audit table under a running server: no answer without its entry."""
    import sqlalchemy as sa

    settings = Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0")
    with ServerThread(settings) as server:
        w = populate(server, registry=False)
        stub = w.stub("muni-miraflores")
        alerts_before = server.app.components.alerts.since(0)
        saboteur = sa.create_engine(settings.effective_database_url)
        with saboteur.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE audit_leaves RENAME TO audit_leaves_gone")
        try:
            with pytest.raises(grpc.RpcError) as err:
                stub.MatchFace(w.face_request(w.genuine(0)), timeout=30)
            assert _code(err) == grpc.StatusCode.UNAVAILABLE
            assert server.app.components.alerts.since(0) == alerts_before  # no alert either
        finally:
            with saboteur.begin() as conn:
                conn.exec_driver_sql("ALTER TABLE audit_leaves_gone RENAME TO audit_leaves")
            saboteur.dispose()
        resp = stub.MatchFace(w.face_request(w.genuine(0)), timeout=30)
        assert resp.alert  # the log recovered by itself
        w.close()


def test_policy_engine_failure_denies(tmp_path: Path) -> None:
    """Replace the engine under a running server by one that cannot answer: deny."""
    from centinela.policy import OpaServerEngine

    settings = Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0")
    with ServerThread(settings) as server:
        w = populate(server, registry=False)
        policy = server.app.components.policy
        dead = OpaServerEngine("http://127.0.0.1:9", policy.active.bundle, timeout_s=0.2)
        policy._active = dead  # breaking the component on purpose
        with pytest.raises(grpc.RpcError) as err:
            w.stub("muni-miraflores").MatchFace(w.face_request(w.genuine(0)), timeout=30)
        assert _code(err) == grpc.StatusCode.PERMISSION_DENIED
        assert "ENGINE_UNAVAILABLE" in _trailer(err.value, "x-centinela-rule-ids")
        w.close()


def test_policy_engine_timeout_denies(tmp_path: Path) -> None:
    """An engine that does not answer in time is a deny, and the call does not hang.

    The slow engine wraps the real embedded one and sleeps first: a stand-in for a hung
    rego-cpp evaluation, which cannot be produced on demand.
    """
    import time

    settings = Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0")
    with ServerThread(settings) as server:
        w = populate(server, registry=False)
        c = server.app.components
        real = c.policy.active

        class Slow:
            name = real.name
            bundle_digest = real.bundle_digest

            def decide(self, input: Any) -> Any:
                time.sleep(1.0)
                return real.decide(input)

            def set_dynamic_data(self, doc: Any) -> None:
                real.set_dynamic_data(doc)

        c.pipeline.policy_timeout_s = 0.2
        c.pipeline.cache.clear()
        c.policy._active = Slow()  # breaking the component on purpose
        with pytest.raises(grpc.RpcError) as err:
            w.stub("muni-miraflores").MatchFace(w.face_request(w.genuine(0)), timeout=30)
        assert _code(err) == grpc.StatusCode.PERMISSION_DENIED
        assert "ENGINE_UNAVAILABLE" in _trailer(err.value, "x-centinela-rule-ids")
        c.policy._active = real
        c.pipeline.policy_timeout_s = 5.0
        assert w.stub("muni-miraflores").MatchFace(w.face_request(w.genuine(0)), timeout=30).alert
        w.close()


def test_no_personal_data_in_logs_or_audit(world: World, capfd: pytest.CaptureFixture[str]) -> None:
    """Vectors, plates and DNIs go in; none of them (nor their plain SHA-256) comes out."""
    import hashlib

    from centinela.matcher import synth

    stub = world.stub("muni-miraflores")
    probe = world.genuine(0, seed=1234)
    stub.MatchFace(world.face_request(probe), timeout=30)
    stub.MatchPlate(world.plate_request(PLATE), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.MatchFace(world.face_request(probe, site=LAV_SITE), timeout=30)
    dni, vec = next(iter(world.registry.items()))
    verify = mpb.VerifyFaceRequest(
        context=c.RequestContext(purpose=c.PURPOSE_IDENTITY_VERIFICATION, client_request_id=rid()),
        probe=c.FaceProbe(
            model_id=world.model_id,
            quality=0.9,
            vector=[float(x) for x in synth.genuine_probes(vec[None, :], 2)[0]],
        ),
        dni=dni,
    )
    world.stub("pnp-officer").VerifyFace(verify, timeout=30)
    logs = capfd.readouterr()
    audit = world.server.app.components.audit
    entries = b"\n".join(audit.entries(0, audit.size)).decode()
    import numpy as np

    probe_bytes = np.asarray(probe, dtype=np.float32).tobytes()
    secrets_ = [
        PLATE,
        PLATE.replace("-", ""),
        dni,
        "41234567",
        f"{probe[0]:.6f}"[:9],
        f"{probe[1]:.6f}"[:9],
        hashlib.sha256(probe_bytes).hexdigest(),
        hashlib.sha256(PLATE.encode()).hexdigest(),
        hashlib.sha256(dni.encode()).hexdigest(),
    ]
    for text, where in ((logs.out + logs.err, "logs"), (entries, "audit")):
        for s in secrets_:
            assert s not in text, f"{where} leaks a personal value"
    assert "hmac-sha256:" in entries  # the audit keeps keyed digests instead
