"""The in-memory watchlist view the match path reads: what it answers, and what it costs
the garbage collector."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc

from centinela.server.components import WatchlistView
from centinela.server.records import (
    Records,
    RequisitionRecord,
    SiteRecord,
    VehicleRecord,
    requisitions,
)
from centinela.storage import make_engine

NOW = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)


_BASE = RequisitionRecord(
    "req", "subj", "W", "Juzgado 1", "ROBO_AGRAVADO", NOW, NOW, None, "", False, ()
)


def _req(rid: str, subject: str, expires: dt.datetime) -> RequisitionRecord:
    return dataclasses.replace(
        _BASE,
        requisition_id=rid,
        subject_ref=subject,
        warrant_id="W-" + rid,
        issued_at=NOW - dt.timedelta(days=1),
        expires_at=expires,
        template_ids=("tpl_" + rid,),
    )


def test_the_view_answers_active_requisitorias_and_stolen_vehicles(db_url: str) -> None:
    records = Records(make_engine(db_url))
    records.add_site(SiteRecord("site-1", "muni-miraflores", "lima", 2, "portico", True))
    records.add_requisitions(
        [
            _req("req_a", "subj_1", NOW + dt.timedelta(days=3)),
            _req("req_b", "subj_1", NOW + dt.timedelta(days=30)),
            _req("req_c", "subj_1", NOW - dt.timedelta(hours=1)),  # expired
            _req("req_d", "subj_2", NOW + dt.timedelta(days=30)),
        ]
    )
    records.update_requisition("req_d", lifted_at=NOW - dt.timedelta(hours=2), lift_reason="x")
    for vid, report in (("veh_1", "PR-1"), ("veh_2", "PR-2")):
        records.add_vehicle(VehicleRecord(vid, report, "ABC-***", "ROBO", NOW, None))
    records.recover_vehicle("veh_2", NOW)
    view = WatchlistView(records)
    view.refresh()

    best = view.active_requisition("subj_1", NOW)
    assert best == dataclasses.replace(
        _req("req_b", "subj_1", NOW + dt.timedelta(days=30)), template_ids=("tpl_req_b",)
    )
    later = NOW + dt.timedelta(days=31)
    assert view.active_requisition("subj_1", later) is None  # all expired by then (R6)
    assert view.active_requisition("subj_2", NOW) is None  # lifted
    assert view.active_requisition("nobody", NOW) is None
    stolen = view.stolen_vehicle("veh_1")
    assert stolen is not None
    assert stolen.police_report_id == "PR-1"
    assert view.stolen_vehicle("veh_2") is None  # recovered
    assert view.stolen_vehicle("veh_9") is None
    site = view.site("site-1")
    assert site is not None
    assert site.municipality == "muni-miraflores"


def _tracked_objects() -> int:
    # A collection untracks a tuple whose items are all untracked when it reaches it; a
    # tuple of tuples may be reached before its items are, and is untracked by the next.
    gc.collect()
    gc.collect()
    return len(gc.get_objects())


def test_the_view_adds_no_garbage_collected_object_per_entry(sqlite_url: str) -> None:
    """A full collection walks every GC-tracked object with the event loop stopped: the
    view holds its entries as plain tuples, which the collector does not track (a record
    object and a list per subject, with the gallery's sets, made each full collection a
    110-128 ms pause at 100,000 entries and 411 ms at a million)."""
    n = 3000
    records = Records(make_engine(sqlite_url))
    records.add_requisitions(
        [_req(f"req_{i}", f"subj_{i}", NOW + dt.timedelta(days=30)) for i in range(n)]
    )
    for i in range(n // 3):
        records.add_vehicle(VehicleRecord(f"veh_{i}", f"PR-{i}", "ABC-***", "ROBO", NOW, None))
    WatchlistView(records).refresh()  # SQLAlchemy compiles and caches its statements once
    view = WatchlistView(records)
    before = _tracked_objects()
    view.refresh()
    grown = _tracked_objects() - before
    assert view.active_requisition(f"subj_{n - 1}", NOW) is not None
    assert view.stolen_vehicle(f"veh_{n // 3 - 1}") is not None
    assert grown < n // 20, f"{grown} tracked objects for {n} requisitorias"


def test_records_are_read_through_to_the_end_a_batch_at_a_time(db_url: str) -> None:
    records = Records(make_engine(db_url))
    records.add_requisitions(
        [_req(f"req_{i:02d}", f"subj_{i}", NOW + dt.timedelta(days=1)) for i in range(20)]
    )
    for i in (3, 9, 15):
        records.update_requisition(f"req_{i:02d}", lifted_at=NOW, lift_reason="x")
    for i in range(8):
        records.add_vehicle(VehicleRecord(f"veh_{i}", f"PR-{i}", "ABC-***", "ROBO", NOW, None))
    unlifted = [r.requisition_id for r in records.each_requisition(batch=7)]
    assert unlifted == [f"req_{i:02d}" for i in range(20) if i not in (3, 9, 15)]
    assert len(list(records.each_requisition(lifted=True, batch=7))) == 20
    assert len(list(records.each_requisition(batch=17))) == 17  # a last batch exactly full
    assert [v.vehicle_id for v in records.each_vehicle(batch=3)] == [f"veh_{i}" for i in range(8)]
    for i in range(5):
        records.add_site(SiteRecord(f"site-{i}", "muni-miraflores", "lima", 2, "", True))
    assert [s.site_id for s in records.each_site(batch=2)] == [f"site-{i}" for i in range(5)]
    assert set(records.policy_data()["sites"]) == {f"site-{i}" for i in range(5)}


def test_the_view_holds_every_requisitoria_past_a_listing_page(sqlite_url: str) -> None:
    """The view once read a listing with its 100,000-row default limit: at a million
    templates the other 900,000 requisitorias were missing and their hits answered as no
    match. Rows are written directly here (the record API's checks would take minutes)."""
    engine = make_engine(sqlite_url)
    records = Records(engine)
    n = 100_001
    later = (NOW + dt.timedelta(days=30)).timestamp()
    rows = [
        {
            "requisition_id": f"req_{i:07d}",
            "subject_ref": f"subj_{i}",
            "warrant_id": f"W-{i}",
            "issuing_court": "Juzgado 1",
            "offence_category": "ROBO_AGRAVADO",
            "issued_at": NOW.timestamp() - 86400,
            "expires_at": later,
            "lifted_at": None,
            "lift_reason": None,
            "from_registry": False,
            "template_ids": "[]",
            "created_seq": i,
        }
        for i in range(n)
    ]
    with engine.begin() as conn:
        conn.execute(requisitions.insert(), rows)
    view = WatchlistView(records)
    view.refresh()
    for i in (0, 50_000, n - 1):  # the oldest, the middle, the newest
        assert view.active_requisition(f"subj_{i}", NOW) is not None, i
