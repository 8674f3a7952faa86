"""Alerts to control centers: jurisdiction (R10), durable resume, confirmations, sightings."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from centinela.config import Settings
from centinela.server.demo import LAV_SITE, World, populate, rid
from centinela.server.testing import ServerThread
from centinela.v1 import common_pb2 as c
from centinela.v1 import match_service_pb2 as mpb
from centinela.v1 import match_service_pb2_grpc as mgrpc
from centinela.v1 import watchlist_service_pb2 as wpb
from centinela.v1 import watchlist_service_pb2_grpc as wgrpc


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    settings = Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0", shutdown_grace_s=0.5)
    with ServerThread(settings) as server:
        w = populate(server, registry=False)
        yield w
        w.close()


def collect(
    world: World, identity: str, cursor: str, want: int, wait_s: float = 8.0
) -> list[mpb.SubscribeAlertsResponse]:
    """Read up to ``want`` events from a subscription, or what came within ``wait_s``."""
    ch = world.server.channel(identity)
    call = mgrpc.MatchServiceStub(ch).SubscribeAlerts(
        mpb.SubscribeAlertsRequest(
            context=c.RequestContext(operator_id="op-center-000001"), cursor=cursor
        ),
        timeout=wait_s,
    )
    got: list[mpb.SubscribeAlertsResponse] = []
    try:
        for event in call:
            got.append(event)
            if len(got) >= want:
                break
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    finally:
        cast(Any, call).cancel()
        ch.close()
    return got


def hit(
    world: World, identity: str = "muni-miraflores", site: str = "mira-portico-01"
) -> mpb.MatchFaceResponse:
    resp = world.stub(identity).MatchFace(
        world.face_request(world.genuine(0), site=site), timeout=30
    )
    assert resp.alert
    return resp


def test_r10_each_center_sees_only_its_jurisdiction(world: World) -> None:
    # A site of La Victoria, and the wanted person passing both municipalities' cameras.
    mira = hit(world)
    lav = hit(world, "muni-la-victoria", LAV_SITE)
    mira_ids = {e.alert_id for e in collect(world, "muni-miraflores", "ev-0", 2, 4)}
    lav_ids = {e.alert_id for e in collect(world, "muni-la-victoria", "ev-0", 2, 4)}
    lima_ids = {e.alert_id for e in collect(world, "pnp-center-lima", "ev-0", 2)}
    national = {e.alert_id for e in collect(world, "pnp-national", "ev-0", 2)}
    a, b = mira.candidates[0].alert_id, lav.candidates[0].alert_id
    assert mira_ids == {a}
    assert lav_ids == {b}
    assert lima_ids == {a, b}
    assert national == {a, b}


def test_alert_carries_no_registry_fields_and_a_score_band(world: World) -> None:
    resp = hit(world)
    (event,) = collect(world, "muni-miraflores", "ev-0", 1)
    assert event.alert_id == resp.candidates[0].alert_id
    assert event.decision_id == resp.decision.decision_id
    assert event.reference == world.wanted_requisition
    assert event.category == "ROBO_AGRAVADO"
    assert event.score_band in {"LOW", "MEDIUM", "HIGH"}
    assert event.state == mpb.ALERT_STATE_PENDING
    fields = {f.name for f, _ in event.ListFields()}
    assert "subject_ref" not in fields


def test_live_subscriber_rings_and_sees_the_confirmation(world: World) -> None:
    received: list[mpb.SubscribeAlertsResponse] = []

    def listen() -> None:
        received.extend(collect(world, "pnp-center-lima", "", 2, 15))

    t = threading.Thread(target=listen)
    t.start()
    import time

    time.sleep(1.5)  # the subscription starts "from now"
    resp = hit(world)
    world.stub("muni-miraflores").ConfirmAlert(
        mpb.ConfirmAlertRequest(
            context=c.RequestContext(operator_id="op-serenazgo-00001", client_request_id=rid()),
            alert_id=resp.candidates[0].alert_id,
            verdict=mpb.ALERT_VERDICT_CONFIRMED,
        ),
        timeout=30,
    )
    t.join(20)
    assert [e.state for e in received] == [mpb.ALERT_STATE_PENDING, mpb.ALERT_STATE_CONFIRMED]
    assert received[1].confirmations == 1


def test_resume_after_disconnect_and_after_restart_loses_nothing(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0", shutdown_grace_s=0.5)
    server = ServerThread(settings).start()
    w = populate(server, registry=False)
    first = hit(w)
    (e1,) = collect(w, "muni-miraflores", "ev-0", 1)
    assert e1.alert_id == first.candidates[0].alert_id
    cursor = e1.cursor
    # Disconnected: two alerts are raised meanwhile.
    missed = {hit(w).candidates[0].alert_id, hit(w).candidates[0].alert_id}
    w.close()
    server.stop()
    # The server restarts; the subscriber resumes from its cursor.
    server = ServerThread(settings).start()
    w2 = World(server=server, model_id=w.model_id, identities=w.identities)
    after = hit(w2).candidates[0].alert_id
    got = [e.alert_id for e in collect(w2, "muni-miraflores", cursor, 3)]
    assert set(got) == missed | {after}
    assert len(got) == 3
    w2.close()
    server.stop()


def test_sightings_newest_first_and_retention_enforced(world: World) -> None:
    a1 = hit(world).candidates[0].alert_id
    a2 = hit(world).candidates[0].alert_id
    ch = world.server.channel("pnp-investigator")
    stub = wgrpc.WatchlistServiceStub(ch)
    req = wpb.ListSightingsRequest(
        context=c.RequestContext(operator_id="op-pnp-invest-0001", client_request_id=rid()),
        reference=world.wanted_requisition,
    )
    sightings = stub.ListSightings(req, timeout=30).sightings
    assert [s.alert_id for s in sightings] == [a2, a1]
    assert sightings[0].site_id == "mira-portico-01"
    # Past the list's retention the server deletes them by itself.
    alerts: Any = world.server.app.components.alerts
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=91)
    # One alert per transaction, so that no purge holds the write lock for long; found on
    # the index of list and capture time, not by a scan of every alert kept.
    assert alerts.purge({"pnp_watchlist": 90}, later, batch=1) >= 2
    assert list(stub.ListSightings(req, timeout=30).sightings) == []
    with alerts.engine.connect() as conn:
        plan = conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT alert_id FROM alerts"
            " WHERE gallery = 'pnp_watchlist' AND capture_time < 0 LIMIT 500"
        ).fetchall()
    assert "ix_alerts_gallery_capture" in str(plan)
    ch.close()


def test_r10_municipality_sees_only_sightings_at_its_own_sites(world: World) -> None:
    hit(world, "muni-la-victoria", LAV_SITE)
    ch = world.server.channel("muni-miraflores")
    stub = wgrpc.WatchlistServiceStub(ch)
    req = wpb.ListSightingsRequest(
        context=c.RequestContext(operator_id="op-serenazgo-00001", client_request_id=rid()),
        reference=world.wanted_requisition,
    )
    own = hit(world).candidates[0].alert_id
    sightings = stub.ListSightings(req, timeout=30).sightings
    assert [s.alert_id for s in sightings] == [own]  # La Victoria's sighting is not shown
    ch.close()


def test_feed_hands_each_subscriber_exactly_the_events_after_its_cursor() -> None:
    """The shared feed's in-memory buffer, read at every position (binary search, not a scan).

    The store is never consulted here: the buffer covers every cursor asked for.
    """
    import asyncio

    from centinela.server.alerts import Alert, AlertBus, AlertFeed

    def alert(seq: int) -> Alert:
        return Alert(
            seq=seq, alert_id=f"a{seq}", decision_id=f"d{seq}", audit_index=seq,
            caller_org="o", site_id="s", municipality="m", region="lima",
            capture_time=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), gallery="watchlist",
            reference="r", category="c", score_band="high", state="PENDING",
            confirmations_required=1,
        )  # fmt: skip

    async def run() -> None:
        feed = AlertFeed(cast(Any, None), AlertBus())
        seqs = [3, 4, 7, 8, 9, 15]  # outbox seqs need not be dense (rows of other kinds)
        feed._events = [(s, alert(s)) for s in seqs]
        feed._last = seqs[-1]
        feed._ensure_running = lambda: asyncio.Event()  # type: ignore[method-assign]
        for cursor in range(2, 15):
            got = [s for s, _ in await feed.after(cursor, wait_s=0.01)]
            assert got == [s for s in seqs if s > cursor], cursor
        assert await feed.after(15, wait_s=0.01) == []

    asyncio.run(run())
