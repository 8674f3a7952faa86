"""Reading the audit log for compliance officers: filters, paging cursors, statistics, lookup.

Invariants (DESIGN.md §6, LEGAL_RULES R16):

* Read-only: nothing here writes to the log or its tables; the SQL is plain SELECTs.
* A filter is decided on the canonical JSON entry itself (the bytes that were hashed), never
  on a side table, so what an officer sees is exactly what the Merkle tree commits to. A cheap
  byte test on the canonical form (``"org":"x"``) skips most non-matching entries before any
  JSON is parsed; the parsed entry then decides.
* The cost of one page is bounded: a page scans at most ``scan_budget`` entries and then
  returns with a cursor, even with fewer events than asked (an empty page with a token means
  "keep going"). A time filter starts the scan by binary search on entry times, with a
  safety margin of :data:`TIME_MARGIN`, because entries get their time just before they are
  queued to the single writer and so appear in time order up to the queue latency. A
  wall-clock step backwards larger than the margin could hide older-stamped entries from a
  *time-filtered* list; unfiltered lists, exports and verification see every entry.
* Whole-log statistics are kept between runs in one file of the data directory
  (:class:`StatsSnapshot`), sealed with the audit HMAC key and bound to the log's root at
  the size they count: a snapshot that was altered, or that counts another log (or an
  altered one), is refused and the log is scanned instead. That file is the one thing this
  module writes.
* The page token is an opaque cursor over leaf indexes (``ev1.<base64>``); a token that does
  not decode, or points beyond the log, is refused as INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import datetime as dt
import hmac
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from centinela.audit.entry import Digester
from centinela.audit.log import AuditLog
from centinela.errors import InvalidArgument, NotFound
from centinela.logs import get_logger
from centinela.storage import is_sqlite

#: Entries are in time order up to this slack (see the module docstring).
TIME_MARGIN = dt.timedelta(minutes=5)
#: Entries one ListEvents page may scan before it returns with a cursor.
DEFAULT_SCAN_BUDGET = 50_000
_TOKEN_PREFIX = "ev1."  # noqa: S105 (a cursor prefix, not a secret)
_TIME_RE = re.compile(rb'"time":"([0-9T:.Z-]+)"')
_CHUNK = 2_000

_log = get_logger("server.audit_query")


def encode_cursor(index: int) -> str:
    """An opaque page token for leaf ``index``."""
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(str(index).encode()).decode().rstrip("=")


def decode_cursor(token: str, size: int) -> int:
    """The leaf index of a page token ("" is 0).

    Raises:
        InvalidArgument: not a token from a previous answer, or beyond the log.
    """
    if not token:
        return 0
    try:
        if not token.startswith(_TOKEN_PREFIX):
            raise ValueError
        body = token[len(_TOKEN_PREFIX) :]
        index = int(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode("ascii"))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument("is not a token from a previous answer", field="page_token") from None
    if not 0 <= index <= size:
        raise InvalidArgument("points beyond the log", field="page_token")
    return index


def parse_time(text: str) -> dt.datetime:
    """An entry's RFC 3339 ``time`` as an aware datetime."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def entry_time(entry: bytes) -> dt.datetime | None:
    """The ``time`` of an entry, read without parsing the whole JSON."""
    m = _TIME_RE.search(entry)
    return parse_time(m.group(1).decode()) if m else None


def _needle(key: str, value: str) -> bytes:
    # Canonical JSON: no spaces, keys and values escaped the json.dumps way.
    return (json.dumps(key) + ":" + json.dumps(value)).encode()


@dataclasses.dataclass(frozen=True)
class EventFilter:
    """What ListEvents asks for; empty fields do not filter."""

    since: dt.datetime | None = None
    until: dt.datetime | None = None
    caller_org: str = ""
    site_id: str = ""
    purpose: str = ""
    outcome: str = ""
    rule_id: str = ""
    event_type: str = ""

    def _needles(self) -> list[bytes]:
        out = []
        if self.caller_org:
            out.append(_needle("org", self.caller_org))
        if self.site_id:
            out.append(_needle("site_id", self.site_id))
        if self.purpose:
            out.append(_needle("purpose", self.purpose))
        if self.outcome:
            out.append(_needle("outcome", self.outcome))
        if self.event_type:
            out.append(_needle("type", self.event_type))
        if self.rule_id:
            out.append(json.dumps(self.rule_id).encode())
        return out

    def matcher(self) -> Callable[[bytes], bool]:
        """A predicate on entry bytes (a byte pre-test, then the parsed entry decides)."""
        needles = self._needles()

        def match(entry: bytes) -> bool:
            if any(n not in entry for n in needles):
                return False
            try:
                doc = json.loads(entry)
            except ValueError:
                return False
            return self.accepts(doc)

        return match

    def accepts(self, doc: dict[str, Any]) -> bool:
        """Whether a parsed entry passes every filter."""
        caller = doc.get("caller") or {}
        checks = (
            (self.caller_org, caller.get("org")),
            (self.site_id, doc.get("site_id")),
            (self.purpose, doc.get("purpose")),
            (self.outcome, doc.get("outcome")),
            (self.event_type, doc.get("type")),
        )
        if any(want and got != want for want, got in checks):
            return False
        if self.rule_id and self.rule_id not in (doc.get("rule_ids") or ()):
            return False
        if self.since is not None or self.until is not None:
            try:
                when = parse_time(str(doc.get("time", "")))
            except ValueError:
                return False
            if self.since is not None and when < self.since:
                return False
            if self.until is not None and when >= self.until:
                return False
        return True


@dataclasses.dataclass
class Page:
    """One page: (index, entry) pairs, the cursor to continue from (None: last page), and the
    half-open range of indexes that was scanned."""

    items: list[tuple[int, bytes]]
    next_index: int | None
    scanned_from: int
    scanned_to: int


def _iter(log: AuditLog, start: int, end: int) -> Iterator[bytes]:
    pos = start
    while pos < end:
        stop = min(end, pos + _CHUNK)
        yield from log.store.entries(pos, stop)
        pos = stop


def first_index_at(log: AuditLog, when: dt.datetime, size: int) -> int:
    """The first index whose entry may be at or after ``when`` (binary search, with margin)."""
    target = when - TIME_MARGIN

    def time_at(i: int) -> dt.datetime:
        t = entry_time(log.store.entries(i, i + 1)[0])
        return t if t is not None else target

    class _Times:
        def __len__(self) -> int:
            return size

        def __getitem__(self, i: int) -> dt.datetime:
            return time_at(i)

    return bisect.bisect_left(_Times(), target)


def list_page(
    log: AuditLog,
    flt: EventFilter,
    start: int,
    page_size: int,
    *,
    scan_budget: int = DEFAULT_SCAN_BUDGET,
) -> Page:
    """Scan from ``start`` for up to ``page_size`` matching entries (blocking).

    The scan stops at the log's size when the call began, after ``scan_budget`` entries, or
    once entries are later than ``until`` plus the margin.
    """
    size = log.size
    if flt.since is not None and start == 0:
        start = first_index_at(log, flt.since, size)
    match = flt.matcher()
    stop_after = flt.until + TIME_MARGIN if flt.until is not None else None
    items: list[tuple[int, bytes]] = []
    end = min(size, start + scan_budget)
    pos = start
    finished = False
    for entry in _iter(log, start, end):
        if stop_after is not None:
            when = entry_time(entry)
            if when is not None and when > stop_after:
                finished = True
                break
        if match(entry):
            items.append((pos, entry))
        pos += 1
        if len(items) >= page_size:
            break
    nxt = None if finished or pos >= size else pos
    return Page(items, nxt, start, pos)


def find_decision(log: AuditLog, decision_id: str) -> int:
    """The index of a decision's entry: its last entry that is not a shadow disagreement.

    The search runs in the database (one pass over the leaf table, no row leaves it unless it
    holds the decision id); the hits are then confirmed on the parsed entries.

    Raises:
        NotFound: no entry carries that decision id.
    """
    needle = _needle("decision_id", decision_id)
    engine = log.store.engine
    if is_sqlite(engine):
        sql = "SELECT idx, entry FROM audit_leaves WHERE instr(entry, ?) > 0 ORDER BY idx"
    else:
        sql = "SELECT idx, entry FROM audit_leaves WHERE position(%s IN entry) > 0 ORDER BY idx"
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(sql, (needle,)).fetchall()
    best: int | None = None
    fallback: int | None = None
    size = log.size
    for idx, raw in rows:
        if int(idx) >= size:
            continue  # not yet in the tree this process holds
        doc = json.loads(bytes(raw))
        if doc.get("decision_id") != decision_id:
            continue
        fallback = int(idx)
        if doc.get("type") != "SHADOW_DISAGREEMENT":
            best = int(idx)
    found = best if best is not None else fallback
    if found is None:
        raise NotFound("no audit entry carries that decision id", field="decision_id")
    return found


# ---- statistics ------------------------------------------------------------------------

_MATCH_TYPES = frozenset({"MATCH_DECISION"})


@dataclasses.dataclass
class Stats:
    """Counts over a range of entries (see ``GetStatsResponse``)."""

    by_municipality: Counter[str] = dataclasses.field(default_factory=Counter)
    by_site: Counter[str] = dataclasses.field(default_factory=Counter)
    by_purpose: Counter[str] = dataclasses.field(default_factory=Counter)
    by_outcome: Counter[str] = dataclasses.field(default_factory=Counter)
    denials_by_rule: Counter[str] = dataclasses.field(default_factory=Counter)
    shadow_by_rule: Counter[str] = dataclasses.field(default_factory=Counter)
    #: Alerts (by alert ref) whose confirmations reached CONFIRMED / REJECTED: an alert that
    #: needs two operators is counted once, not once per confirmation.
    confirmed: set[str] = dataclasses.field(default_factory=set)
    rejected: set[str] = dataclasses.field(default_factory=set)
    total: int = 0

    @property
    def alerts_confirmed(self) -> int:
        return len(self.confirmed)

    @property
    def alerts_rejected(self) -> int:
        return len(self.rejected)

    def add(self, doc: dict[str, Any]) -> None:
        """Count one parsed entry.

        A *match request* is a MATCH_DECISION, or a DENIAL that carries a purpose (match RPCs
        declare one, administrative and audit RPCs do not).
        """
        self.total += 1
        kind = doc.get("type", "")
        outcome = doc.get("outcome")
        if outcome:
            self.by_outcome[outcome] += 1
        is_match = kind in _MATCH_TYPES or (kind == "DENIAL" and doc.get("purpose"))
        if is_match:
            org = (doc.get("caller") or {}).get("org")
            if org:
                self.by_municipality[org] += 1
            if doc.get("site_id"):
                self.by_site[doc["site_id"]] += 1
            if doc.get("purpose"):
                self.by_purpose[doc["purpose"]] += 1
        if kind == "DENIAL":
            for rule in doc.get("rule_ids") or ("-",):
                self.denials_by_rule[rule] += 1
        elif kind == "SHADOW_DISAGREEMENT":
            for rule in doc.get("rule_ids") or ("-",):
                self.shadow_by_rule[rule] += 1
        elif kind == "ALERT_CONFIRMATION":
            alert = (doc.get("refs") or {}).get("alert") or f"#{self.total}"
            if outcome == "CONFIRMED":
                self.confirmed.add(alert)
            elif outcome == "REJECTED":
                self.rejected.add(alert)

    _COUNTERS = (
        "by_municipality",
        "by_site",
        "by_purpose",
        "by_outcome",
        "denials_by_rule",
        "shadow_by_rule",
    )

    def to_doc(self) -> dict[str, Any]:
        """A JSON-ready form (counters as objects, alert sets as sorted lists)."""
        doc: dict[str, Any] = {name: dict(getattr(self, name)) for name in self._COUNTERS}
        doc.update(
            confirmed=sorted(self.confirmed), rejected=sorted(self.rejected), total=self.total
        )
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Stats:
        """The inverse of :meth:`to_doc`.

        Raises:
            ValueError: ``doc`` is not such a form.
        """
        try:
            counters = {name: Counter(dict(doc[name])) for name in cls._COUNTERS}
            out = cls(
                **counters,
                confirmed=set(doc["confirmed"]),
                rejected=set(doc["rejected"]),
                total=int(doc["total"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError("not a statistics document") from exc
        counts = [v for name in cls._COUNTERS for v in getattr(out, name).values()]
        members = [*out.confirmed, *out.rejected]
        if not all(type(v) is int and v >= 0 for v in counts) or out.total < 0:
            raise ValueError("counts must be whole numbers, not negative")
        if not all(isinstance(a, str) for a in members):
            raise ValueError("alert references must be strings")
        return out

    def copy(self) -> Stats:
        return Stats(
            Counter(self.by_municipality),
            Counter(self.by_site),
            Counter(self.by_purpose),
            Counter(self.by_outcome),
            Counter(self.denials_by_rule),
            Counter(self.shadow_by_rule),
            set(self.confirmed),
            set(self.rejected),
            self.total,
        )


#: Entries one slice of :meth:`StatsCache.warm` parses before it rests (~10 ms here).
WARM_SLICE = 250
#: The share of the process's time the warm-up may take (it holds the GIL while it parses).
WARM_SHARE = 0.2


class StatsCache:
    """Whole-log statistics kept incrementally: each call scans only entries added since the
    last one. Statistics since a time scan from a binary-searched start instead."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = Stats()
        self._upto = 0

    def compute(self, log: AuditLog, since: dt.datetime | None) -> Stats:
        """Statistics over the whole log, or over entries at or after ``since`` (blocking)."""
        size = log.size
        if since is not None:
            out = Stats()
            for entry in _iter(log, first_index_at(log, since, size), size):
                doc = json.loads(entry)
                if parse_time(str(doc.get("time", ""))) >= since:
                    out.add(doc)
            return out
        with self._lock:
            if self._upto > size:  # a new log under the same process: start again
                self._stats, self._upto = Stats(), 0
            for entry in _iter(log, self._upto, size):
                self._stats.add(json.loads(entry))
            self._upto = size
            return self._stats.copy()

    def state(self) -> tuple[int, Stats]:
        """(entries counted so far, a copy of their statistics)."""
        with self._lock:
            return self._upto, self._stats.copy()

    def resume(self, upto: int, stats: Stats) -> bool:
        """Take ``stats`` as the statistics of the log's first ``upto`` entries, unless this
        cache has already counted more; whether it took them."""
        with self._lock:
            if upto <= self._upto:
                return False
            self._stats, self._upto = stats.copy(), upto
            return True

    def warm(
        self,
        log: AuditLog,
        *,
        share: float = WARM_SHARE,
        stop: threading.Event | None = None,
        slice_entries: int = WARM_SLICE,
        limit: int | None = None,
    ) -> int:
        """Scan the entries the log already holds ahead of the first GetStats, one slice at
        a time, resting after each slice so that the scan takes at most ``share`` of the
        time. Parsing holds the GIL, which the event loop and the matcher's threads need:
        run flat out after a restart with a large log (~40 s per million entries here), it
        halved the throughput of the first minute. A GetStats meanwhile goes on from where
        this reached, at full speed. Returns the entries scanned; ``stop`` ends it early,
        and so does ``limit`` (entries at most).
        """
        rest = stop or threading.Event()
        size = log.size if limit is None else min(log.size, self._upto + limit)
        scanned = 0
        while not rest.is_set():
            started = time.perf_counter()
            with self._lock:
                if self._upto >= size:
                    return scanned
                end = min(size, self._upto + slice_entries)
                for entry in _iter(log, self._upto, end):
                    self._stats.add(json.loads(entry))
                scanned += end - self._upto
                self._upto = end
            rest.wait((time.perf_counter() - started) * (1 - share) / share)
        return scanned


#: The file under the data directory that keeps whole-log statistics between runs.
STATS_FILE = "audit-stats.json"
#: How often the statistics thread catches up with the log and saves: after a crash, a
#: restart scans at most this long's entries again.
STATS_SAVE_EVERY_S = 60.0
#: Entries the statistics thread counts at full speed when the server stops, before its last
#: save (~2 s here), so that a clean restart scans nothing again; the rest, if any, waits
#: for the next start.
STATS_FINAL_CATCH_UP = 50_000
_SEAL_PURPOSE = "audit-stats"


class StatsSnapshot:
    """Whole-log statistics saved between runs, so that a restart does not scan the whole
    log again (~40 s of CPU per million entries here, which a month's log at 100 decisions a
    second turns into hours of a throttled scan beside the matcher).

    The file holds the statistics, the number of entries they count and the log's root at
    that size, sealed with the audit HMAC key (:meth:`Digester.seal`). It is taken only if
    the seal holds, the log holds at least that many entries, and its root at that size is
    the one recorded: a forged or edited file, one from another data directory, or one that
    counts entries since altered in the database is refused, and the log is scanned instead.
    An older, genuine snapshot is harmless: its counts are right for the prefix it names,
    and the scan goes on from there.
    """

    def __init__(self, path: Path, digester: Digester) -> None:
        self.path = path
        self._digester = digester

    @staticmethod
    def _body_bytes(body: dict[str, Any]) -> bytes:
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def save(self, log: AuditLog, cache: StatsCache) -> int:
        """Write ``cache``'s statistics (atomically: a crash leaves the old file or the new
        one); the number of entries they count."""
        upto, stats = cache.state()
        body = {"version": 1, "size": upto, "root": log.root(upto).hex(), "stats": stats.to_doc()}
        sealed = {"body": body, "seal": self._digester.seal(_SEAL_PURPOSE, self._body_bytes(body))}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(sealed, out, separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return upto

    def load(self, log: AuditLog, cache: StatsCache) -> int:
        """Resume ``cache`` from the saved statistics if they hold for ``log``; the number
        of entries they count (0 when there is no file or it was refused: the caller scans
        from the start). A refusal is logged with its reason, never with the file's
        content."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        reason, upto, stats = self._check(raw, log)
        if reason:
            _log.warning("audit_stats.snapshot_refused", reason=reason, file=self.path.name)
            return 0
        assert stats is not None
        return upto if cache.resume(upto, stats) else 0

    def _check(self, raw: bytes, log: AuditLog) -> tuple[str, int, Stats | None]:
        """(why the snapshot is refused, or "", entries it counts, its statistics)."""
        try:
            doc = json.loads(raw)
            body, seal = doc["body"], doc["seal"]
            expected = self._digester.seal(_SEAL_PURPOSE, self._body_bytes(body))
        except (ValueError, KeyError, TypeError):
            return "unreadable", 0, None
        if not isinstance(seal, str) or not hmac.compare_digest(seal, expected):
            return "seal does not verify", 0, None
        try:
            if body["version"] != 1:
                return "unknown version", 0, None
            upto, root = int(body["size"]), bytes.fromhex(body["root"])
            stats = Stats.from_doc(body["stats"])
        except (KeyError, TypeError, ValueError):
            return "malformed", 0, None
        if upto < 0 or upto > log.size:
            return "counts more entries than the log holds", 0, None
        if stats.total != upto:
            return "its total is not its size", 0, None
        if not hmac.compare_digest(log.root(upto), root):
            return "the log's root at its size differs", 0, None
        return "", upto, stats
