"""Shared fixtures: real databases (SQLite file and PostgreSQL), nothing faked."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from centinela.config import Settings
from centinela.server.testing import ServerThread

PG_ADMIN_URL = os.environ.get(
    "CENTINELA_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


def _pg_available() -> bool:
    try:
        eng = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with eng.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        eng.dispose()
        return True
    except sa.exc.OperationalError:
        return False


_PG_OK: bool | None = None


def pg_available() -> bool:
    """Whether PostgreSQL answers; under CI=true its absence is a failure, not a skip."""
    global _PG_OK
    if _PG_OK is None:
        _PG_OK = _pg_available()
    if not _PG_OK and os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is required in CI and did not answer at {PG_ADMIN_URL}")
    return _PG_OK


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'centinela.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    if not pg_available():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(PG_ADMIN_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    try:
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Every storage test runs on both SQLite and PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded defaults in a fresh data directory, on a free loopback port."""
    return Settings(data_dir=tmp_path / "data", listen="127.0.0.1:0", shutdown_grace_s=1.0)


@pytest.fixture
def server(settings: Settings) -> Iterator[ServerThread]:
    """A real Centinela server (mutual TLS, SQLite) running in-process."""
    with ServerThread(settings) as srv:
        yield srv
