"""The running components every servicer shares, and the watchlist view the matcher needs.

Invariant: the in-memory view of requisitorias and vehicles is refreshed from the database
after every administrative change made through this process, and a hit is returned only
when its requisitoria or vehicle report is active *at the time of the search* (R6) — the
matcher's own filter is the first line, this view the second.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import operator
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.engine import Engine

from centinela.audit.entry import Digester
from centinela.audit.log import AuditLog
from centinela.config import Settings
from centinela.matcher.service import Matcher
from centinela.policy import PolicyService
from centinela.policy.engine import check_dynamic
from centinela.server.alerts import AlertBus, AlertFeed, AlertStore
from centinela.server.decision_cache import changes
from centinela.server.idempotency import IdempotencyStore
from centinela.server.instance import InstanceLock
from centinela.server.pipeline import Pipeline
from centinela.server.records import Records, RequisitionRecord, SiteRecord, VehicleRecord

_Row = tuple[Any, ...]


def _row_of(cls: type[Any]) -> Callable[[Any], _Row]:
    """A function giving a frozen record's fields as a plain tuple, in declaration order."""
    return operator.attrgetter(*(f.name for f in dataclasses.fields(cls)))


_requisition_row = _row_of(RequisitionRecord)
_vehicle_row = _row_of(VehicleRecord)


class WatchlistView:
    """Active requisitorias by subject, vehicle reports by id, and sites, in memory.

    Requisitorias and vehicle reports are held as plain tuples of their fields, not as
    record objects: a tuple of strings, times and flags is untracked by the cyclic garbage
    collector, while each dataclass instance (and each list) is tracked: with the gallery's
    sets, they made each full collection stop the event loop 110-128 ms at 100,000 entries
    and 411 ms at a million.
    The record is rebuilt for the one subject a hit names.
    """

    def __init__(self, records: Records) -> None:
        self._records = records
        self._lock = threading.Lock()
        self._by_subject: dict[str, tuple[_Row, ...]] = {}
        self._vehicles: dict[str, _Row] = {}
        self._sites: dict[str, SiteRecord] = {}

    def refresh(self) -> None:
        """Reload from the database (after a change, and at start)."""
        by_subject: dict[str, tuple[_Row, ...]] = {}
        for r in self._records.each_requisition():  # not lifted; all of them, unpaged
            have = by_subject.get(r.subject_ref, ())
            by_subject[r.subject_ref] = (*have, _requisition_row(r))
        vehicles = {v.vehicle_id: _vehicle_row(v) for v in self._records.each_vehicle()}
        sites = {s.site_id: s for s in self._records.each_site()}
        with self._lock:
            self._by_subject, self._vehicles, self._sites = by_subject, vehicles, sites

    def active_requisition(self, subject_ref: str, now: dt.datetime) -> RequisitionRecord | None:
        """The subject's active requisitoria expiring last, if any (R6)."""
        with self._lock:
            rows = self._by_subject.get(subject_ref, ())
        records = [RequisitionRecord(*row) for row in rows]
        live = [r for r in records if r.state(now) == "ACTIVE"]
        return max(live, key=lambda r: r.expires_at) if live else None

    def stolen_vehicle(self, vehicle_id: str) -> VehicleRecord | None:
        """The report if the vehicle is still reported stolen (R6)."""
        with self._lock:
            row = self._vehicles.get(vehicle_id)
        if row is None:
            return None
        v = VehicleRecord(*row)
        return v if v.stolen else None

    def site(self, site_id: str) -> SiteRecord | None:
        with self._lock:
            return self._sites.get(site_id)


@dataclasses.dataclass
class Components:
    """Everything the servicers use; built by ``centinela.server.wiring``."""

    settings: Settings
    engine: Engine
    records: Records
    alerts: AlertStore
    idempotency: IdempotencyStore
    audit: AuditLog
    digester: Digester
    policy: PolicyService
    matcher: Matcher
    pipeline: Pipeline
    view: WatchlistView
    executor: ThreadPoolExecutor
    face_model_id: str
    bundle_name: str
    shadow_name: str = ""
    bus: AlertBus = dataclasses.field(default_factory=AlertBus)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Set when the application starts to close: background threads end at their next rest.
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    feed: AlertFeed | None = None
    #: The lock that makes this process the database's one server (``server.instance``).
    instance: InstanceLock | None = None
    _policy_data_lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, repr=False
    )

    def alert_feed(self) -> AlertFeed:
        """The process's one outbox reader (created on first use, in the server's loop)."""
        if self.feed is None:
            self.feed = AlertFeed(self.alerts, self.bus)
        return self.feed

    def policy_config(self) -> dict[str, Any]:
        """The active bundle's static data (``data.centinela_config``): thresholds,
        framework flags, retention periods."""
        bundle = getattr(self.policy.active, "bundle", None)
        return dict(getattr(bundle, "config", None) or {})

    def sighting_retention_days(self) -> dict[str, float]:
        """Sighting retention per list, in days, from the active bundle's data."""
        raw = dict(self.policy_config().get("sighting_retention_days", {}))
        return {str(k): float(v) for k, v in raw.items()}

    def refresh_policy_data(self) -> None:
        """Push sites, authorisations and gallery models to the policy engines if they
        changed; refresh the watchlist view.

        Every watchlist write calls this, and most (requisitorias, vehicles) change nothing
        the policy reads. Pushing anyway recompiled the engines (~60 ms) and emptied the
        decision cache: one evaluation per active camera again, 12-17 CPU-seconds at 3,000
        cameras (benchmarks/decision_cache.py). A push drops only the decisions that read
        a changed entry: a new camera costs the other cameras nothing."""
        models = {"pnp_watchlist": self.face_model_id, "reniec_registry": self.face_model_id}
        # One refresh at a time: two admin writes refreshing at once could otherwise push
        # their data in the other order, leaving the engines with the older document and
        # the cache told of the wrong changes.
        with self._policy_data_lock:
            doc = check_dynamic(self.records.policy_data() | {"models": models})
            old = self.policy.dynamic_data
            if doc != old:
                self.policy.set_dynamic_data(doc)
                # Only decisions that looked up a changed site, authorisation or model go.
                self.pipeline.cache.invalidate(changes(old, doc))
        self.view.refresh()
