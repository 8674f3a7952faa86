"""Registry import benchmark: a Reniec bulk import through the real server, against a bare build.

It starts a real Centinela server in-process (mutual TLS on loopback, SQLite, encrypted
template store, policy, durable audit log, background HNSW catch-up) and imports N synthetic
templates (``centinela.matcher.synth.identities``: realistic face-embedding manifold) with the
client library, in streams of ``--batches-per-stream`` messages of 1,000 records. The client
runs in its own process, as ``centinela registry import`` does, and reads the vectors from a
file generated before any timing starts (a real import reads Reniec's file; generating
synthetic faces is not the server's cost). It measures:

* ``durable_per_s``: templates acknowledged durable (encrypted, committed with their audit
  entries) per second, from the first message sent to the last stream acknowledged (target
  ≥ 10,000/s);
* ``searchable_s``: seconds from the first message until GetImportStatus reports every
  imported template indexed (index lag 0), with a sample searched to check they are found;
* ``bare_build_s``: seconds for a bare hnswlib bulk build of the same vectors with the
  matcher's parameters (M=16, ef_construction=100, all threads), in the same run after the
  server stopped (target: ``searchable_s`` ≤ 2 × ``bare_build_s``);
* ``store_direct_per_s``: the encrypted store written in-process without gRPC, on a subset
  (the baseline showing what the service path costs).

Usage: ``.venv/bin/python benchmarks/registry_import.py [--quick] [--n 1000000]``.
``--quick`` imports 20,000 templates (under a minute). The last line is one JSON object.

The figures are wall-clock on whatever else the shared machine runs: the JSON carries the
load average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from centinela import logs
from centinela.clients.client import CentinelaClient
from centinela.clients.tls import TlsMaterial
from centinela.config import Settings
from centinela.matcher.keys import FileKeyProvider
from centinela.matcher.service import REGISTRY, HnswSettings
from centinela.matcher.store import TemplateColumns, TemplateStore
from centinela.matcher.synth import identities
from centinela.server import certs
from centinela.server.app import freeze_startup_heap
from centinela.server.testing import ServerThread
from centinela.storage import make_engine
from centinela.v1 import common_pb2
from centinela.v1 import registry_service_pb2 as rpb

BATCH = 1000
CHUNK = 10_000  # vectors generated per seed (identities(CHUNK, seed=i))
MODEL = "arcface-w600k-r50"
IDENTITY = "reniec-bench"
DNI_BASE = 10_000_000


# ---- set-up ------------------------------------------------------------------------------


def make_population(path: Path, n: int) -> None:
    """Templates 0 … n-1 into a ``.npy`` file (deterministic by chunk of 10,000)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 512))
    for first in range(0, n, CHUNK):
        take = min(CHUNK, n - first)
        out[first : first + take] = identities(CHUNK, 512, seed=first // CHUNK)[:take]
    out.flush()
    del out


def population(path: Path) -> npt.NDArray[np.float32]:
    vecs: npt.NDArray[np.float32] = np.load(path, mmap_mode="r")
    return vecs


def dni_bytes(start: int, count: int) -> npt.NDArray[np.uint8]:
    numbers = np.arange(DNI_BASE + start, DNI_BASE + start + count, dtype=np.int64)
    digits = np.empty((count, 8), dtype=np.uint8)
    for pos in range(7, -1, -1):
        digits[:, pos] = ord("0") + numbers % 10
        numbers //= 10
    return digits


def batch_message(number: int, start: int, vecs: npt.NDArray[np.float32]) -> Any:
    """One ImportTemplatesRequest built from wire bytes (fast: no per-float Python work)."""
    n = len(vecs)
    model = MODEL.encode()
    inner = 2 + 8 + 2 + len(model) + 3 + 2048  # dni, model_id, packed vector (len 2048)
    head_len = 1 + 2  # tag + 2-byte varint of ``inner`` (inner < 16384)
    rows = np.empty((n, head_len + inner), dtype=np.uint8)
    prefix = bytes([0x1A, 0x80 | (inner & 0x7F), inner >> 7, 0x0A, 0x08])
    rows[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    col = len(prefix)
    rows[:, col : col + 8] = dni_bytes(start, n)
    col += 8
    mid = bytes([0x12, len(model)]) + model + bytes([0x1A, 0x80, 0x10])
    rows[:, col : col + len(mid)] = np.frombuffer(mid, dtype=np.uint8)
    col += len(mid)
    rows[:, col:] = np.ascontiguousarray(vecs, dtype="<f4").view(np.uint8).reshape(n, 2048)
    head = rpb.ImportTemplatesRequest(
        context=common_pb2.RequestContext(reference="RES-BENCH-0001"), batch_number=number
    ).SerializeToString()
    return rpb.ImportTemplatesRequest.FromString(head + rows.tobytes())


def streams(vecs: npt.NDArray[np.float32], per_stream: int) -> Iterator[list[Any]]:
    """Lists of messages, built ahead in a thread (the client side of a real import)."""
    out: queue.Queue[list[Any] | None] = queue.Queue(maxsize=2)
    n = len(vecs)

    def build() -> None:
        step = per_stream * BATCH
        for first in range(0, n, step):
            count = min(step, n - first)
            out.put(
                [
                    batch_message(
                        (first + i) // BATCH, first + i, vecs[first + i : first + i + BATCH]
                    )
                    for i in range(0, count, BATCH)
                ]
            )
        out.put(None)

    threading.Thread(target=build, daemon=True).start()
    while (item := out.get()) is not None:
        yield item


# ---- measurements ------------------------------------------------------------------------


def client_process(
    target: str, data_dir: str, vectors_path: str, per_stream: int, report: Any
) -> None:
    """The importing client (its own process): streams every template, reports timings
    (``time.monotonic`` is the same clock in every process of the machine)."""
    vecs = population(Path(vectors_path))
    client = CentinelaClient(
        target, tls=TlsMaterial.from_data_dir(Path(data_dir), IDENTITY), timeout=600
    )
    accepted = 0
    n = len(vecs)
    t0 = time.monotonic()
    for group in streams(vecs, per_stream):
        answer = client.import_templates(group, timeout=600)
        accepted += answer.accepted
        if answer.rejected:
            report.put(("error", f"unexpected rejects: {answer.rejects[0]}"))
            return
        done = accepted / max(time.monotonic() - t0, 1e-9)
        print(f"  durable {accepted:,}/{n:,}  {done:,.0f}/s", file=sys.stderr, flush=True)
    report.put(("done", accepted, t0, time.monotonic()))
    client.close()


def through_server(vectors_path: Path, per_stream: int, root: Path) -> dict[str, Any]:
    """Import every template through the real server; time durable and searchable."""
    n = len(population(vectors_path))
    settings = Settings(
        data_dir=root / "data",
        listen="127.0.0.1:0",
        shutdown_grace_s=5.0,
        policy_bundle="interim",
        face_model_id=MODEL,
        log_level="warning",
    )
    srv = ServerThread(settings).start()
    freeze_startup_heap()  # as `centinela serve` does once it serves
    try:
        ca = certs.TlsFiles(*(srv.certs_dir / f for f in ("ca.crt", "ca.key", "ca.crt")))
        ident = certs.DevIdentity(IDENTITY, "reniec", "reniec", ("admin", "registry"))
        certs.issue_client(ca, srv.certs_dir, ident)
        probes = SearchProbe(srv, population(vectors_path))
        probes.start()
        ctx = multiprocessing.get_context("spawn")
        report = ctx.Queue()
        child = ctx.Process(
            target=client_process,
            args=(srv.target, str(settings.data_dir), str(vectors_path), per_stream, report),
        )
        child.start()
        result = report.get(timeout=3600 + n / 100)
        child.join(60)
        if result[0] != "done":
            raise SystemExit(result[1])
        _, accepted, t0, t_acked = result
        client = CentinelaClient(
            srv.target, tls=TlsMaterial.from_data_dir(settings.data_dir, IDENTITY), timeout=600
        )
        status_req = rpb.GetImportStatusRequest(context=common_pb2.RequestContext())
        polls = 0
        while True:
            status = client.get_import_status(status_req)
            polls += 1
            if status.index_lag == 0 and status.indexed >= n:
                break
            if polls % 20 == 0:
                print(f"  indexed {status.indexed:,}/{n:,}", file=sys.stderr, flush=True)
            time.sleep(0.1 if n <= 100_000 else 1.0)
        t_searchable = time.monotonic() - t0
        search_ms = probes.stop()
        recall = sample_recall(srv, population(vectors_path))
        client.close()
    finally:
        srv.stop(grace=5.0)
    t_durable = t_acked - t0
    return {
        "accepted": accepted,
        "durable_s": t_durable,
        "durable_per_s": accepted / t_durable,
        "searchable_s": t_searchable,
        "recall_at_1_sample": recall,
        "search_ms": search_ms,
    }


class SearchProbe(threading.Thread):
    """Registry searches every 50 ms while the import and the catch-up run (in-process,
    the live index): how long a search waits for the index the catch-up is writing."""

    def __init__(self, srv: ServerThread, vecs: npt.NDArray[np.float32]) -> None:
        super().__init__(daemon=True)
        self.matcher = srv.app.components.matcher
        self.probes = np.ascontiguousarray(vecs[: min(len(vecs), 1000)])
        self.times: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.done.is_set():
            probe = self.probes[i % len(self.probes)]
            t = time.perf_counter()
            self.matcher.search_faces(REGISTRY, probe, model_id=MODEL, k=1, min_score=0.9)
            self.times.append((time.perf_counter() - t) * 1000)
            i += 1
            self.done.wait(0.05)

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        ms = np.asarray(self.times or [0.0])
        return {
            "searches": len(self.times),
            "p50": round(float(np.percentile(ms, 50)), 2),
            "p99": round(float(np.percentile(ms, 99)), 2),
            "max": round(float(ms.max()), 2),
        }


def sample_recall(srv: ServerThread, vecs: npt.NDArray[np.float32], samples: int = 200) -> float:
    """Top-1 of imported templates searched as probes (in-process, the live index)."""
    matcher = srv.app.components.matcher
    store = matcher.store
    n = len(vecs)
    rng = np.random.default_rng(7)
    picks = rng.choice(n, size=min(samples, n), replace=False)
    found = 0
    for i in picks.tolist():
        hits = matcher.search_faces(REGISTRY, vecs[i], model_id=MODEL, k=1, min_score=0.9)
        dni = f"{DNI_BASE + int(i):08d}"
        if hits and hits[0].subject_ref == store.find_subject("reniec", dni):
            found += 1
    return found / len(picks)


def store_direct(vecs: npt.NDArray[np.float32], root: Path) -> float:
    """Templates/s written to the encrypted store in-process (no gRPC, no validation)."""
    engine = make_engine(f"sqlite:///{root / 'direct.db'}")
    store = TemplateStore(engine, FileKeyProvider(root / "keys"))
    n = len(vecs)
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        part = np.ascontiguousarray(vecs[i : i + BATCH])
        dnis = [f"{DNI_BASE + j:08d}" for j in range(i, i + len(part))]
        store.add_templates(
            "reniec", REGISTRY, MODEL, TemplateColumns.for_dnis(part, dnis), replace_existing=True
        )
    seconds = time.perf_counter() - t0
    engine.dispose()
    return n / seconds


def bare_build(vecs: npt.NDArray[np.float32]) -> float:
    """Seconds for hnswlib to bulk-build the same vectors with the matcher's parameters."""
    import hnswlib

    hnsw = HnswSettings()
    n = len(vecs)
    data = np.ascontiguousarray(vecs)
    index = hnswlib.Index(space="cosine", dim=512)
    index.init_index(max_elements=n, M=hnsw.M, ef_construction=hnsw.ef_construction)
    t0 = time.perf_counter()
    index.add_items(data, np.arange(n), num_threads=-1)
    return time.perf_counter() - t0


# ---- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 templates (< 1 min)")
    parser.add_argument("--n", type=int, default=0, help="templates (default 1,000,000)")
    parser.add_argument("--batches-per-stream", type=int, default=10)
    parser.add_argument("--direct-n", type=int, default=0, help="store-direct subset size")
    args = parser.parse_args(argv)
    n = args.n or (20_000 if args.quick else 1_000_000)
    direct_n = args.direct_n or min(n, 20_000 if args.quick else 50_000)
    logs.configure("warning")
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="centinela-bench-") as tmp:
        root = Path(tmp)
        vectors_path = root / "population.npy"
        print(f"generating {n:,} synthetic templates (not timed) …", file=sys.stderr)
        make_population(vectors_path, n)
        print(f"registry import of {n:,} templates through the server …", file=sys.stderr)
        served = through_server(vectors_path, args.batches_per_stream, root / "served")
        print(f"store-direct baseline on {direct_n:,} …", file=sys.stderr)
        (root / "direct").mkdir()
        vecs = population(vectors_path)
        direct_per_s = store_direct(vecs[:direct_n], root / "direct")
        print(f"bare hnswlib build of {n:,} …", file=sys.stderr)
        bare_s = bare_build(vecs)
        del vecs
    load_end = os.getloadavg()[0]
    ratio = served["searchable_s"] / bare_s
    rows = [
        ("templates imported", f"{n:,}"),
        ("durable through the server", f"{served['durable_per_s']:,.0f} /s (target ≥ 10,000)"),
        ("time to durable", f"{served['durable_s']:.1f} s"),
        ("store direct (no gRPC), baseline", f"{direct_per_s:,.0f} /s on {direct_n:,}"),
        ("service / direct", f"{served['durable_per_s'] / direct_per_s:.2f}"),
        ("time to searchable", f"{served['searchable_s']:.1f} s"),
        ("bare hnswlib build, same vectors", f"{bare_s:.1f} s"),
        ("searchable / bare build", f"{ratio:.2f} (target ≤ 2)"),
        ("recall@1 of imported samples", f"{served['recall_at_1_sample']:.3f}"),
        (
            "registry search during import",
            "p50 {p50} ms, p99 {p99} ms, max {max} ms ({searches} searches)".format(
                **served["search_ms"]
            ),
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"Registry import (shared 2-core machine, load {load_start:.1f} → {load_end:.1f})")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(
        json.dumps(
            {
                "n": n,
                "durable_per_s": round(served["durable_per_s"], 1),
                "durable_s": round(served["durable_s"], 2),
                "searchable_s": round(served["searchable_s"], 2),
                "bare_build_s": round(bare_s, 2),
                "searchable_over_bare": round(ratio, 3),
                "store_direct_per_s": round(direct_per_s, 1),
                "service_over_direct": round(served["durable_per_s"] / direct_per_s, 3),
                "recall_at_1_sample": served["recall_at_1_sample"],
                "search_during_import_ms": served["search_ms"],
                "target_durable_per_s": 10_000,
                "target_searchable_over_bare": 2.0,
                "quick": bool(args.quick),
                "load_avg_start": round(load_start, 2),
                "load_avg_end": round(load_end, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
