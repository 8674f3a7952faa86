"""What the compliance reads cost on a large audit log (SQLite), against naive baselines.

    .venv/bin/python benchmarks/audit_query.py [--quick] [--entries N]

Builds a log of N realistic entries (default 1,000,000; --quick 100,000), then measures, each
as the median of several runs and as a ratio to a baseline measured in the same run:

* a ListEvents page with a selective filter (1% of entries match), with the byte pre-test,
  against parsing every entry (``json.loads``) over the same scan;
* the first page of a ``since`` query for the last 1% of the log (binary search on entry
  times) against a linear scan from index 0;
* finding a decision's entry for CreateEvidence (one SQL pass, ``instr``) against reading and
  searching every entry in Python;
* GetStats after 1,000 new entries (incremental cache) against recomputing the whole log;
* the same at a restart: the statistics saved before those 1,000 entries (``StatsSnapshot``,
  sealed and bound to the log's root) are checked and resumed, against the scan of the whole
  log a restart made without them.

Prints a table, then as its last line one JSON object with the medians and ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from centinela.audit.entry import AuditEvent, Caller, Digester, EventType
from centinela.audit.log import AuditLog
from centinela.server.audit_query import (
    EventFilter,
    Stats,
    StatsCache,
    StatsSnapshot,
    _iter,
    find_decision,
    list_page,
)
from centinela.storage import make_engine

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
ORGS = [f"muni-{i:02d}" for i in range(99)] + ["muni-rare"]


def build(path: Path, n: int) -> AuditLog:
    engine = make_engine(f"sqlite:///{path}")
    log = AuditLog(engine, Ed25519PrivateKey.generate())
    log.store.migrate()
    digester = Digester(b"k" * 32)
    batch: list[tuple[bytes, bytes]] = []
    import hashlib

    with engine.connect() as conn:
        for i in range(n):
            org = ORGS[i % len(ORGS)]
            entry = AuditEvent(
                EventType.MATCH_DECISION if i % 5 else EventType.DENIAL,
                request_id=f"req-{i:016x}",
                decision_id=f"dec_{i:024x}",
                caller=Caller(org=org, kind="municipality"),
                purpose="WANTED_PERSON",
                site_id=f"{org}-cam-{i % 7}",
                rule_ids=("R8", "R10") if i % 5 else ("R5",),
                outcome=("HIT" if i % 97 == 0 else "NO_HIT") if i % 5 else "DENIED",
                digests={"probe": digester.digest("probe", str(i))},
                metrics={"candidates": i % 3, "top_score": 0.25},
                time=T0 + dt.timedelta(seconds=i),
            ).encode()
            batch.append((entry, hashlib.sha256(b"\x00" + entry).digest()))
            if len(batch) == 20_000:
                log.store.append_batch(conn, i + 1 - len(batch), batch)
                batch = []
        if batch:
            log.store.append_batch(conn, n - len(batch), batch)
    log.load()
    return log


def median(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100,000 entries, fewer runs")
    p.add_argument("--entries", type=int, default=0)
    args = p.parse_args(argv)
    n = args.entries or (100_000 if args.quick else 1_000_000)
    runs = 3 if args.quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        log = build(Path(tmp) / "audit.db", n)
        built = time.perf_counter() - t
        budget = 50_000
        flt = EventFilter(caller_org="muni-rare")
        page = median(lambda: list_page(log, flt, 0, 100, scan_budget=budget), runs)

        def naive_page() -> None:
            out = []
            for e in _iter(log, 0, min(n, budget)):
                if flt.accepts(json.loads(e)):
                    out.append(e)
                    if len(out) == 100:
                        break

        naive = median(naive_page, runs)
        since = EventFilter(since=T0 + dt.timedelta(seconds=int(n * 0.99)), caller_org="muni-rare")
        fast_since = median(lambda: list_page(log, since, 0, 100, scan_budget=n), runs)

        def linear_since() -> None:
            for _ in list_page(log, EventFilter(caller_org="muni-rare"), 0, n, scan_budget=n).items:
                pass

        slow_since = median(linear_since, 1)
        target = f"dec_{int(n * 0.5):024x}"
        find = median(lambda: find_decision(log, target), runs)
        needle = f'"decision_id":"{target}"'.encode()
        # The same answer in Python: every entry that carries the id (a decision may have two).
        scan = median(lambda: [i for i, e in enumerate(_iter(log, 0, n)) if needle in e], 1)
        cache = StatsCache()
        cache.compute(log, None)
        snapshot = StatsSnapshot(Path(tmp) / "audit-stats.json", Digester(b"s" * 32))
        snapshot.save(log, cache)
        # 1,000 more entries, then the incremental update against a full recomputation.
        extra = build_more(log, 1_000)
        inc = median(lambda: _fresh(cache, log), 1)

        def restart() -> None:
            resumed = StatsCache()
            if snapshot.load(log, resumed) != n:
                raise SystemExit("the saved statistics were refused")
            resumed.compute(log, None)

        resume = median(restart, runs)

        def full() -> None:
            s = Stats()
            for e in _iter(log, 0, log.size):
                s.add(json.loads(e))

        full_t = median(full, 1)
        del extra
    rows = [
        ("ListEvents page, 1% match, 50k scanned", page, naive, "parse every entry"),
        ("ListEvents since last 1%", fast_since, slow_since, "linear scan from 0"),
        ("CreateEvidence lookup (SQL instr)", find, scan, "Python scan of every entry"),
        ("GetStats after +1,000 entries", inc, full_t, "full recompute"),
        ("restart: saved stats + 1,000 entries", resume, full_t, "full scan at start"),
    ]
    print(f"audit log of {n:,} entries on SQLite (built in {built:.1f} s); busy 2-core machine")
    print(f"{'operation':42} {'median s':>10} {'baseline s':>11} {'speed-up':>9}  baseline")
    for name, ours, base, what in rows:
        print(f"{name:42} {ours:10.4f} {base:11.4f} {base / ours:8.1f}x  {what}")
    keys = ["page", "since", "evidence_lookup", "stats_incremental", "stats_restart"]
    doc: dict[str, object] = {"entries": n}
    for key, (_, ours, base, _) in zip(keys, rows, strict=True):
        doc[f"{key}_s"] = round(ours, 5)
        doc[f"{key}_baseline_s"] = round(base, 5)
        doc[f"{key}_speedup"] = round(base / ours, 2)
    print(json.dumps(doc))
    return 0


def build_more(log: AuditLog, k: int) -> int:
    import hashlib

    start = log.size
    rows = []
    for i in range(start, start + k):
        e = AuditEvent(
            EventType.AUDIT_READ, outcome="READ", time=T0 + dt.timedelta(seconds=i)
        ).encode()
        rows.append((e, hashlib.sha256(b"\x00" + e).digest()))
    with log.store.engine.connect() as conn:
        log.store.append_batch(conn, start, rows)
    log.load()
    return k


def _fresh(cache: StatsCache, log: AuditLog) -> None:
    cache.compute(log, None)


if __name__ == "__main__":
    sys.exit(main())
