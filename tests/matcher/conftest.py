"""Fixtures of the matcher tests: a real key directory and a real store on SQLite/PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from centinela.matcher.keys import FileKeyProvider
from centinela.matcher.store import TemplateStore
from centinela.storage import make_engine


@pytest.fixture
def keys(tmp_path: Path) -> FileKeyProvider:
    return FileKeyProvider(tmp_path / "keys")


@pytest.fixture
def store(db_url: str, keys: FileKeyProvider) -> Iterator[TemplateStore]:
    engine = make_engine(db_url)
    try:
        yield TemplateStore(engine, keys)
    finally:
        engine.dispose()
