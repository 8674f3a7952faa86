"""Administrative records on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest

from centinela.audit.entry import is_opaque_id
from centinela.errors import AlreadyExists, InvalidArgument, NotFound
from centinela.server.pipeline import new_decision_id
from centinela.server.records import (
    AuthorisationRecord,
    Records,
    RequisitionRecord,
    SiteRecord,
    VehicleRecord,
    mask_plate,
    ordered_id,
    page,
    page_of,
)
from centinela.storage import make_engine

NOW = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)


def _req(rid: str, expires: dt.datetime, warrant: str) -> RequisitionRecord:
    return RequisitionRecord(
        rid,
        "subj_" + rid,
        warrant,
        "Juzgado 1",
        "ROBO_AGRAVADO",
        NOW - dt.timedelta(days=1),
        expires,
        None,
        "",
        False,
        ("tpl_1",),
    )


def test_requisition_states_follow_lift_and_expiry(db_url: str) -> None:
    records = Records(make_engine(db_url))
    records.add_requisition(_req("req_a", NOW + dt.timedelta(days=30), "W-1"))
    records.add_requisition(_req("req_b", NOW + dt.timedelta(hours=1), "W-2"))
    assert {r.requisition_id for r in records.list_requisitions(state="ACTIVE", now=NOW)} == {
        "req_a",
        "req_b",
    }
    later = NOW + dt.timedelta(hours=2)
    assert [r.requisition_id for r in records.list_requisitions(state="EXPIRED", now=later)] == [
        "req_b"
    ]
    lifted = records.update_requisition("req_a", lifted_at=NOW, lift_reason="captured")
    assert lifted.state(NOW) == "LIFTED"
    with pytest.raises(AlreadyExists):
        records.add_requisition(_req("req_c", NOW + dt.timedelta(days=1), "W-1"))
    with pytest.raises(NotFound):
        records.get_requisition("req_missing")
    records.engine.dispose()


def test_bulk_requisitions_are_one_transaction(db_url: str) -> None:
    records = Records(make_engine(db_url))
    later = NOW + dt.timedelta(days=30)
    records.add_requisitions([_req(f"req_{i}", later, f"W-{i}") for i in range(3)])
    assert len(records.list_requisitions(now=NOW)) == 3
    with pytest.raises(AlreadyExists):  # the last one's warrant is taken: none is added
        records.add_requisitions([_req("req_x", later, "W-9"), _req("req_y", later, "W-0")])
    assert {r.requisition_id for r in records.list_requisitions(now=NOW)} == {
        "req_0",
        "req_1",
        "req_2",
    }
    records.engine.dispose()


def test_sites_authorisations_and_policy_data(db_url: str) -> None:
    records = Records(make_engine(db_url))
    records.add_site(SiteRecord("mira-01", "muni-miraflores", "lima", 2, "Av. Larco", True))
    records.set_site_active("mira-01", False)
    auth = AuthorisationRecord(
        "JUZ-2026-001",
        "Juzgado Penal 3",
        ("mira-01",),
        NOW,
        NOW + dt.timedelta(days=7),
        ("ROBO_AGRAVADO",),
        ("subj_x",),
        False,
    )
    records.add_authorisation(auth)
    records.revoke_authorisation("JUZ-2026-001")
    data = records.policy_data()
    assert data["sites"]["mira-01"] == {
        "municipality": "muni-miraflores",
        "region": "lima",
        "active": False,
    }
    assert data["authorisations"]["JUZ-2026-001"]["revoked"] is True
    assert data["authorisations"]["JUZ-2026-001"]["subjects"] == ["subj_x"]
    with pytest.raises(InvalidArgument):
        records.add_authorisation(AuthorisationRecord("bad", "c", (), NOW, NOW, (), (), False))
    records.engine.dispose()


def test_vehicles_keep_only_a_masked_plate(db_url: str) -> None:
    records = Records(make_engine(db_url))
    rec = VehicleRecord("veh_1", "DEN-77", mask_plate("ABC123"), "ROBO", NOW, None)
    records.add_vehicle(rec)
    assert records.list_vehicles(state="STOLEN")[0].plate_masked == "****23"
    records.recover_vehicle("veh_1", NOW)
    assert records.list_vehicles(state="STOLEN") == []
    assert records.list_vehicles(state="RECOVERED")[0].vehicle_id == "veh_1"
    records.engine.dispose()


def test_paging_tokens() -> None:
    items = list(range(120))
    first, tok = page(items, "", 50)
    second, tok2 = page(items, tok, 50)
    third, tok3 = page(items, tok2, 50)
    assert first + second + third == items
    assert tok3 == ""
    with pytest.raises(InvalidArgument):
        page(items, "garbage", 10)
    with pytest.raises(InvalidArgument):
        page(items, "-50", 10)
    assert page(items[:100], "50", 50) == (items[50:100], "")  # exactly full: no next page


def test_listings_page_in_the_database_to_their_end(db_url: str) -> None:
    """Each page reads its own rows from the database (one more than the page, to know if
    another follows), so a listing longer than any default limit pages to its end."""
    records = Records(make_engine(db_url))
    records.add_requisitions(
        [_req(f"req_{i:03d}", NOW + dt.timedelta(days=9), f"W-{i}") for i in range(120)]
    )
    asked: list[tuple[int, int]] = []

    def fetch(offset: int, limit: int) -> list[RequisitionRecord]:
        asked.append((offset, limit))
        return records.list_requisitions(offset=offset, limit=limit)

    seen, token = [], ""
    while True:
        chunk, token = page_of(fetch, token, 50)
        seen += [r.requisition_id for r in chunk]
        if not token:
            break
    assert sorted(seen) == [f"req_{i:03d}" for i in range(120)]
    assert len(set(seen)) == 120
    assert asked == [(0, 51), (50, 51), (100, 51)]
    records.engine.dispose()


def test_ordered_ids_sort_in_creation_order_and_stay_unguessable() -> None:
    t = 1_764_800_000_000_000_000  # ns
    # Made a millisecond apart, in scrambled order: sorting them gives creation order.
    made = {ordered_id("alt", now_ns=t + i * 1_000_000): i for i in (5, 0, 3, 1, 4, 2)}
    assert [made[k] for k in sorted(made)] == [0, 1, 2, 3, 4, 5]
    # Within one millisecond they differ in their 80 random bits.
    same = {ordered_id("alt", now_ns=t) for _ in range(1000)}
    assert len(same) == 1000
    one = next(iter(same))
    prefix, _, digits = one.partition("_")
    assert prefix == "alt"
    assert len(digits) == 32
    assert int(digits[:12], 16) == t // 1_000_000
    assert len({s[16:] for s in same}) == 1000  # the random part, not the clock, tells them apart
    assert is_opaque_id(one)


def test_decision_ids_are_ordered_ids() -> None:
    first, second = new_decision_id(), new_decision_id()
    for d in (first, second):
        assert d.startswith("dec_")
        assert len(d) == 36
        assert is_opaque_id(d)
    assert first != second
