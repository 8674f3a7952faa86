"""Fixtures for the policy tests: packaged bundles, their Rego cases, engines."""

from __future__ import annotations

import functools
import gc
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from centinela.policy import Bundle, EmbeddedEngine
from centinela.policy.testing import load_cases


@functools.cache
def _cases_of(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return load_cases(Bundle.load(name))


@functools.cache
def _engine_of(name: str) -> EmbeddedEngine:
    return EmbeddedEngine(Bundle.load(name), _cases_of(name)[1])


@pytest.fixture(scope="session", autouse=True)
def _release_interpreters() -> Iterator[None]:
    """Free cached rego-cpp interpreters before interpreter shutdown (regopy's __del__
    fails noisily once its module globals are gone)."""
    yield
    _engine_of.cache_clear()
    gc.collect()


@pytest.fixture
def cases_of() -> Callable[[str], tuple[dict[str, Any], dict[str, Any]]]:
    """(cases, fixture dynamic data) of a packaged bundle, read once per session."""
    return _cases_of


@pytest.fixture
def engine_of() -> Callable[[str], EmbeddedEngine]:
    """An embedded engine on a packaged bundle with the tests' fixture dynamic data."""
    return _engine_of


@pytest.fixture
def case_input() -> Callable[[str, str], dict[str, Any]]:
    """The input of one Rego test case: ``case_input(bundle, case_name)``."""

    def get(bundle: str, case: str) -> dict[str, Any]:
        value: dict[str, Any] = _cases_of(bundle)[0][case]["input"]
        copy: dict[str, Any] = json.loads(json.dumps(value))  # a private copy
        return copy

    return get


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    """A writable copy of the interim bundle folder."""
    dst = tmp_path / "interim"
    shutil.copytree(Bundle.load("interim").path, dst)
    return dst


def edit_json(path: Path, edit: Callable[[Any], None]) -> None:
    """Apply ``edit(doc)`` to a JSON file in place."""
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=2))


@pytest.fixture
def json_edit() -> Callable[[Path, Callable[[Any], None]], None]:
    """``json_edit(path, fn)`` applies ``fn(doc)`` to a JSON file in place."""
    return edit_json
