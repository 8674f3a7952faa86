"""The audit read helpers on a real AuditLog over SQLite and PostgreSQL: lookup, paging, times."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from centinela.audit.entry import AuditEvent, Caller, Digester, EventType
from centinela.audit.log import AuditLog
from centinela.errors import InvalidArgument, NotFound
from centinela.server.audit_query import (
    EventFilter,
    Stats,
    StatsCache,
    StatsSnapshot,
    decode_cursor,
    encode_cursor,
    find_decision,
    first_index_at,
    list_page,
)
from centinela.storage import make_engine

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


@pytest.fixture
def log(db_url: str) -> Iterator[AuditLog]:
    engine = make_engine(db_url)
    audit = AuditLog.open(engine, Ed25519PrivateKey.generate(), checkpoint_every_seconds=3600)
    for i in range(60):
        org = "muni-miraflores" if i % 3 else "muni-la-victoria"
        audit.append_blocking(
            AuditEvent(
                EventType.SHADOW_DISAGREEMENT if i == 30 else EventType.MATCH_DECISION,
                decision_id=f"dec_{i:024x}" if i != 31 else "dec_" + f"{30:024x}",
                caller=Caller(org=org, kind="municipality"),
                site_id="mira-portico-01" if i % 2 else "lav-cam-01",
                outcome="HIT" if i % 7 == 0 else "NO_HIT",
                rule_ids=("R8", "R10"),
                time=T0 + dt.timedelta(minutes=10 * i),
            )
        )
    yield audit
    audit.close()
    engine.dispose()


def test_find_decision_prefers_the_decision_over_its_shadow_entry(log: AuditLog) -> None:
    assert find_decision(log, f"dec_{5:024x}") == 5
    # Entries 30 (shadow disagreement) and 31 share a decision id: 31 is the decision.
    assert find_decision(log, f"dec_{30:024x}") == 31
    with pytest.raises(NotFound):
        find_decision(log, "dec_" + "e" * 24)


def test_time_search_starts_no_later_than_the_first_entry_in_range(log: AuditLog) -> None:
    since = T0 + dt.timedelta(minutes=200)  # entry 20
    start = first_index_at(log, since, log.size)
    assert start <= 20
    assert start >= 19  # the margin is 5 minutes: one entry before at most


def test_list_page_with_time_range_and_org(log: AuditLog) -> None:
    flt = EventFilter(
        since=T0 + dt.timedelta(minutes=100),
        until=T0 + dt.timedelta(minutes=300),
        caller_org="muni-la-victoria",
    )
    page = list_page(log, flt, 0, 100)
    assert [i for i, _ in page.items] == [12, 15, 18, 21, 24, 27]
    assert page.next_index is None  # stopped past `until` + margin, not at the end


def test_scan_budget_returns_a_cursor(log: AuditLog) -> None:
    page = list_page(log, EventFilter(outcome="HIT"), 0, 100, scan_budget=10)
    assert [i for i, _ in page.items] == [0, 7]
    assert page.next_index == 10


def test_stats_cache_is_incremental_and_exact(log: AuditLog) -> None:
    cache = StatsCache()
    first = cache.compute(log, None)
    assert first.total == 60
    assert first.shadow_by_rule == {"R8": 1, "R10": 1}
    log.append_blocking(AuditEvent(EventType.DENIAL, outcome="DENIED", rule_ids=("R5",)))
    second = cache.compute(log, None)
    assert second.total == 61
    assert second.denials_by_rule == {"R5": 1}
    assert first.total == 60  # a returned copy is not changed afterwards
    recent = cache.compute(log, T0 + dt.timedelta(minutes=590))
    assert recent.total == 1 + 1  # entry 59 and the denial (stamped now)


class _Rest(threading.Event):
    """Records how long the warm-up asked to rest, without resting; ``stop_after`` rests
    end it."""

    def __init__(self, stop_after: int = 0) -> None:
        super().__init__()
        self.asked: list[float] = []
        self.stop_after = stop_after

    def wait(self, timeout: float | None = None) -> bool:
        self.asked.append(timeout or 0.0)
        if len(self.asked) == self.stop_after:
            self.set()
        return self.is_set()


def test_stats_warm_up_scans_in_slices_and_rests_after_each(log: AuditLog) -> None:
    cache, rest = StatsCache(), _Rest()
    assert cache.warm(log, share=0.25, stop=rest, slice_entries=25) == 60
    # Slices of 25, 25 and 10, each followed by a rest three times its own work (a quarter
    # of the time), so a restart with a large log leaves the matcher the rest of the GIL.
    assert len(rest.asked) == 3
    assert all(t > 0 for t in rest.asked)
    assert cache.compute(log, None) == StatsCache().compute(log, None)
    assert cache.warm(log, stop=rest) == 0  # nothing left: no slice, no rest
    assert len(rest.asked) == 3


def test_stats_warm_up_stops_and_get_stats_goes_on_from_there(log: AuditLog) -> None:
    cache = StatsCache()
    assert cache.warm(log, stop=_Rest(stop_after=1), slice_entries=25) == 25
    assert cache.compute(log, None) == StatsCache().compute(log, None)


class _Counting(StatsCache):
    """A StatsCache that counts the entries it parses (how much a restart rescanned)."""

    def __init__(self) -> None:
        super().__init__()
        self.parsed = 0

    def warm(self, log: AuditLog, **kw: object) -> int:
        scanned = super().warm(log, stop=_Rest(), **kw)  # type: ignore[arg-type]
        self.parsed += scanned
        return scanned


def _denial(rule: str) -> AuditEvent:
    return AuditEvent(EventType.DENIAL, outcome="DENIED", rule_ids=(rule,), purpose="WANTED")


def test_saved_statistics_spare_a_restart_the_scan_and_stay_exact(
    log: AuditLog, tmp_path: Path
) -> None:
    key = Digester(b"k" * 32)
    first = _Counting()
    first.warm(log)
    assert StatsSnapshot(tmp_path / "s.json", key).save(log, first) == 60
    log.append_blocking(_denial("R5"))
    log.append_blocking(_denial("R7"))
    # The next run: resumes at 60, parses only the two entries since.
    again = _Counting()
    assert StatsSnapshot(tmp_path / "s.json", key).load(log, again) == 60
    again.warm(log)
    assert again.parsed == 2
    assert again.compute(log, None) == StatsCache().compute(log, None)
    assert again.compute(log, None).denials_by_rule == {"R5": 1, "R7": 1}


def _saved(log: AuditLog, path: Path, key: Digester) -> dict[str, object]:
    cache = StatsCache()
    cache.warm(log, stop=_Rest())
    StatsSnapshot(path, key).save(log, cache)
    return dict(json.loads(path.read_text()))


def _refused(log: AuditLog, path: Path, key: Digester) -> bool:
    cache = _Counting()
    resumed = StatsSnapshot(path, key).load(log, cache)
    cache.warm(log)
    assert cache.compute(log, None) == StatsCache().compute(log, None)  # exact either way
    return resumed == 0 and cache.parsed == log.size


def test_an_edited_snapshot_is_refused_and_the_log_scanned(log: AuditLog, tmp_path: Path) -> None:
    key, path = Digester(b"k" * 32), tmp_path / "s.json"
    doc = _saved(log, path, key)
    body = doc["body"]
    assert isinstance(body, dict)
    body["stats"]["denials_by_rule"] = {"R7": 1000}  # made to look like many R7 denials
    path.write_text(json.dumps(doc))
    assert _refused(log, path, key)
    path.write_text("{not json")
    assert _refused(log, path, key)


def test_a_snapshot_sealed_with_another_key_is_refused(log: AuditLog, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    _saved(log, path, Digester(b"x" * 32))
    assert _refused(log, path, Digester(b"k" * 32))


def test_a_snapshot_of_another_log_is_refused(log: AuditLog, db_url: str, tmp_path: Path) -> None:
    """Sealed with the right key, but counting a log whose entries differ (another data
    directory's, or this one's entries since altered): the roots differ."""
    key, path = Digester(b"k" * 32), tmp_path / "s.json"
    other_engine = make_engine(f"sqlite:///{tmp_path / 'other.db'}")
    other = AuditLog.open(other_engine, Ed25519PrivateKey.generate(), checkpoint_every_seconds=3600)
    try:
        for i in range(70):
            other.append_blocking(_denial(f"R{i % 16 + 1}"))
        _saved(other, path, key)
    finally:
        other.close()
        other_engine.dispose()
    cache = StatsCache()
    for _ in range(10):  # from another database altogether: longer than this log
        log.append_blocking(_denial("R1"))
    assert log.size == 70
    assert StatsSnapshot(path, key).load(log, cache) == 0


def test_a_snapshot_counting_more_than_the_log_holds_is_refused(
    log: AuditLog, tmp_path: Path
) -> None:
    """The database restored from a backup older than the snapshot: the log is shorter."""
    key, path = Digester(b"k" * 32), tmp_path / "s.json"
    doc = _saved(log, path, key)
    body = doc["body"]
    assert isinstance(body, dict)
    body["size"] = body["stats"]["total"] = 61
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    path.write_text(json.dumps({"body": body, "seal": key.seal("audit-stats", raw)}))
    assert _refused(log, path, key)


def test_statistics_round_trip_through_their_document() -> None:
    stats = Stats()
    stats.by_site["mira-portico-01"] = 3
    stats.denials_by_rule.update({"R5": 2, "-": 1})
    stats.confirmed.add("alt_01")
    stats.total = 9
    assert Stats.from_doc(json.loads(json.dumps(stats.to_doc()))) == stats
    for bad in ({}, {**stats.to_doc(), "total": -1}, {**stats.to_doc(), "by_site": {"x": 1.5}}):
        with pytest.raises(ValueError):  # noqa: PT011
            Stats.from_doc(bad)


@given(st.integers(min_value=0, max_value=10**12))
def test_cursor_round_trips(index: int) -> None:
    assert decode_cursor(encode_cursor(index), index) == index


@pytest.mark.parametrize("token", ["x", "ev1.", "ev1.LTE", "ev1.\u00e9"])
def test_bad_cursors_are_refused(token: str) -> None:
    with pytest.raises(InvalidArgument):
        decode_cursor(token, 100)


@given(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["MATCH_DECISION", "DENIAL"]),
            "outcome": st.sampled_from(["HIT", "NO_HIT", "DENIED"]),
            "org": st.sampled_from(["muni-a", "muni-b", "muni-a-b"]),
            "rules": st.lists(st.sampled_from(["R1", "R10", "R2"]), max_size=3, unique=True),
        }
    ),
    st.sampled_from(["", "muni-a", "muni-b"]),
    st.sampled_from(["", "R1", "R10"]),
)
def test_byte_pretest_never_changes_the_answer(
    fields: dict[str, object], org: str, rule: str
) -> None:
    event = AuditEvent(
        EventType(str(fields["type"])),
        caller=Caller(org=str(fields["org"]), kind="municipality"),
        outcome=str(fields["outcome"]),
        rule_ids=tuple(fields["rules"]),  # type: ignore[arg-type]
        time=T0,
    )
    flt = EventFilter(caller_org=org, rule_id=rule)
    entry = event.encode()
    assert flt.matcher()(entry) == flt.accepts(json.loads(entry))


def test_an_alert_is_counted_once_however_many_confirmations(log: AuditLog) -> None:
    for state, alert in (("PARTIALLY_CONFIRMED", "alt_aaaaaaaa"), ("CONFIRMED", "alt_aaaaaaaa")):
        log.append_blocking(
            AuditEvent(EventType.ALERT_CONFIRMATION, outcome=state, refs={"alert": alert})
        )
    for _ in range(2):  # a retried confirmation of an already confirmed alert
        log.append_blocking(
            AuditEvent(
                EventType.ALERT_CONFIRMATION, outcome="CONFIRMED", refs={"alert": "alt_aaaaaaaa"}
            )
        )
    log.append_blocking(
        AuditEvent(EventType.ALERT_CONFIRMATION, outcome="REJECTED", refs={"alert": "alt_bbbbbbbb"})
    )
    stats = StatsCache().compute(log, None)
    assert (stats.alerts_confirmed, stats.alerts_rejected) == (1, 1)
