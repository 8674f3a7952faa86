"""Benchmark of the audit log: durable appends/s (group commit vs one commit per append) with
1, 8 and 64 concurrent asyncio writers on SQLite and PostgreSQL, tree load time, and the time
the offline verifier takes on an export of 1,000,000 entries.

Run: ``.venv/bin/python benchmarks/audit_append.py [--quick]``. The last line is one JSON
object; ``appends_per_s`` is 64 writers on SQLite with group commit, ``group_commit_gain`` is
that over one commit per append measured in the same run, ``verify_1m_s`` the verification
time of 1M entries (extrapolated linearly from 100k under ``--quick``, and flagged so).

Appends take entries already encoded (the bytes a request handler hands to the log): the
figure is the log's own cost (leaf hash, tree, SQL insert, durable commit). Encoding an event
(RFC 8785, HMAC digests) happens in the request handler beforehand and is measured on its own
line (``encode_per_s``, one thread).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from centinela.audit.checkpoint import Checkpoint, Signer, Verifier, sign_checkpoint
from centinela.audit.entry import AuditEvent, Caller, Digester, EventType
from centinela.audit.layout import CHECKPOINT, ENTRIES
from centinela.audit.log import AuditLog
from centinela.audit.merkle import MerkleTree, leaf_hash
from centinela.audit.store import Companions, LeafStore, Rows
from centinela.audit.verify import verify_export
from centinela.server import alerts as alert_tables
from centinela.server import idempotency as idempotency_tables
from centinela.storage import make_engine

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
ORIGIN = "bench.centinela.local/audit"
DIGESTER = Digester(b"\x07" * 32)


def make_entry(i: int) -> bytes:
    """A realistic match-decision entry (about 500 bytes) with keyed digests."""
    return AuditEvent(
        EventType.MATCH_DECISION,
        request_id=str(uuid.UUID(int=i + 1)),
        decision_id=f"dec-{i:012x}-bench",
        caller=Caller("municipio-lima", "municipal", "op-7f3a9c2e51d4"),
        purpose="STOLEN_VEHICLE",
        site_id="portico-07",
        policy_bundle_digest="sha256:" + "ab" * 32,
        rule_ids=["R1", "R2", "R5", "R6"],
        outcome="NO_HIT",
        digests={"plate": DIGESTER.digest("plate", f"ABC-{i % 1000:03d}")},
        metrics={"score": 0.4123, "candidates": 0},
        time=dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=i),
    ).encode()


async def _drive(log: AuditLog, writers: int, seconds: float, pool: list[bytes]) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def writer(w: int) -> None:
        nonlocal done
        i = w
        while time.perf_counter() < stop:
            await log.append(pool[i % len(pool)])
            done += 1
            i += writers

    t0 = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return done / (time.perf_counter() - t0)


def bench_db(
    urls: tuple[str, str], key: Ed25519PrivateKey, pool: list[bytes], seconds: float, reps: int
) -> dict[str, float]:
    """Median durable appends/s per (mode, writers); ``urls`` are two empty databases.

    Group commit and one-commit-per-append run on separate databases, interleaved rep by rep,
    so that load from other processes on this shared machine hits both alike.
    """
    engines = [make_engine(u, pool_size=4) for u in urls]
    logs = {
        mode: AuditLog.open(eng, key, ORIGIN, max_batch=mb, checkpoint_every_seconds=10.0)
        for (mode, mb), eng in zip((("group", 4096), ("single", 1)), engines, strict=True)
    }
    runs: dict[str, list[float]] = {}
    try:
        for log in logs.values():
            asyncio.run(_drive(log, 8, seconds / 2, pool))  # warm up files and caches
        for _ in range(reps):
            for writers in (1, 8, 64):
                for mode, log in logs.items():
                    rate = asyncio.run(_drive(log, writers, seconds, pool))
                    runs.setdefault(f"{mode}_{writers}", []).append(rate)
    finally:
        for log in logs.values():
            log.close()
        for eng in engines:
            eng.dispose()
    return {k: statistics.median(v) for k, v in runs.items()}


def pg_schemas() -> tuple[tuple[str, str], Any] | None:
    """Two fresh PostgreSQL schemas (URLs, cleanup) or None when PostgreSQL is not running."""
    try:
        admin = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        schemas = ["bench_audit_" + uuid.uuid4().hex[:8] for _ in range(2)]
        with admin.begin() as conn:
            for schema in schemas:
                conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError:
        return None

    def cleanup() -> None:
        with admin.begin() as conn:
            for schema in schemas:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    urls = tuple(f"{PG_URL}?options=-csearch_path%3D{s}" for s in schemas)
    return (urls[0], urls[1]), cleanup


def bench_verify(n: int, work: Path, key: Ed25519PrivateKey) -> tuple[float, float]:
    """Write an export of n entries; return (median verify seconds, tree bulk-load seconds)."""
    export = work / f"export-{n}"
    export.mkdir()
    template = make_entry(0)
    hashes = bytearray()
    with open(export / ENTRIES, "wb") as f:
        for i in range(n):
            # Vary the request id so every leaf differs, without re-encoding each entry.
            line = template.replace(
                b"00000000-0000-0000-0000-000000000001", str(uuid.UUID(int=i + 1)).encode()
            )
            f.write(line + b"\n")
            hashes += leaf_hash(line)
    t0 = time.perf_counter()
    tree = MerkleTree.from_packed(bytes(hashes))
    load_s = time.perf_counter() - t0
    signer = Signer(ORIGIN, key)
    note = sign_checkpoint(signer, Checkpoint(ORIGIN, n, tree.root())).note
    (export / CHECKPOINT).write_text(note)
    trusted = [Verifier(signer.verifier_key())]
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        report = verify_export(export, trusted)
        runs.append(time.perf_counter() - t0)
        assert report.entries == n
    return statistics.median(runs), load_s


def bench_db_load(n: int, work: Path, key: Ed25519PrivateKey) -> tuple[float, float, float, int]:
    """AuditLog start over n leaves in SQLite: (seconds of the first start, which computes and
    stores the subtree hashes of a log written without them, as an upgrade does; seconds of a
    normal start, which reads O(log n) rows; seconds of the check of every stored subtree
    against the leaves that then runs beside the service; Python bytes the opened tree
    holds, by tracemalloc)."""
    url = f"sqlite:///{work / 'load.db'}"
    engine = make_engine(url)
    log = AuditLog(engine, key, ORIGIN)
    log.store.migrate()
    template = make_entry(0)
    batch = 50_000
    with engine.connect() as conn:
        for start in range(0, n, batch):
            rows = [
                (template, leaf_hash(template + str(i).encode()))
                for i in range(start, min(n, start + batch))
            ]
            log.store.append_batch(conn, start, rows)
    t0 = time.perf_counter()
    log.load()
    upgrade = time.perf_counter() - t0
    assert log.size == n
    t0 = time.perf_counter()
    log.load()
    took = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert log._tree.verify(n)
    verify = time.perf_counter() - t0
    tracemalloc.start()  # a third start, traced (tracing slows it several-fold)
    log.load()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert log.size == n
    engine.dispose()
    return upgrade, took, verify, held


def bench_commit_cpu(url: str, commits: int) -> tuple[float, float]:
    """Median writer-thread CPU (ms) of a one-entry MatchFace-shaped commit: through the
    driver, and through SQLAlchemy (the same companions plus a part of their own, which takes
    that path), alternating."""
    engine = make_engine(url)
    store = LeafStore(engine)
    store.migrate()
    first = store.size()
    with engine.begin() as conn:
        alert_tables.metadata.create_all(conn)
        idempotency_tables.metadata.create_all(conn)
    entry = make_entry(0)

    def noop(_conn: sa.Connection, _index: int) -> None:
        pass

    def companion(i: int, general: bool) -> Companions:
        alert = {
            "alert_id": f"alr_{i}",
            "decision_id": f"dec_{i}",
            "caller_org": "municipio-lima",
            "site_id": "portico-07",
            "municipality": "Miraflores",
            "region": "Lima",
            "capture_time": 1.0e9,
            "gallery": "pnp_watchlist",
            "reference": f"REQ-{i}",
            "category": "ROBO",
            "score_band": "HIGH",
            "state": "PENDING_CONFIRMATION",
            "confirmations_required": 2,
            "created_at": 1.0e9,
        }
        answer = {
            "caller": "municipio-lima",
            "client_request_id": f"req-{i}",
            "rpc": "MatchFace",
            "fingerprint": "f" * 64,
            "response": b"\x0a" * 300,
            "created_at": 1.0e9,
        }
        parts = (
            alert_tables.AlertStore.companion([alert]),
            Rows(idempotency_tables.idempotency, lambda _index: [answer]),
        )
        return Companions(((noop,) if general else ()) + tuple(p for p in parts if p))

    cpu: dict[bool, list[float]] = {False: [], True: []}
    with engine.connect() as conn:
        for i in range(2 * commits):
            general = i % 2 == 1
            leaf = leaf_hash(entry + i.to_bytes(8, "big"))
            began = time.thread_time()
            store.append_batch(conn, first + i, [(entry, leaf)], [companion(i, general)])
            cpu[general].append(time.thread_time() - began)
    engine.dispose()
    return 1000 * statistics.median(cpu[False]), 1000 * statistics.median(cpu[True])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a run of under a minute, smaller sizes")
    args = ap.parse_args()
    seconds, reps = (0.6, 3) if args.quick else (3.0, 5)
    verify_n = 100_000 if args.quick else 1_000_000
    key = Ed25519PrivateKey.generate()
    pool = [make_entry(i) for i in range(2000)]
    t0 = time.perf_counter()
    for i in range(2000):
        make_entry(i)
    encode_per_s = 2000 / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        work = Path(tmp)
        sqlite_urls = (f"sqlite:///{work / 'group.db'}", f"sqlite:///{work / 'single.db'}")
        sqlite = bench_db(sqlite_urls, key, pool, seconds, reps)
        commits = 500 if args.quick else 3000
        commit_cpu = {"sqlite": bench_commit_cpu(f"sqlite:///{work / 'commit.db'}", commits)}
        pg: dict[str, float] | None = None
        target = pg_schemas()
        if target is not None:
            url, cleanup = target
            try:
                pg = bench_db(url, key, pool, seconds, reps)
                commit_cpu["postgresql"] = bench_commit_cpu(url[0], commits)
            finally:
                cleanup()
        verify_s, tree_load_s = bench_verify(verify_n, work, key)
        db_upgrade_s, db_load_s, db_check_s, tree_bytes = bench_db_load(verify_n, work, key)

    scale = 1_000_000 / verify_n
    kind = "quick" if args.quick else "full"
    print(f"audit append benchmark ({kind}; medians of {reps} runs of {seconds}s each)")
    print(
        f"{'database':<12}{'writers':>8}{'group commit/s':>18}{'1 commit/append/s':>20}{'gain':>8}"
    )
    for name, res in (("sqlite", sqlite), ("postgresql", pg)):
        if res is None:
            print(f"{name:<12}  not available")
            continue
        for w in (1, 8, 64):
            g, s = res[f"group_{w}"], res[f"single_{w}"]
            print(f"{name:<12}{w:>8}{g:>18,.0f}{s:>20,.0f}{g / s:>8.1f}")
    print(f"verify {verify_n:,} entries: {verify_s:.2f} s  (1M: {verify_s * scale:.2f} s)")
    print(f"tree bulk load of {verify_n:,} leaves: {tree_load_s:.2f} s")
    print(
        f"AuditLog.load of {verify_n:,} leaves from SQLite: {db_load_s * 1000:.1f} ms "
        f"(first start after the upgrade, filling in subtree hashes: {db_upgrade_s:.2f} s; "
        f"the check of every stored subtree beside the service: {db_check_s:.2f} s); "
        f"the tree then holds {tree_bytes / 1024:,.0f} KiB "
        f"(in memory it took {verify_n * 64 / 2**20:,.0f} MiB)"
    )
    print(f"entry encoding (AuditEvent.encode, RFC 8785): {encode_per_s:,.0f}/s")
    for name, (driver_ms, general_ms) in commit_cpu.items():
        print(
            f"writer CPU of a MatchFace-shaped commit (entry, alert, stored answer), {name}: "
            f"{driver_ms:.3f} ms through the driver, {general_ms:.3f} ms through SQLAlchemy "
            f"({general_ms / driver_ms:.2f}x)"
        )
    result = {
        "appends_per_s": round(sqlite["group_64"]),
        "group_commit_gain": round(sqlite["group_64"] / sqlite["single_64"], 2),
        "verify_1m_s": round(verify_s * scale, 2),
        "verify_1m_extrapolated": verify_n != 1_000_000,
        "verify_entries": verify_n,
        "load_leaves": verify_n,
        "tree_load_s": round(tree_load_s, 2),
        "db_load_s": round(db_load_s, 4),
        "db_history_check_s": round(db_check_s, 2),
        "db_upgrade_load_s": round(db_upgrade_s, 2),
        "tree_held_bytes": tree_bytes,
        "encode_per_s": round(encode_per_s),
        "commit_cpu_ms_driver": round(commit_cpu["sqlite"][0], 3),
        "commit_cpu_ms_sqlalchemy": round(commit_cpu["sqlite"][1], 3),
        "pg_commit_cpu_ms_driver": (
            round(commit_cpu["postgresql"][0], 3) if "postgresql" in commit_cpu else None
        ),
        "pg_commit_cpu_ms_sqlalchemy": (
            round(commit_cpu["postgresql"][1], 3) if "postgresql" in commit_cpu else None
        ),
        "sqlite": {k: round(v) for k, v in sqlite.items()},
        "postgresql": {k: round(v) for k, v in pg.items()} if pg else None,
        "pg_appends_per_s": round(pg["group_64"]) if pg else None,
        "pg_group_commit_gain": round(pg["group_64"] / pg["single_64"], 2) if pg else None,
        "quick": args.quick,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
