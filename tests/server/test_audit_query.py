"""The audit read helpers on a real AuditLog over SQLite and PostgreSQL: lookup, paging, times."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from centinela.audit.entry import AuditEvent, Caller, EventType
from centinela.audit.log import AuditLog
from centinela.errors import InvalidArgument, NotFound
from centinela.server.audit_query import (
    EventFilter,
    StatsCache,
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
