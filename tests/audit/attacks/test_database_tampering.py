"""Attacks on the database behind the server's back."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Engine

from centinela.audit.log import AuditLog
from centinela.errors import InconsistentCheckpointError
from centinela.storage import is_sqlite

from ..conftest import ORIGIN, sample_entry


def _filled(engine: Engine, key: Ed25519PrivateKey, n: int = 10) -> AuditLog:
    log = AuditLog.open(engine, key, ORIGIN, checkpoint_every_seconds=3600)
    for i in range(n):
        log.append_blocking(sample_entry(i))
    log.checkpoint()
    return log


def test_insert_or_replace_rejected(engine: Engine, signing_key: Ed25519PrivateKey) -> None:
    log = _filled(engine, signing_key)
    original = log.entries(0, 10)
    if is_sqlite(engine):
        stmt = (
            "INSERT OR REPLACE INTO audit_leaves (idx, entry, leaf_hash, created_at) "
            "VALUES (3, :e, :h, 't')"
        )
    else:
        stmt = (
            "INSERT INTO audit_leaves (idx, entry, leaf_hash, created_at) VALUES (3, :e, :h, 't') "
            "ON CONFLICT (idx) DO UPDATE SET entry = EXCLUDED.entry"
        )
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
        conn.execute(sa.text(stmt), {"e": b'{"forged":1}', "h": b"\x00" * 32})
    assert log.entries(0, 10) == original
    log.close()


def test_deleted_row_is_refused(engine: Engine, signing_key: Ed25519PrivateKey) -> None:
    log = _filled(engine, signing_key)
    for where in ("idx = 4", "idx >= 8", "1 = 1"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
            conn.exec_driver_sql(f"DELETE FROM audit_leaves WHERE {where}")  # noqa: S608
    assert log.store.size() == 10
    log.close()


def test_truncation_behind_the_triggers_is_detected(
    engine: Engine, signing_key: Ed25519PrivateKey
) -> None:
    """A DBA drops the trigger and removes the tail: the log will not open over it."""
    _filled(engine, signing_key).close()
    with engine.begin() as conn:
        if is_sqlite(engine):
            conn.exec_driver_sql("DROP TRIGGER audit_leaves_no_delete")
        else:
            conn.exec_driver_sql("DROP TRIGGER audit_leaves_no_change ON audit_leaves")
        conn.exec_driver_sql("DELETE FROM audit_leaves WHERE idx >= 7")
    with pytest.raises(InconsistentCheckpointError, match="truncated"):
        AuditLog.open(engine, signing_key, ORIGIN)


def test_truncate_table_rejected_on_postgres(
    engine: Engine, signing_key: Ed25519PrivateKey
) -> None:
    if is_sqlite(engine):
        pytest.skip("TRUNCATE is PostgreSQL only")
    log = _filled(engine, signing_key)
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE audit_leaves")
    assert log.store.size() == 10
    log.close()


@pytest.mark.postgres
def test_owner_disabling_the_triggers_still_cannot_edit(
    pg_url: str, signing_key: Ed25519PrivateKey
) -> None:
    """A role that owns the audit tables turns their triggers off, then edits and deletes.

    The tables are created by an ordinary (non-superuser) role, as a deployment would; the
    privileges the audit migration revokes are what still stops it.
    """
    role = "audit_owner_" + uuid.uuid4().hex[:8]
    admin = sa.create_engine(pg_url)
    with admin.begin() as conn:
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
        conn.exec_driver_sql(f"CREATE ROLE {role} NOLOGIN NOSUPERUSER")
        conn.exec_driver_sql(f'GRANT USAGE, CREATE ON SCHEMA "{schema}" TO {role}')
    owner = sa.create_engine(pg_url)
    sa.event.listen(owner, "connect", lambda dbapi, _rec: _set_role(dbapi, role))
    try:
        log = _filled(owner, signing_key)
        with owner.begin() as conn:
            assert conn.exec_driver_sql("SELECT current_user").scalar_one() == role
            conn.exec_driver_sql("ALTER TABLE audit_leaves DISABLE TRIGGER USER")
        for stmt in (
            "UPDATE audit_leaves SET entry = '\\x00'::bytea WHERE idx = 3",
            "DELETE FROM audit_leaves WHERE idx = 9",
            "TRUNCATE audit_leaves",
        ):
            with (
                pytest.raises(sa.exc.ProgrammingError, match="permission denied"),
                owner.begin() as conn,
            ):
                conn.exec_driver_sql(stmt)
        assert log.store.size() == 10
        log.close()
    finally:
        owner.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role} CASCADE")
            conn.exec_driver_sql(f"DROP ROLE {role}")
        admin.dispose()


def _set_role(dbapi_conn: object, role: str) -> None:
    cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cur.execute(f"SET ROLE {role}")
    cur.close()
    dbapi_conn.commit()  # type: ignore[attr-defined]
