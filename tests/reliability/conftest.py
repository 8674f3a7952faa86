"""Fixtures of the reliability tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._postgres import PrivatePostgres


@pytest.fixture
def own_postgres() -> Iterator[PrivatePostgres]:
    """A running PostgreSQL of the test's own, which it may stop, crash and start."""
    pg = PrivatePostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.close()
