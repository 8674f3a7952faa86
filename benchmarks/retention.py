"""What the once-a-minute retention prune costs the audit commits of the calls being served.

    .venv/bin/python -m benchmarks.retention [--quick] [--records N] [--response-bytes B]
                                             [--postgres URL]

The server deletes idempotency records older than a day once a minute
(``centinela.server.wiring.purge_expired``). On SQLite a deletion holds the database's write
lock, which every audit commit needs; on PostgreSQL (``--postgres``, a server URL whose user
may create databases) it locks only the rows it deletes, and what it can cost the others is
the work of its scan and its write-ahead log. This builds a day of records (default 800,000,
the size ``benchmarks/fairness.py`` had reached; --quick 100,000), one minute's worth of them
past the retention, and prunes that minute while a writer thread commits one small
transaction every 2 ms, as the audit writer does under load, timing each commit. Two
variants, each on its own copy of the same database (a file, or a database made from a
template on PostgreSQL):

* **baseline**: what the server did before session 18, one ``DELETE ... WHERE created_at <
  cutoff`` without an index on ``created_at`` (a scan of the whole table, under the lock on
  SQLite);
* **batched**: ``IdempotencyStore.prune`` now, a batch of ``PRUNE_BATCH`` per transaction
  found on the index that migration 2 adds.

Prints the prune's duration and the writer's commit latencies (p50, p99, worst) during it,
and the worst commit's ratio baseline / batched. Each variant also times what a server's
start does with the same table: read every key into the filter of keys whose answer may be
stored (``SeenKeys``), key by key in the baseline (the start-up before session 20), at once
in the other (``IdempotencyStore``'s start now). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa

from centinela.server.idempotency import (
    KEY_ROWS,
    RETENTION,
    IdempotencyStore,
    SeenKeys,
    idempotency,
)
from centinela.storage import make_engine, write_transaction


class Databases(Protocol):
    """Where the source database is built and the copies each variant prunes are made."""

    name: str
    source: str

    def settle(self, engine: sa.Engine) -> None:
        """After the build: the state a long-running server's database is in."""

    def copy(self, variant: str) -> str:
        """A copy of the source for one measurement; its URL."""

    def drop(self, url: str) -> None:
        """Remove a copy."""

    def close(self) -> None:
        """Remove the source."""


class SqliteFiles:
    name = "SQLite"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.source = f"sqlite:///{work / 'source.db'}"

    def settle(self, engine: sa.Engine) -> None:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    def copy(self, variant: str) -> str:
        copy = self.work / f"{variant}.db"
        shutil.copyfile(self.work / "source.db", copy)
        return f"sqlite:///{copy}"

    def drop(self, url: str) -> None:
        Path(sa.engine.make_url(url).database or "").unlink()

    def close(self) -> None:
        pass


class PostgresDatabases:
    """A source database and per-variant copies (``CREATE DATABASE … TEMPLATE``) on the
    server of ``url``, named after this process, dropped at the end."""

    name = "PostgreSQL"

    def __init__(self, url: str) -> None:
        self.admin = make_engine(url).execution_options(isolation_level="AUTOCOMMIT")
        self.base = sa.engine.make_url(url)
        self.prefix = f"centinela_retention_{os.getpid()}"
        self.source = self._create(f"{self.prefix}_source")

    def _create(self, name: str, template: str = "") -> str:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
            suffix = f' TEMPLATE "{template}"' if template else ""
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"{suffix}')
        return self.base.set(database=name).render_as_string(hide_password=False)

    def settle(self, engine: sa.Engine) -> None:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE idempotency")  # as autovacuum leaves it
            conn.exec_driver_sql("CHECKPOINT")

    def copy(self, variant: str) -> str:
        return self._create(f"{self.prefix}_{variant}", f"{self.prefix}_source")

    def drop(self, url: str) -> None:
        name = sa.engine.make_url(url).database
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')

    def close(self) -> None:
        self.drop(self.source)
        self.admin.dispose()


def build(databases: Databases, records: int, response_bytes: int) -> float:
    """A database of ``records`` idempotency records spread over a day and a minute (the
    oldest minute past the retention); returns the time a prune at ``now`` cuts at."""
    engine = make_engine(databases.source)
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
    databases.settle(engine)
    engine.dispose()
    return now


class Writer(threading.Thread):
    """Commits one small transaction every 2 ms (an audit commit's shape) and times each."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.engine = make_engine(url)
        with self.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS beat (n INTEGER)")
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            t0 = time.perf_counter()
            with write_transaction(self.engine) as conn:
                conn.execute(sa.text("INSERT INTO beat VALUES (:n)"), {"n": n})
            self.latencies.append(time.perf_counter() - t0)
            n += 1
            time.sleep(0.002)


def baseline_prune(engine: sa.Engine, now: float) -> int:
    """The prune before session 18: one statement, no index on ``created_at``."""
    cutoff = now - RETENTION.total_seconds()
    statement = (
        "DELETE FROM idempotency NOT INDEXED WHERE created_at < :cutoff"
        if engine.dialect.name == "sqlite"
        else "DELETE FROM idempotency WHERE created_at < :cutoff"  # its index was dropped
    )
    with engine.begin() as conn:
        removed = conn.execute(sa.text(statement), {"cutoff": cutoff}).rowcount
    return int(removed)


def keys_one_by_one(engine: sa.Engine) -> int:
    """The start-up's key load before session 20: each key hashed into the filter alone."""
    seen = SeenKeys()
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=10_000).execute(KEY_ROWS)
        for caller, rid, created_at in result:
            seen.add(SeenKeys.digest(caller, rid), when=float(created_at))
    return len(seen)


def measure(databases: Databases, now: float, variant: str) -> dict[str, Any]:
    copy = databases.copy(variant)
    engine = make_engine(copy)
    with engine.connect() as conn:  # warm the page cache as a running server has it
        conn.exec_driver_sql("SELECT count(*), sum(length(response)) FROM idempotency").all()
    engine.dispose()
    writer = Writer(copy)
    engine = make_engine(copy)
    t0 = time.perf_counter()
    if variant == "baseline":
        keys = keys_one_by_one(engine)
        load_s = time.perf_counter() - t0
        with engine.begin() as conn:  # a database as it was: no index on created_at
            conn.exec_driver_sql("DROP INDEX IF EXISTS ix_idempotency_created_at")
    else:
        store = IdempotencyStore(engine)  # loads its keys first, as a server's start does
        load_s = time.perf_counter() - t0
        keys = len(store.seen)
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
    databases.drop(copy)

    def pct(q: float) -> float:
        return round(1000 * during[min(len(during) - 1, int(q * len(during)))], 2)

    return {
        "removed": removed,
        "keys": keys,
        "keys_load_s": round(load_s, 3),
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
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default="",
        help="measure on this PostgreSQL server instead of SQLite (its user creates and drops "
        "databases named centinela_retention_<pid>_*), e.g. "
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    )
    args = parser.parse_args(argv)
    records = args.records or (100_000 if args.quick else 800_000)
    with tempfile.TemporaryDirectory(prefix="centinela-retention-") as tmp:
        databases: Databases = (
            PostgresDatabases(args.postgres) if args.postgres else SqliteFiles(Path(tmp))
        )
        try:
            print(f"building {records:,} idempotency records ({databases.name}) …")
            now = build(databases, records, args.response_bytes)
            runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "batched": []}
            for r in range(args.rounds):  # alternating, so that a busy moment hits both
                for variant in runs:
                    runs[variant].append(measure(databases, now, variant))
                    print(f"  round {r + 1} {variant}: {runs[variant][-1]}")
        finally:
            databases.close()
    med: dict[str, dict[str, float]] = {}
    for variant, rows in runs.items():
        med[variant] = {
            k: sorted(row[k] for row in rows)[len(rows) // 2]
            for k in rows[0]
            if k not in ("removed", "keys")
        }
        med[variant]["removed"] = rows[0]["removed"]
        med[variant]["keys"] = rows[0]["keys"]
    print(
        f"\nretention prune of one minute's records out of {records:,} ({databases.name}), "
        f"medians of "
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
    one, many = med["baseline"]["keys_load_s"], med["batched"]["keys_load_s"]
    print(
        f"start-up, the day's {med['batched']['keys']:,} keys into the filter: key by key "
        f"{one:.2f} s, at once {many:.2f} s ({one / max(many, 1e-3):.1f}x)"
    )
    doc = {"database": databases.name, "records": records, "medians": med}
    print(
        json.dumps(
            {
                **doc,
                "worst_commit_ratio": round(ratio, 1),
                "keys_load_ratio": round(one / max(many, 1e-3), 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
