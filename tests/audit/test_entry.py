"""Audit entries: canonical JSON, validated fields, keyed digests, never raw personal data."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import re
import secrets

import numpy as np
import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from centinela.audit.entry import (
    METRIC_KINDS,
    REF_KINDS,
    AuditEvent,
    Caller,
    Digester,
    EventType,
    artifact_digest,
    validate_entry_bytes,
)
from centinela.audit.log import AuditLog
from centinela.errors import InvalidArgument

KEY = secrets.token_bytes(32)
PLATES = ["ABC-123", "B7X-456", "AAA123", "F1A-999"]
DNIS = ["45678912", "07654321", "10293847"]


def test_entry_is_canonical_json_with_schema_fields() -> None:
    when = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
    ev = AuditEvent(
        EventType.MATCH_DECISION,
        request_id="3f2b8c1e-7d4a-4b9e-9c1f-2a6d8e0b5c71",
        decision_id="dec-01HZX3K9QWERTYZX",
        caller=Caller("pnp", "investigator", "op-a1b2c3d4e5f6"),
        purpose="JUDICIAL_INVESTIGATION",
        site_id="cam-lima-001",
        policy_bundle_digest=artifact_digest(b"bundle"),
        rule_ids=["R1", "R3"],
        outcome="ALLOW",
        refs={"authorization": "auth-2026-XK19QZ"},
        metrics={"score": 0.8731, "candidates": 3},
        time=when,
    )
    raw = ev.encode()
    assert raw == rfc8785.dumps(json.loads(raw))
    obj = json.loads(raw)
    assert obj["v"] == 1
    assert obj["type"] == "MATCH_DECISION"
    assert obj["time"] == "2026-03-01T12:00:00.123456Z"
    assert obj["caller"] == {"org": "pnp", "kind": "investigator", "operator_id": "op-a1b2c3d4e5f6"}
    assert b"\n" not in raw
    validate_entry_bytes(raw)


def test_every_event_type_encodes() -> None:
    for etype in EventType:
        assert json.loads(AuditEvent(etype).encode())["type"] == etype.value


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"request_id": "ABC-123"}, "request_id"),
        ({"request_id": "45678912"}, "request_id"),
        ({"decision_id": "dni-45678912-x"}, "decision_id"),
        ({"refs": {"report": "ABC-123"}}, "refs.report"),
        ({"refs": {"plate": "report-000000000001"}}, "refs.plate"),
        ({"refs": {"report": "Juan Pérez Quispe"}}, "refs.report"),
        ({"digests": {"plate": "ABC-123"}}, "digests.plate"),
        (
            {"digests": {"plate": "sha256:" + hashlib.sha256(b"ABC-123").hexdigest()}},
            "digests.plate",
        ),
        ({"digests": {"raw": "hmac-sha256:" + "0" * 64}}, "digests.raw"),
        ({"purpose": "Juan Perez"}, "purpose"),
        ({"outcome": "45678912"}, "outcome"),
        ({"metrics": {"score": "0.9"}}, "metrics.score"),
        ({"metrics": {"score": float("nan")}}, "metrics.score"),
        ({"metrics": {"dni": 45678912}}, "metrics.dni"),
        ({"rule_ids": "R1"}, "rule_ids"),
        ({"caller": Caller("pnp", "officer", "45678912")}, "caller.operator_id"),
        ({"time": dt.datetime(2026, 1, 1)}, "time"),
    ],
)
def test_raw_or_unknown_fields_are_refused(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        AuditEvent(EventType.DENIAL, **kwargs).encode()  # type: ignore[arg-type]
    assert info.value.field == field
    # The refusal names the field, never the value.
    for secret in ("ABC-123", "45678912", "Juan"):
        assert secret not in str(info.value)


def test_digester_is_keyed_and_domain_separated() -> None:
    d = Digester(KEY)
    plate = d.digest("plate", "ABC-123")
    assert plate.startswith("hmac-sha256:")
    assert len(plate) == 12 + 64
    assert plate == d.digest("plate", b"ABC-123")
    assert plate != d.digest("dni", "ABC-123")
    assert plate != Digester(secrets.token_bytes(32)).digest("plate", "ABC-123")
    assert hashlib.sha256(b"ABC-123").hexdigest() not in plate
    with pytest.raises(InvalidArgument):
        d.digest("bogus", "x")
    with pytest.raises(InvalidArgument):
        Digester(b"short")


def test_validate_entry_bytes_refuses_multiline_and_non_json() -> None:
    for bad in (b"", b"{}\n", b'{"a":"\n"}', b"[1]", b"{\xff}"):
        with pytest.raises(InvalidArgument):
            validate_entry_bytes(bad)


def test_no_raw_biometric_plate_or_dni_in_audit(audit_log: AuditLog) -> None:
    """Real random face vectors, plates and DNIs go through the Digester into stored entries;
    neither they nor their plain SHA-256 (hex or base64) appear in what the database holds."""
    rng = np.random.default_rng(20260301)
    d = Digester(KEY)
    secrets_seen: list[bytes] = []
    for i in range(12):
        vec = rng.standard_normal(512).astype(np.float32)
        vec /= np.linalg.norm(vec)
        probe = vec.tobytes()
        plate = PLATES[i % len(PLATES)]
        dni = DNIS[i % len(DNIS)]
        ev = AuditEvent(
            EventType.MATCH_DECISION,
            request_id=f"req-{secrets.token_hex(8)}",
            caller=Caller("pnp", "investigator", "op-a1b2c3d4e5f6"),
            purpose="WANTED_PERSON",
            outcome="HIT",
            digests={
                "probe": d.digest("probe", probe),
                "plate": d.digest("plate", plate),
                "dni": d.digest("dni", dni),
            },
            metrics={"score": float(vec[0])},
        )
        asyncio.run(audit_log.append(ev))
        secrets_seen += [probe, plate.encode(), dni.encode(), plate.replace("-", "").encode()]
    stored = b"\n".join(audit_log.entries(0, audit_log.size))
    assert audit_log.size == 12
    for value in secrets_seen:
        forms = [value, value.hex().encode(), base64.b64encode(value)]
        digest = hashlib.sha256(value).digest()
        forms += [digest.hex().encode(), base64.b64encode(digest), digest]
        for form in forms:
            assert form not in stored


_ids = st.from_regex(r"[a-z]{4}-[A-Za-z0-9_.:@=+-]{8,40}", fullmatch=True).filter(
    lambda s: not re.search(r"[0-9]{8}", s)
)
_tokens = st.from_regex(r"[A-Za-z][A-Za-z0-9_.:-]{0,20}", fullmatch=True)
_numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**53) + 1, 2**53 - 1),
)


@settings(max_examples=200, deadline=None)
@given(
    etype=st.sampled_from(list(EventType)),
    request_id=st.none() | _ids,
    purpose=st.none() | _tokens,
    rule_ids=st.lists(_tokens, max_size=4),
    refs=st.dictionaries(st.sampled_from(sorted(REF_KINDS)), _ids, max_size=3),
    metrics=st.dictionaries(st.sampled_from(sorted(METRIC_KINDS)), _numbers, max_size=4),
    plate=st.text(max_size=12),
)
def test_fast_encoder_equals_rfc8785(
    etype: EventType,
    request_id: str | None,
    purpose: str | None,
    rule_ids: list[str],
    refs: dict[str, str],
    metrics: dict[str, float | int],
    plate: str,
) -> None:
    ev = AuditEvent(
        etype,
        request_id=request_id,
        purpose=purpose,
        rule_ids=rule_ids,
        refs=refs,
        metrics=metrics,
        digests={"plate": Digester(KEY).digest("plate", plate)},
        caller=Caller("pnp", "officer"),
        time=dt.datetime(2026, 5, 1, tzinfo=dt.UTC),
    )
    assert ev.encode() == rfc8785.dumps(ev.to_json())
