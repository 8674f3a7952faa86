"""Fixtures of the audit tests: a signing key, an engine and a running log on each database."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Engine

from centinela.audit.entry import AuditEvent, Caller, EventType
from centinela.audit.log import AuditLog
from centinela.storage import is_sqlite, make_engine

ORIGIN = "test.centinela.local/audit"


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def audit_log(engine: Engine, signing_key: Ed25519PrivateKey) -> Iterator[AuditLog]:
    log = AuditLog.open(engine, signing_key, ORIGIN, checkpoint_every_seconds=3600)
    yield log
    log.close()


def sample_entry(i: int) -> bytes:
    """A realistic, valid entry with a distinct request id."""
    return AuditEvent(
        EventType.MATCH_DECISION,
        request_id=f"req-{i:020d}x",
        caller=Caller("municipio-lima", "municipal", "op-7f3a9c2e51d4"),
        purpose="STOLEN_VEHICLE",
        site_id="portico-07",
        outcome="NO_HIT",
        rule_ids=["R1", "R5"],
        time=dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=i),
    ).encode()


def rewrite_leaf_hash(engine: Engine, index: int, new_hash: bytes) -> None:
    """What a DBA with the owner's rights can do: drop the update trigger, rewrite a leaf."""
    with engine.begin() as conn:
        if is_sqlite(engine):
            conn.exec_driver_sql("DROP TRIGGER audit_leaves_no_update")
        else:
            conn.exec_driver_sql("DROP TRIGGER audit_leaves_no_change ON audit_leaves")
        conn.exec_driver_sql(
            "UPDATE audit_leaves SET leaf_hash = %s WHERE idx = %s"
            if not is_sqlite(engine)
            else "UPDATE audit_leaves SET leaf_hash = ? WHERE idx = ?",
            (new_hash, index),
        )
