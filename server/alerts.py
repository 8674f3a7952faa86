"""Alerts raised by hits, and their human confirmations (R9).

Invariants:

* An alert row is written only after the match decision that raised it is durable in the
  audit log, and names that entry's index: the audit log is the source of truth and this
  table an index over it (a row missing after a crash belongs to an answer nobody received).
* Confirmations count **distinct people**: (caller, operator id). One rejection makes the
  alert REJECTED; it becomes CONFIRMED when the required number of distinct confirmations
  is reached (1 under interim, 2 under draft-2026).
* Alerts hold references, categories, sites and score bands; never probes, scores of
  non-hits, plates, DNIs or names.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import datetime as dt
import functools
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from centinela.audit.store import Companion, Companions, Rows
from centinela.errors import FailedPrecondition, NotFound
from centinela.storage import Migration, migrate, read_connection, write_transaction

metadata = sa.MetaData()
alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("alert_id", sa.String(64), nullable=False, unique=True),
    sa.Column("decision_id", sa.String(64), nullable=False, index=True),
    sa.Column("audit_index", sa.BigInteger, nullable=False),
    sa.Column("caller_org", sa.String(128), nullable=False),
    sa.Column("site_id", sa.String(128), nullable=False),
    sa.Column("municipality", sa.String(128), nullable=False),
    sa.Column("region", sa.String(64), nullable=False),
    sa.Column("capture_time", sa.Float, nullable=False),
    sa.Column("gallery", sa.String(32), nullable=False),
    sa.Column("reference", sa.String(64), nullable=False, index=True),
    sa.Column("category", sa.String(64), nullable=False),
    sa.Column("score_band", sa.String(16), nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("confirmations_required", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
confirmations = sa.Table(
    "alert_confirmations",
    metadata,
    sa.Column("alert_id", sa.String(64), primary_key=True),
    sa.Column("person", sa.String(256), primary_key=True),
    sa.Column("verdict", sa.String(16), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)


#: The durable outbox of control centers: one row per alert raised and per change of its
#: confirmation state, written in the audit entry's transaction; cursors are its ``seq``.
alert_events = sa.Table(
    "alert_events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("alert_id", sa.String(64), nullable=False, index=True),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("confirmations", sa.Integer, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[alerts, confirmations])


def _v2(conn: Connection) -> None:
    metadata.create_all(conn, tables=[alert_events])


def _v3(conn: Connection) -> None:
    # The retention purge finds old alerts by list and capture time once a minute: without
    # an index, a scan of every alert kept, under the write lock.
    conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS ix_alerts_gallery_capture ON alerts (gallery, capture_time)"
    )


MIGRATIONS = [
    Migration(1, "alerts and confirmations", _v1),
    Migration(2, "alert events outbox", _v2),
    Migration(3, "index on (gallery, capture_time), for the retention purge", _v3),
]

PENDING = "PENDING"
PARTIAL = "PARTIALLY_CONFIRMED"
CONFIRMED = "CONFIRMED"
REJECTED = "REJECTED"


def score_band(score: float, threshold: float) -> str:
    """A coarse band instead of the raw score, for subscribers (R10)."""
    if score >= threshold + 0.15:
        return "HIGH"
    if score >= threshold + 0.05:
        return "MEDIUM"
    return "LOW"


@dataclasses.dataclass(frozen=True)
class Alert:
    seq: int
    alert_id: str
    decision_id: str
    audit_index: int
    caller_org: str
    site_id: str
    municipality: str
    region: str
    capture_time: dt.datetime
    gallery: str
    reference: str
    category: str
    score_band: str
    state: str
    confirmations_required: int
    confirmations: int = 0


def _alert(row: Any, count: int = 0) -> Alert:
    return Alert(
        seq=int(row.seq),
        alert_id=row.alert_id,
        decision_id=row.decision_id,
        audit_index=int(row.audit_index),
        caller_org=row.caller_org,
        site_id=row.site_id,
        municipality=row.municipality,
        region=row.region,
        capture_time=dt.datetime.fromtimestamp(row.capture_time, dt.UTC),
        gallery=row.gallery,
        reference=row.reference,
        category=row.category,
        score_band=row.score_band,
        state=row.state,
        confirmations_required=int(row.confirmations_required),
        confirmations=count,
    )


@functools.lru_cache(maxsize=8)
def _events_since(limit: int) -> sa.Select[Any]:
    # Built once per limit: the feed runs this after every commit that raised an alert, and
    # building the statement anew cost more than the query.
    ev = alert_events
    return (
        sa.select(
            ev.c.seq.label("ev_seq"),
            ev.c.state.label("ev_state"),
            ev.c.confirmations.label("ev_confirmations"),
            *alerts.c,
        )
        .join(alerts, alerts.c.alert_id == ev.c.alert_id)
        .where(ev.c.seq > sa.bindparam("after"))
        .order_by(ev.c.seq)
        .limit(limit)
    )


class AlertStore:
    """Alerts and confirmations (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        migrate(engine, "alerts", MIGRATIONS)

    @staticmethod
    def companion(items: list[dict[str, Any]]) -> Companion | None:
        """Alert rows written in the transaction of the decision's audit entry."""
        if not items:
            return None

        events = [
            {
                "alert_id": r["alert_id"],
                "state": r["state"],
                "confirmations": 0,
                "at": r["created_at"],
            }
            for r in items
        ]
        return Companions(
            (
                Rows(alerts, lambda index: [dict(row, audit_index=index) for row in items]),
                Rows(alert_events, lambda _index: events),
            )
        )

    def get(self, alert_id: str) -> Alert:
        """One alert with its confirmation count.

        Raises:
            NotFound: no such alert.
        """
        with self.engine.connect() as conn:
            row = conn.execute(alerts.select().where(alerts.c.alert_id == alert_id)).first()
            if row is None:
                raise NotFound("no such alert", field="alert_id")
            count = conn.execute(
                sa.select(sa.func.count())
                .select_from(confirmations)
                .where(confirmations.c.alert_id == alert_id, confirmations.c.verdict == CONFIRMED)
            ).scalar_one()
        return _alert(row, int(count))

    def confirm_in(
        self, conn: Connection, alert_id: str, person: str, verdict: str, when: dt.datetime
    ) -> Alert:
        """Record one person's verdict inside ``conn``'s transaction; return the new state.

        Raises:
            NotFound: no such alert.
            FailedPrecondition: the alert was already rejected, or this person already gave
                a different verdict.
        """
        row = conn.execute(alerts.select().where(alerts.c.alert_id == alert_id)).first()
        if row is None:
            raise NotFound("no such alert", field="alert_id")
        if row.state == REJECTED:
            raise FailedPrecondition("the alert was already rejected", field="alert_id")
        prior = conn.execute(
            sa.select(confirmations.c.verdict).where(
                confirmations.c.alert_id == alert_id, confirmations.c.person == person
            )
        ).first()
        if prior is not None and prior.verdict != verdict:
            raise FailedPrecondition(
                "this person already gave another verdict on the alert", field="verdict"
            )
        if prior is None:
            conn.execute(
                confirmations.insert().values(
                    alert_id=alert_id, person=person, verdict=verdict, at=when.timestamp()
                )
            )
        count = int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(confirmations)
                .where(confirmations.c.alert_id == alert_id, confirmations.c.verdict == CONFIRMED)
            ).scalar_one()
        )
        if verdict == REJECTED:
            state = REJECTED
        elif count >= int(row.confirmations_required):
            state = CONFIRMED
        else:
            state = PARTIAL
        conn.execute(alerts.update().where(alerts.c.alert_id == alert_id).values(state=state))
        conn.execute(
            alert_events.insert(),
            {"alert_id": alert_id, "state": state, "confirmations": count, "at": when.timestamp()},
        )
        row = conn.execute(alerts.select().where(alerts.c.alert_id == alert_id)).one()
        return _alert(row, count)

    def check_confirmable(self, alert_id: str, person: str, verdict: str) -> Alert:
        """Fail early, outside the audit transaction, on a verdict that cannot apply.

        Raises:
            NotFound, FailedPrecondition: as :meth:`confirm_in`.
        """
        alert = self.get(alert_id)
        if alert.state == REJECTED:
            raise FailedPrecondition("the alert was already rejected", field="alert_id")
        with self.engine.connect() as conn:
            prior = conn.execute(
                sa.select(confirmations.c.verdict).where(
                    confirmations.c.alert_id == alert_id, confirmations.c.person == person
                )
            ).first()
        if prior is not None and prior.verdict != verdict:
            raise FailedPrecondition(
                "this person already gave another verdict on the alert", field="verdict"
            )
        return alert

    def last_event_seq(self) -> int:
        """The newest outbox position (a subscription without a cursor starts after it)."""
        with read_connection(self.engine) as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.coalesce(sa.func.max(alert_events.c.seq), 0))
                ).scalar_one()
            )

    def events_since(self, seq: int, limit: int = 500) -> list[tuple[int, Alert]]:
        """Outbox rows after ``seq`` with their alert (state and count as of that event)."""
        with read_connection(self.engine) as conn:
            rows = conn.execute(_events_since(limit), {"after": seq}).all()
        return [
            (
                int(r.ev_seq),
                dataclasses.replace(_alert(r, int(r.ev_confirmations)), state=str(r.ev_state)),
            )
            for r in rows
        ]

    def purge(self, retention_days: dict[str, float], now: dt.datetime, *, batch: int = 500) -> int:
        """Delete alerts (and their confirmations and events) older than their list's
        retention; return how many alerts went. Sightings are kept only that long. Up to
        ``batch`` alerts go per transaction, found on the (gallery, capture time) index, so
        that the purge never holds the write lock long enough to stall the audit commits of
        the calls being served."""
        removed = 0
        for gallery, days in retention_days.items():
            cutoff = (now - dt.timedelta(days=float(days))).timestamp()
            while True:
                with write_transaction(self.engine) as conn:
                    ids = [
                        r.alert_id
                        for r in conn.execute(
                            sa.select(alerts.c.alert_id)
                            .where(alerts.c.gallery == gallery, alerts.c.capture_time < cutoff)
                            .limit(batch)
                        )
                    ]
                    if ids:
                        conn.execute(
                            confirmations.delete().where(confirmations.c.alert_id.in_(ids))
                        )
                        conn.execute(alert_events.delete().where(alert_events.c.alert_id.in_(ids)))
                        conn.execute(alerts.delete().where(alerts.c.alert_id.in_(ids)))
                removed += len(ids)
                if len(ids) < batch:
                    break
        return removed

    def since(self, seq: int, limit: int = 1000) -> list[Alert]:
        """Alerts after ``seq``, in order."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                alerts.select().where(alerts.c.seq > seq).order_by(alerts.c.seq).limit(limit)
            ).all()
        return [_alert(r) for r in rows]

    def by_reference(self, reference: str, *, not_before: dt.datetime) -> list[Alert]:
        """Alerts of one requisitoria or vehicle, newest first, within retention."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                alerts.select()
                .where(
                    alerts.c.reference == reference,
                    alerts.c.capture_time >= not_before.timestamp(),
                )
                .order_by(alerts.c.seq.desc())
            ).all()
        return [_alert(r) for r in rows]


class AlertBus:
    """Wakes subscribers of this process when alert events were committed.

    Subscribers also poll the outbox every second, so events committed by another replica
    arrive too; the bus only makes the local ones immediate.
    """

    def __init__(self) -> None:
        self._waiters: set[asyncio.Event] = set()

    def notify(self) -> None:
        for ev in list(self._waiters):
            ev.set()

    async def wait(self, poll_s: float) -> None:
        ev = asyncio.Event()
        self._waiters.add(ev)
        try:
            await asyncio.wait_for(ev.wait(), poll_s)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(ev)


def in_scope(scope: Any, alert: Any) -> bool:
    """R10: whether an alert lies in the caller's jurisdiction."""
    level = (scope or {}).get("level", "")
    if level == "national":
        return True
    if level == "own_sites":
        return bool(alert.municipality == scope.get("municipality"))
    if level == "region":
        return bool(alert.region.lower() == str(scope.get("region", "")).lower())
    return False


def _seq(event: tuple[int, Alert]) -> int:
    return event[0]


class AlertFeed:
    """One reader of the outbox for every subscriber of this process.

    Each new outbox row is read from the database once and handed to all live subscribers
    from memory; a subscriber that resumes from an older cursor than the buffer holds is
    served from the database until it catches up. The outbox stays the source of truth: the
    buffer only saves queries.
    """

    def __init__(self, store: AlertStore, bus: AlertBus, *, keep: int = 10_000) -> None:
        self._store = store
        self._bus = bus
        self._keep = keep
        self._events: list[tuple[int, Alert]] = []
        self._last: int | None = None
        #: Set (and replaced) whenever new events arrive: every waiter wakes in one loop
        #: iteration, where a Condition would hand its lock to the waiters one at a time.
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def _ensure_running(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self._changed

    async def _run(self) -> None:
        while True:
            try:
                if self._last is None:
                    self._last = await asyncio.to_thread(self._store.last_event_seq)
                new = await asyncio.to_thread(self._store.events_since, self._last)
            except Exception:  # the database may be down: try again shortly
                await asyncio.sleep(1.0)
                continue
            if new:
                self._events.extend(new)
                del self._events[: max(0, len(self._events) - self._keep)]
                self._last = new[-1][0]
                changed, self._changed = self._changed, asyncio.Event()
                assert changed is not None
                changed.set()
            else:
                await self._bus.wait(1.0)

    async def start_position(self) -> int:
        """The outbox position "now" (where a subscription without a cursor starts)."""
        return int(await asyncio.to_thread(self._store.last_event_seq))

    async def after(self, cursor: int, wait_s: float = 1.0) -> list[tuple[int, Alert]]:
        """Events after ``cursor``; waits up to ``wait_s`` for new ones when there are none."""
        changed = self._ensure_running()
        last = self._last
        oldest = self._events[0][0] if self._events else None
        if last is None or (cursor < last and (oldest is None or cursor < oldest - 1)):
            # Behind what memory holds (or the feed has not started): read the outbox.
            rows = await asyncio.to_thread(self._store.events_since, cursor)
            if rows:
                return rows
        newer = self._newer(cursor)
        if newer:
            return newer
        try:
            await asyncio.wait_for(changed.wait(), wait_s)
        except TimeoutError:
            return []
        return self._newer(cursor)

    def _newer(self, cursor: int) -> list[tuple[int, Alert]]:
        # The buffer is in outbox order: a binary search, not a scan of up to ``keep`` events
        # per subscriber per wake-up (with 20 subscribers the scans were most of the delay).
        events = self._events
        return events[bisect.bisect_right(events, cursor, key=_seq) :]

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
