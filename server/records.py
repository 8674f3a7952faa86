"""The PNP's administrative records: sites, judicial authorisations, requisitorias, vehicles.

Invariants:

* No DNI, plate or name is stored here: people are pseudonymous ``subject_ref`` values and
  vehicles point to the matcher's encrypted plate entry by ``vehicle_id``. The plate is kept
  only masked (last two characters) for administrators' lists.
* Requisitorias are never deleted: lifting records when and why; expiry is a timestamp, so
  an entry stops matching at that instant without any job running (R6).
* Every change here is made by a servicer that has already had the policy's allow and writes
  the audit entry (R15); this module only stores. The servicers plan a change as a
  :class:`~centinela.matcher.writes.Write` (``*_write`` methods: checks done, SQL pending) and
  apply it inside the audit entry's own transaction, so the change and its entry commit
  together or not at all; :func:`serialised` holds the process's write lock from the checks
  to the commit, so the checks still hold when the change is applied.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import secrets
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from centinela.errors import AlreadyExists, InvalidArgument, NotFound, StorageError
from centinela.ids import ordered_token
from centinela.logs import get_logger
from centinela.matcher.writes import Write
from centinela.storage import Migration, migrate, write_transaction

log = get_logger("server.records")
T = TypeVar("T")

metadata = sa.MetaData()

sites = sa.Table(
    "sites",
    metadata,
    sa.Column("site_id", sa.String(128), primary_key=True),
    sa.Column("municipality", sa.String(128), nullable=False, index=True),
    sa.Column("region", sa.String(64), nullable=False),
    sa.Column("kind", sa.Integer, nullable=False),
    sa.Column("description", sa.String(256), nullable=False),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
)

authorisations = sa.Table(
    "authorisations",
    metadata,
    sa.Column("authorisation_id", sa.String(128), primary_key=True),
    sa.Column("court", sa.String(256), nullable=False),
    sa.Column("scope", sa.Text, nullable=False),  # JSON: sites, window, offences, subjects
    sa.Column("revoked", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
)

requisitions = sa.Table(
    "requisitions",
    metadata,
    sa.Column("requisition_id", sa.String(64), primary_key=True),
    sa.Column("subject_ref", sa.String(64), nullable=False, index=True),
    sa.Column("warrant_id", sa.String(128), nullable=False, unique=True),
    sa.Column("issuing_court", sa.String(256), nullable=False),
    sa.Column("offence_category", sa.String(64), nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("lifted_at", sa.Float, nullable=True),
    sa.Column("lift_reason", sa.String(256), nullable=True),
    sa.Column("from_registry", sa.Boolean, nullable=False),
    sa.Column("template_ids", sa.Text, nullable=False),  # JSON list
    sa.Column("created_seq", sa.Integer, nullable=False),
)

vehicles = sa.Table(
    "vehicles",
    metadata,
    sa.Column("vehicle_id", sa.String(64), primary_key=True),
    sa.Column("police_report_id", sa.String(128), nullable=False, unique=True),
    sa.Column("plate_masked", sa.String(16), nullable=False),
    sa.Column("report_category", sa.String(64), nullable=False),
    sa.Column("reported_at", sa.Float, nullable=False),
    sa.Column("recovered_at", sa.Float, nullable=True),
    sa.Column("created_seq", sa.Integer, nullable=False),
)


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[sites, authorisations, requisitions, vehicles])


def _v2(conn: Connection) -> None:
    # New records take max(created_seq) + 1: without an index that is a scan of the whole
    # list per insert (measured: a 100,000-requisition list took ~5 ms a CreateRequisition,
    # a bulk load O(n^2)). Not unique: two PostgreSQL writers may tie, which only orders
    # them arbitrarily in a listing.
    for table in ("requisitions", "vehicles"):
        conn.exec_driver_sql(
            f"CREATE INDEX IF NOT EXISTS ix_{table}_created_seq ON {table} (created_seq)"
        )


MIGRATIONS = [
    Migration(1, "sites, authorisations, requisitions, vehicles", _v1),
    Migration(2, "index on created_seq (insert order) of requisitions and vehicles", _v2),
]


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def epoch(when: dt.datetime) -> float:
    return when.timestamp()


def from_epoch(value: float | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, dt.UTC)


def new_id(prefix: str) -> str:
    """A random, unguessable id such as ``req_3f9a…``."""
    return f"{prefix}_{secrets.token_hex(10)}"


def ordered_id(prefix: str, *, now_ns: int | None = None) -> str:
    """An unguessable id in creation order, e.g. ``dec_01a23f…``
    (:func:`centinela.ids.ordered_token` after the prefix).

    Decision and alert ids are such ids: each alert enters three indexes by them
    (``alerts``: ``alert_id``, ``decision_id``; ``alert_events``: ``alert_id``), and with
    random ids the disk took 97 KB a MatchFace call, with these 66 KB
    (``benchmarks/match_e2e.py`` at 100k listed, 41 % alerts, two alternating rounds).
    """
    return f"{prefix}_{ordered_token(now_ns=now_ns)}"


def mask_plate(normalised: str) -> str:
    """All but the last two characters hidden."""
    return "*" * max(0, len(normalised) - 2) + normalised[-2:]


@dataclasses.dataclass(frozen=True)
class SiteRecord:
    site_id: str
    municipality: str
    region: str
    kind: int
    description: str
    active: bool


@dataclasses.dataclass(frozen=True)
class AuthorisationRecord:
    authorisation_id: str
    court: str
    site_ids: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    offence_categories: tuple[str, ...]
    subject_refs: tuple[str, ...]
    revoked: bool

    def to_policy(self) -> dict[str, Any]:
        return {
            "court": self.court,
            "sites": list(self.site_ids),
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "offences": list(self.offence_categories),
            "subjects": list(self.subject_refs),
            "revoked": self.revoked,
        }


@dataclasses.dataclass(frozen=True)
class RequisitionRecord:
    requisition_id: str
    subject_ref: str
    warrant_id: str
    issuing_court: str
    offence_category: str
    issued_at: dt.datetime
    expires_at: dt.datetime
    lifted_at: dt.datetime | None
    lift_reason: str
    from_registry: bool
    template_ids: tuple[str, ...]

    def state(self, now: dt.datetime) -> str:
        """ACTIVE, LIFTED or EXPIRED at ``now``."""
        if self.lifted_at is not None:
            return "LIFTED"
        if now >= self.expires_at:
            return "EXPIRED"
        return "ACTIVE"


@dataclasses.dataclass(frozen=True)
class VehicleRecord:
    vehicle_id: str
    police_report_id: str
    plate_masked: str
    report_category: str
    reported_at: dt.datetime
    recovered_at: dt.datetime | None

    @property
    def stolen(self) -> bool:
        return self.recovered_at is None


def _site(row: Any) -> SiteRecord:
    return SiteRecord(
        row.site_id, row.municipality, row.region, int(row.kind), row.description, bool(row.active)
    )


def _auth(row: Any) -> AuthorisationRecord:
    scope = json.loads(row.scope)
    return AuthorisationRecord(
        authorisation_id=row.authorisation_id,
        court=row.court,
        site_ids=tuple(scope["sites"]),
        not_before=dt.datetime.fromisoformat(scope["not_before"]),
        not_after=dt.datetime.fromisoformat(scope["not_after"]),
        offence_categories=tuple(scope["offences"]),
        subject_refs=tuple(scope["subjects"]),
        revoked=bool(row.revoked),
    )


def _req(row: Any) -> RequisitionRecord:
    return RequisitionRecord(
        requisition_id=row.requisition_id,
        subject_ref=row.subject_ref,
        warrant_id=row.warrant_id,
        issuing_court=row.issuing_court,
        offence_category=row.offence_category,
        issued_at=dt.datetime.fromtimestamp(row.issued_at, dt.UTC),
        expires_at=dt.datetime.fromtimestamp(row.expires_at, dt.UTC),
        lifted_at=from_epoch(row.lifted_at),
        lift_reason=row.lift_reason or "",
        from_registry=bool(row.from_registry),
        template_ids=tuple(json.loads(row.template_ids)),
    )


def _veh(row: Any) -> VehicleRecord:
    return VehicleRecord(
        vehicle_id=row.vehicle_id,
        police_report_id=row.police_report_id,
        plate_masked=row.plate_masked,
        report_category=row.report_category,
        reported_at=dt.datetime.fromtimestamp(row.reported_at, dt.UTC),
        recovered_at=from_epoch(row.recovered_at),
    )


class Records:
    """Storage of the administrative records (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        migrate(engine, "records", MIGRATIONS)

    def _run(self, fn: Any) -> Any:
        try:
            # Take the write lock up front: a deferred transaction that reads then writes
            # fails at once with SQLITE_BUSY when another writer holds the lock.
            with write_transaction(self.engine) as conn:
                return fn(conn)
        except sa.exc.IntegrityError as exc:
            raise AlreadyExists("a record with that id already exists") from exc
        except sa.exc.SQLAlchemyError as exc:
            raise StorageError(f"records: {exc.__class__.__name__}") from exc

    def _apply(self, write: Write) -> None:
        self._run(lambda conn: write(conn))

    def _one(self, table: sa.Table, column: Any, value: str, what: str, field: str) -> Any:
        def op(conn: Connection) -> Any:
            row = conn.execute(table.select().where(column == value)).first()
            if row is None:
                raise NotFound(f"no {what} {value!r}", field=field)
            return row

        return self._run(op)

    # ---- sites ----------------------------------------------------------------------------

    def get_site(self, site_id: str) -> SiteRecord:
        """Raises: NotFound."""
        return _site(self._one(sites, sites.c.site_id, site_id, "site", "site_id"))

    def site_exists(self, site_id: str) -> bool:
        try:
            self.get_site(site_id)
        except NotFound:
            return False
        return True

    @staticmethod
    def site_insert(rec: SiteRecord) -> Write:
        """Planned: register a site (the caller checked the id is free)."""
        values = {**dataclasses.asdict(rec), "created_at": now_utc().isoformat()}
        return _executes(sites.insert().values(**values))

    @staticmethod
    def site_active(site_id: str, active: bool) -> Write:
        """Planned: (de)activate a site (the caller checked it exists)."""
        stmt = sites.update().where(sites.c.site_id == site_id).values(active=active)
        return _executes(stmt)

    def add_site(self, rec: SiteRecord) -> SiteRecord:
        self._apply(self.site_insert(rec))
        return rec

    def set_site_active(self, site_id: str, active: bool) -> SiteRecord:
        self.get_site(site_id)
        self._apply(self.site_active(site_id, active))
        return self.get_site(site_id)

    def list_sites(
        self, municipality: str = "", *, offset: int = 0, limit: int = 1000
    ) -> list[SiteRecord]:
        q = sites.select().order_by(sites.c.site_id).offset(offset).limit(limit)
        if municipality:
            q = q.where(sites.c.municipality == municipality)
        return self._run(lambda conn: [_site(r) for r in conn.execute(q)])  # type: ignore[no-any-return]

    # ---- authorisations -------------------------------------------------------------------

    def get_authorisation(self, authorisation_id: str) -> AuthorisationRecord:
        """Raises: NotFound."""
        row = self._one(
            authorisations,
            authorisations.c.authorisation_id,
            authorisation_id,
            "authorisation",
            "authorisation_id",
        )
        return _auth(row)

    def authorisation_exists(self, authorisation_id: str) -> bool:
        try:
            self.get_authorisation(authorisation_id)
        except NotFound:
            return False
        return True

    @staticmethod
    def authorisation_insert(rec: AuthorisationRecord) -> Write:
        """Planned: register an authorisation (the caller checked the id is free).

        Raises:
            InvalidArgument: its window ends before it starts.
        """
        if rec.not_after <= rec.not_before:
            raise InvalidArgument(
                "not_after must lie after not_before", field="authorisation.not_after"
            )
        stmt = authorisations.insert().values(
            authorisation_id=rec.authorisation_id,
            court=rec.court,
            scope=json.dumps(rec.to_policy() | {"revoked": None}, sort_keys=True),
            revoked=False,
            created_at=now_utc().isoformat(),
        )
        return _executes(stmt)

    @staticmethod
    def authorisation_revoke(authorisation_id: str) -> Write:
        """Planned: revoke an authorisation (the caller checked it exists)."""
        stmt = (
            authorisations.update()
            .where(authorisations.c.authorisation_id == authorisation_id)
            .values(revoked=True)
        )
        return _executes(stmt)

    def add_authorisation(self, rec: AuthorisationRecord) -> AuthorisationRecord:
        self._apply(self.authorisation_insert(rec))
        return rec

    def revoke_authorisation(self, authorisation_id: str) -> AuthorisationRecord:
        self.get_authorisation(authorisation_id)
        self._apply(self.authorisation_revoke(authorisation_id))
        return self.get_authorisation(authorisation_id)

    def list_authorisations(
        self, *, include_revoked: bool = True, offset: int = 0, limit: int = 100_000
    ) -> list[AuthorisationRecord]:
        q = authorisations.select().order_by(authorisations.c.authorisation_id)
        if not include_revoked:
            q = q.where(authorisations.c.revoked.is_(False))
        q = q.offset(offset).limit(limit)
        return self._run(lambda conn: [_auth(r) for r in conn.execute(q)])  # type: ignore[no-any-return]

    # ---- requisitorias --------------------------------------------------------------------

    def warrant_in_use(self, warrant_id: str) -> bool:
        def op(conn: Connection) -> bool:
            q = sa.select(requisitions.c.requisition_id).where(
                requisitions.c.warrant_id == warrant_id
            )
            return conn.execute(q).first() is not None

        return bool(self._run(op))

    @staticmethod
    def requisition_insert(rec: RequisitionRecord) -> Write:
        """Planned: create a requisitoria (the caller checked its warrant is not in use)."""

        def step(conn: Connection) -> None:
            seq = (
                conn.execute(
                    sa.select(sa.func.coalesce(sa.func.max(requisitions.c.created_seq), 0))
                ).scalar_one()
                + 1
            )
            conn.execute(
                requisitions.insert().values(
                    requisition_id=rec.requisition_id,
                    subject_ref=rec.subject_ref,
                    warrant_id=rec.warrant_id,
                    issuing_court=rec.issuing_court,
                    offence_category=rec.offence_category,
                    issued_at=epoch(rec.issued_at),
                    expires_at=epoch(rec.expires_at),
                    lifted_at=None,
                    lift_reason=None,
                    from_registry=rec.from_registry,
                    template_ids=json.dumps(list(rec.template_ids)),
                    created_seq=seq,
                )
            )

        return Write(step)

    @staticmethod
    def requisition_update(requisition_id: str, **values: Any) -> Write:
        """Planned: change a requisitoria that is not lifted (one lifted meanwhile is left
        alone: a lift is final).

        Raises:
            InvalidArgument: a field that cannot be changed.
        """
        allowed = {"issuing_court", "offence_category", "expires_at", "lifted_at", "lift_reason"}
        unknown = set(values) - allowed
        if unknown:
            raise InvalidArgument(f"cannot update {sorted(unknown)}", field="update_mask")
        stored = {k: (epoch(v) if isinstance(v, dt.datetime) else v) for k, v in values.items()}
        stmt = (
            requisitions.update()
            .where(
                requisitions.c.requisition_id == requisition_id,
                requisitions.c.lifted_at.is_(None),
            )
            .values(**stored)
        )
        return _executes(stmt)

    def add_requisition(self, rec: RequisitionRecord) -> RequisitionRecord:
        self._apply(self.requisition_insert(rec))
        return rec

    def add_requisitions(self, recs: Sequence[RequisitionRecord]) -> None:
        """Many requisitorias in one transaction (bulk loads: one fsync, not one a record).

        Raises:
            AlreadyExists: one of them exists (none is added).
        """
        self._apply(Write(*(self.requisition_insert(rec) for rec in recs)))

    def get_requisition(self, requisition_id: str) -> RequisitionRecord:
        """Raises: NotFound."""
        row = self._one(
            requisitions,
            requisitions.c.requisition_id,
            requisition_id,
            "requisitoria",
            "requisition_id",
        )
        return _req(row)

    def update_requisition(self, requisition_id: str, **values: Any) -> RequisitionRecord:
        write = self.requisition_update(requisition_id, **values)
        self.get_requisition(requisition_id)
        self._apply(write)
        return self.get_requisition(requisition_id)

    def list_requisitions(
        self,
        *,
        state: str = "",
        now: dt.datetime | None = None,
        offset: int = 0,
        limit: int = 100_000,
    ) -> list[RequisitionRecord]:
        now = now or now_utc()
        q = requisitions.select().order_by(requisitions.c.created_seq.desc())
        t = epoch(now)
        if state == "ACTIVE":
            q = q.where(requisitions.c.lifted_at.is_(None), requisitions.c.expires_at > t)
        elif state == "LIFTED":
            q = q.where(requisitions.c.lifted_at.is_not(None))
        elif state == "EXPIRED":
            q = q.where(requisitions.c.lifted_at.is_(None), requisitions.c.expires_at <= t)
        q = q.offset(offset).limit(limit)
        return self._run(lambda conn: [_req(r) for r in conn.execute(q)])  # type: ignore[no-any-return]

    def each_requisition(
        self, *, lifted: bool = False, batch: int = 10_000
    ) -> Iterator[RequisitionRecord]:
        """Every requisitoria (lifted ones only if ``lifted``), in id order, read ``batch``
        rows at a time: no page limit, for the in-memory watchlist view."""
        where = None if lifted else requisitions.c.lifted_at.is_(None)
        for row in self._each(requisitions, requisitions.c.requisition_id, where, batch):
            yield _req(row)

    # ---- vehicles -------------------------------------------------------------------------

    def get_vehicle(self, vehicle_id: str) -> VehicleRecord:
        """Raises: NotFound."""
        row = self._one(vehicles, vehicles.c.vehicle_id, vehicle_id, "vehicle report", "vehicle_id")
        return _veh(row)

    def report_in_use(self, police_report_id: str) -> bool:
        def op(conn: Connection) -> bool:
            q = sa.select(vehicles.c.vehicle_id).where(
                vehicles.c.police_report_id == police_report_id
            )
            return conn.execute(q).first() is not None

        return bool(self._run(op))

    @staticmethod
    def vehicle_insert(rec: VehicleRecord) -> Write:
        """Planned: record a stolen-vehicle report (the caller checked its ids are free)."""

        def step(conn: Connection) -> None:
            seq = (
                conn.execute(
                    sa.select(sa.func.coalesce(sa.func.max(vehicles.c.created_seq), 0))
                ).scalar_one()
                + 1
            )
            conn.execute(
                vehicles.insert().values(
                    vehicle_id=rec.vehicle_id,
                    police_report_id=rec.police_report_id,
                    plate_masked=rec.plate_masked,
                    report_category=rec.report_category,
                    reported_at=epoch(rec.reported_at),
                    recovered_at=None,
                    created_seq=seq,
                )
            )

        return Write(step)

    @staticmethod
    def vehicle_recover(vehicle_id: str, when: dt.datetime) -> Write:
        """Planned: mark a vehicle recovered (one recovered meanwhile keeps its first date)."""
        stmt = (
            vehicles.update()
            .where(vehicles.c.vehicle_id == vehicle_id, vehicles.c.recovered_at.is_(None))
            .values(recovered_at=epoch(when))
        )
        return _executes(stmt)

    def add_vehicle(self, rec: VehicleRecord) -> VehicleRecord:
        self._apply(self.vehicle_insert(rec))
        return rec

    def recover_vehicle(self, vehicle_id: str, when: dt.datetime) -> VehicleRecord:
        self.get_vehicle(vehicle_id)
        self._apply(self.vehicle_recover(vehicle_id, when))
        return self.get_vehicle(vehicle_id)

    def list_vehicles(
        self, *, state: str = "", offset: int = 0, limit: int = 100_000
    ) -> list[VehicleRecord]:
        q = vehicles.select().order_by(vehicles.c.created_seq.desc())
        if state == "STOLEN":
            q = q.where(vehicles.c.recovered_at.is_(None))
        elif state == "RECOVERED":
            q = q.where(vehicles.c.recovered_at.is_not(None))
        q = q.offset(offset).limit(limit)
        return self._run(lambda conn: [_veh(r) for r in conn.execute(q)])  # type: ignore[no-any-return]

    def each_site(self, *, batch: int = 10_000) -> Iterator[SiteRecord]:
        """Every site, in id order, ``batch`` rows at a time (no page limit)."""
        for row in self._each(sites, sites.c.site_id, None, batch):
            yield _site(row)

    def each_authorisation(self, *, batch: int = 10_000) -> Iterator[AuthorisationRecord]:
        """Every judicial authorisation, revoked ones too, in id order (no page limit)."""
        for row in self._each(authorisations, authorisations.c.authorisation_id, None, batch):
            yield _auth(row)

    def each_vehicle(self, *, batch: int = 10_000) -> Iterator[VehicleRecord]:
        """Every vehicle report, in id order, ``batch`` rows at a time (no page limit)."""
        for row in self._each(vehicles, vehicles.c.vehicle_id, None, batch):
            yield _veh(row)

    def _each(self, table: sa.Table, key: Any, where: Any, batch: int) -> Iterator[Any]:
        """All rows of ``table`` matching ``where``, by keyset pages on its unique ``key``."""
        last: Any = None
        while True:
            q = table.select().order_by(key).limit(batch)
            if where is not None:
                q = q.where(where)
            if last is not None:
                q = q.where(key > last)

            def page(conn: Connection, q: Any = q) -> list[Any]:
                return list(conn.execute(q))

            rows: list[Any] = self._run(page)
            yield from rows
            if len(rows) < batch:
                return
            last = getattr(rows[-1], key.name)

    # ---- policy data ----------------------------------------------------------------------

    def policy_data(self) -> dict[str, Any]:
        """The ``data.dynamic`` document the policy engine needs (sites, authorisations)."""
        return {
            "sites": {
                s.site_id: {"municipality": s.municipality, "region": s.region, "active": s.active}
                for s in self.each_site()
            },
            "authorisations": {
                a.authorisation_id: a.to_policy() for a in self.each_authorisation()
            },
        }


def _executes(statement: Any) -> Write:
    """A write of one prepared statement."""

    def step(conn: Connection) -> None:
        conn.execute(statement)

    return Write(step)


def page_of(fetch: Callable[[int, int], Sequence[T]], token: str, size: int) -> tuple[list[T], str]:
    """One page of a listing; tokens are opaque offsets, page sizes 1-500 (0: 50).

    ``fetch(offset, limit)`` reads at most ``limit`` items from ``offset`` on (in the
    database, so a listing of any length pages through to its end); one more than the page
    is read to know whether another page follows.
    """
    size = 50 if size == 0 else min(size, 500)
    try:
        start = int(token) if token else 0
    except ValueError as exc:
        raise InvalidArgument("is not a token from a previous answer", field="page_token") from exc
    if start < 0:
        raise InvalidArgument("is not a token from a previous answer", field="page_token")
    items = list(fetch(start, size + 1))
    return items[:size], (str(start + size) if len(items) > size else "")


def page(items: Sequence[T], token: str, size: int) -> tuple[list[T], str]:
    """:func:`page_of` over a list already in memory."""
    return page_of(lambda offset, limit: items[offset : offset + limit], token, size)


# ---- one writer at a time ------------------------------------------------------------------

_LOCK_KEY = "centinela.write_lock"


def write_lock(extra: MutableMapping[str, Any]) -> asyncio.Lock:
    """The process's lock for administrative and registry writes (kept in
    ``Components.extra``): a change is checked and planned, then committed with its audit
    entry, under it, so no other change of this process lands between the checks and the
    commit."""
    lock = extra.get(_LOCK_KEY)
    if lock is None:
        lock = extra[_LOCK_KEY] = asyncio.Lock()
    assert isinstance(lock, asyncio.Lock)
    return lock


def _log_orphan(task: asyncio.Future[Any]) -> None:
    """Say in the log when a change whose caller was gone by then failed (no one hears)."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("records.orphaned_change_failed", error=type(task.exception()).__name__)


async def serialised(extra: MutableMapping[str, Any], fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn`` under :func:`write_lock`, to its end even if the caller is cancelled
    meanwhile (the lock is held until the audit commit it awaits has settled)."""
    lock = write_lock(extra)

    async def run() -> T:
        async with lock:
            return await fn()

    task = asyncio.ensure_future(run())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_log_orphan)
        raise
