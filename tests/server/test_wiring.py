"""Start-up that fails part-way leaves nothing running behind it."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from centinela.config import Settings
from centinela.errors import CentinelaError, StorageError
from centinela.server import components as components_module
from centinela.server.components import Components
from centinela.server.wiring import build_components

#: Threads the components start: the audit writer and its history check, the matcher's
#: catch-up loop and the executor's workers.
OURS = ("centinela-audit", "matcher-catch-up", "centinela_")


def _ours() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(OURS) and t.is_alive())


def _close(c: Components) -> None:
    """Close a started set of components in the order Application.close does."""
    c.matcher.stop()
    c.executor.shutdown(wait=True)
    c.audit.close()
    c.idempotency.close()
    c.engine.dispose()


def test_a_bad_policy_bundle_stops_the_audit_writer_it_started(settings: Settings) -> None:
    before = _ours()
    bad = dataclasses.replace(settings, policy_bundle=str(settings.data_dir / "no-such-bundle"))
    with pytest.raises(CentinelaError):
        build_components(bad)
    assert _ours() == before


def test_a_failure_after_the_matcher_started_stops_it_and_the_log(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for a database error at the last read before serving: the watchlist view's
    # first refresh. Everything before it (audit writer, matcher, executor) is real.
    def refresh(self: object) -> None:
        raise StorageError("the database went away")

    before = _ours()
    monkeypatch.setattr(components_module.WatchlistView, "refresh", refresh)
    with pytest.raises(StorageError):
        build_components(settings)
    assert _ours() == before
    monkeypatch.undo()
    # The data directory opens again: the failed start left the log consistent.
    c = build_components(settings)
    try:
        assert c.audit.size >= 1
    finally:
        _close(c)
    assert _ours() == before
