"""What the once-a-minute retention prune costs the audit commits of the calls being served.

    .venv/bin/python -m benchmarks.retention [--quick] [--records N] [--response-bytes B]

The server deletes idempotency records older than a day once a minute
(``centinela.server.wiring.purge_expired``). On SQLite a deletion holds the database's write
lock, which every audit commit needs. This builds a day of records (default 800,000, the size
``benchmarks/fairness.py`` had reached; --quick 100,000), one minute's worth of them past the
retention, and prunes that minute while a writer thread commits one small transaction every
2 ms, as the audit writer does under load, timing each commit. Two variants, each on its own
copy of the same database file:

* **baseline**: what the server did before session 18, one ``DELETE ... WHERE created_at <
  cutoff`` without an index on ``created_at`` (a scan of the whole table under the lock);
* **batched**: ``IdempotencyStore.prune`` now, a batch of ``PRUNE_BATCH`` per transaction
  found on the index that migration 2 adds.

Prints the prune's duration and the writer's commit latencies (p50, p99, worst) during it,
and the worst commit's ratio baseline / batched; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from centinela.server.idempotency import RETENTION, IdempotencyStore, idempotency
from centinela.storage import make_engine, write_transaction


def build(path: Path, records: int, response_bytes: int) -> float:
    """A database of ``records`` idempotency records spread over a day and a minute (the
    oldest minute past the retention); returns the time a prune at ``now`` cuts at."""
    engine = make_engine(f"sqlite:///{path}")
    IdempotencyStore(engine)  # the schema, with the index
    now = time.time()
    start = now - RETENTION.total_seconds() - 60
    step = (RETENTION.total_seconds() + 60) / records
    blob = b"r" * response_bytes
    t0 = time.perf_counter()
    for first in range(0, records, 20_000):
        rows = [
            {
                "caller": f"muni-{n % 19:02d}",
                "client_request_id": f"{n:032x}",
                "rpc": "MatchFace",
                "fingerprint": "f" * 64,
                "response": blob,
                "created_at": start + n * step,
            }
            for n in range(first, min(records, first + 20_000))
        ]
        with write_transaction(engine) as conn:
            conn.execute(idempotency.insert(), rows)
        print(f"  built {first + len(rows):,}/{records:,} ({time.perf_counter() - t0:.0f} s)")
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return now


class Writer(threading.Thread):
    """Commits one small transaction every 2 ms (an audit commit's shape) and times each."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.engine = make_engine(f"sqlite:///{path}")
        with self.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS beat (n INTEGER)")
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            t0 = time.perf_counter()
            with write_transaction(self.engine) as conn:
                conn.exec_driver_sql("INSERT INTO beat VALUES (?)", (n,))
            self.latencies.append(time.perf_counter() - t0)
            n += 1
            time.sleep(0.002)


def baseline_prune(engine: sa.Engine, now: float) -> int:
    """The prune before session 18: one statement, no index on ``created_at``."""
    cutoff = now - RETENTION.total_seconds()
    with engine.begin() as conn:
        removed = conn.exec_driver_sql(
            "DELETE FROM idempotency NOT INDEXED WHERE created_at < ?", (cutoff,)
        ).rowcount
    return int(removed)


def measure(source: Path, work: Path, now: float, variant: str) -> dict[str, Any]:
    copy = work / f"{variant}.db"
    shutil.copyfile(source, copy)
    engine = make_engine(f"sqlite:///{copy}")
    with engine.connect() as conn:  # warm the page cache as a running server has it
        conn.exec_driver_sql("SELECT count(*), sum(length(response)) FROM idempotency").all()
    engine.dispose()
    writer = Writer(copy)
    engine = make_engine(f"sqlite:///{copy}")
    if variant == "baseline":  # a database as it was: no index on created_at
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP INDEX IF EXISTS ix_idempotency_created_at")
    else:
        store = IdempotencyStore(engine)  # loads its keys first, as a server's start does
    writer.start()
    time.sleep(0.2)
    before = len(writer.latencies)
    t0 = time.perf_counter()
    if variant == "baseline":
        removed = baseline_prune(engine, now)
    else:
        removed = store.prune(dt.datetime.fromtimestamp(now, dt.UTC))
    took = time.perf_counter() - t0
    engine.dispose()
    time.sleep(0.1)
    writer.stop.set()
    writer.join()
    during = sorted(writer.latencies[before:])
    writer.engine.dispose()
    copy.unlink()

    def pct(q: float) -> float:
        return round(1000 * during[min(len(during) - 1, int(q * len(during)))], 2)

    return {
        "removed": removed,
        "prune_s": round(took, 3),
        "commits": len(during),
        "commit_p50_ms": pct(0.5),
        "commit_p99_ms": pct(0.99),
        "commit_worst_ms": round(1000 * during[-1], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 records")
    parser.add_argument("--records", type=int, default=0, help="a day's records (800,000)")
    parser.add_argument("--response-bytes", type=int, default=400, help="per stored answer")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant (median)")
    args = parser.parse_args(argv)
    records = args.records or (100_000 if args.quick else 800_000)
    with tempfile.TemporaryDirectory(prefix="centinela-retention-") as tmp:
        work = Path(tmp)
        source = work / "source.db"
        print(f"building {records:,} idempotency records …")
        now = build(source, records, args.response_bytes)
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "batched": []}
        for r in range(args.rounds):  # alternating, so that a busy moment hits both
            for variant in runs:
                runs[variant].append(measure(source, work, now, variant))
                print(f"  round {r + 1} {variant}: {runs[variant][-1]}")
    med: dict[str, dict[str, float]] = {}
    for variant, rows in runs.items():
        med[variant] = {
            k: sorted(row[k] for row in rows)[len(rows) // 2] for k in rows[0] if k != "removed"
        }
        med[variant]["removed"] = rows[0]["removed"]
    print(
        f"\nretention prune of one minute's records out of {records:,} (SQLite), medians of "
        f"{args.rounds} rounds; a writer commits every 2 ms meanwhile"
    )
    head = (
        f"{'variant':<10} {'removed':>8} {'prune s':>8} {'commit p50':>10} {'p99':>8} {'worst':>8}"
    )
    print(head)
    print("-" * len(head))
    for variant, m in med.items():
        print(
            f"{variant:<10} {m['removed']:>8,} {m['prune_s']:>8} {m['commit_p50_ms']:>10} "
            f"{m['commit_p99_ms']:>8} {m['commit_worst_ms']:>8}"
        )
    ratio = med["baseline"]["commit_worst_ms"] / max(med["batched"]["commit_worst_ms"], 1e-3)
    print(f"worst commit during the prune, baseline / batched: {ratio:.1f}x (ms above)")
    print(json.dumps({"records": records, "medians": med, "worst_commit_ratio": round(ratio, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
