"""Registry import benchmark: a Reniec bulk import through the real server, against a bare build.

It starts a real Centinela server in-process (mutual TLS on loopback, SQLite, encrypted
template store, policy, durable audit log, background HNSW catch-up) and imports N synthetic
templates (``centinela.matcher.synth.identities``: realistic face-embedding manifold) with the
client library, in streams of ``--batches-per-stream`` messages of 1,000 records. It measures:

* ``durable_per_s``: templates acknowledged durable (encrypted, committed) per second, from
  the first message sent to the last stream acknowledged (target ≥ 10,000/s);
* ``searchable_s``: seconds from the first message until GetImportStatus reports every
  imported template indexed (index lag 0), with a sample searched to check they are found;
* ``bare_build_s``: seconds for a bare hnswlib bulk build of the same vectors with the
  matcher's parameters (M=16, ef_construction=100, all threads), in the same run after the
  server stopped (target: ``searchable_s`` ≤ 2 × ``bare_build_s``);
* ``store_direct_per_s``: the encrypted store written in-process without gRPC, on a subset
  (the baseline showing what the service path costs).

Usage: ``.venv/bin/python benchmarks/registry_import.py [--quick] [--n 1000000]``.
``--quick`` imports 20,000 templates (under a minute). The last line is one JSON object.

Until the policy bundles grant ``GetImportStatus`` and the dev ``reniec`` certificate carries
the role the bundles grant (``admin``), this script bridges both the way the tests do: a
patched copy of the bundle and a Reniec certificate with both roles, issued by the dev CA.
"""

from __future__ import annotations

import argparse
import json
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
from centinela.matcher.store import TemplateRecord, TemplateStore
from centinela.matcher.synth import identities
from centinela.server import certs
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


def vectors(start: int, count: int) -> npt.NDArray[np.float32]:
    """Templates ``start … start+count-1`` of the population (deterministic by chunk)."""
    out = np.empty((count, 512), dtype=np.float32)
    done = 0
    while done < count:
        i = start + done
        chunk, offset = divmod(i, CHUNK)
        take = min(CHUNK - offset, count - done)
        out[done : done + take] = identities(CHUNK, 512, seed=chunk)[offset : offset + take]
        done += take
    return out


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


def streams(n: int, per_stream: int) -> Iterator[list[Any]]:
    """Lists of messages, built ahead in a thread (the client side of a real import)."""
    out: queue.Queue[list[Any] | None] = queue.Queue(maxsize=2)

    def build() -> None:
        step = per_stream * BATCH
        for first in range(0, n, step):
            count = min(step, n - first)
            vecs = vectors(first, count)
            out.put(
                [
                    batch_message((first + i) // BATCH, first + i, vecs[i : i + BATCH])
                    for i in range(0, count, BATCH)
                ]
            )
        out.put(None)

    threading.Thread(target=build, daemon=True).start()
    while (item := out.get()) is not None:
        yield item


# ---- measurements ------------------------------------------------------------------------


def through_server(n: int, per_stream: int, root: Path) -> dict[str, Any]:
    """Import n templates through the real server; time durable and searchable."""
    settings = Settings(
        data_dir=root / "data",
        listen="127.0.0.1:0",
        shutdown_grace_s=5.0,
        policy_bundle="interim",
        face_model_id=MODEL,
        log_level="warning",
    )
    srv = ServerThread(settings).start()
    try:
        ca = certs.TlsFiles(*(srv.certs_dir / f for f in ("ca.crt", "ca.key", "ca.crt")))
        ident = certs.DevIdentity(IDENTITY, "reniec", "reniec", ("admin", "registry"))
        certs.issue_client(ca, srv.certs_dir, ident)
        client = CentinelaClient(
            srv.target, tls=TlsMaterial.from_data_dir(settings.data_dir, IDENTITY), timeout=600
        )
        status_req = rpb.GetImportStatusRequest(context=common_pb2.RequestContext())
        accepted = 0
        t0 = time.perf_counter()
        for group in streams(n, per_stream):
            answer = client.import_templates(group, timeout=600)
            accepted += answer.accepted
            if answer.rejected:
                raise SystemExit(f"unexpected rejects: {answer.rejects[0]}")
            done = accepted / max(time.perf_counter() - t0, 1e-9)
            print(f"  durable {accepted:,}/{n:,}  {done:,.0f}/s", file=sys.stderr, flush=True)
        t_durable = time.perf_counter() - t0
        polls = 0
        while True:
            status = client.get_import_status(status_req)
            polls += 1
            if status.index_lag == 0 and status.indexed >= n:
                break
            if polls % 20 == 0:
                print(f"  indexed {status.indexed:,}/{n:,}", file=sys.stderr, flush=True)
            time.sleep(0.25 if n <= 100_000 else 1.0)
        t_searchable = time.perf_counter() - t0
        recall = sample_recall(srv, n)
        client.close()
    finally:
        srv.stop(grace=5.0)
    return {
        "accepted": accepted,
        "durable_s": t_durable,
        "durable_per_s": accepted / t_durable,
        "searchable_s": t_searchable,
        "recall_at_1_sample": recall,
    }


def sample_recall(srv: ServerThread, n: int, samples: int = 200) -> float:
    """Top-1 of imported templates searched as probes (in-process, the live index)."""
    matcher = srv.app.components.matcher
    store = matcher.store
    rng = np.random.default_rng(7)
    picks = rng.choice(n, size=min(samples, n), replace=False)
    found = 0
    chunks: dict[int, npt.NDArray[np.float32]] = {}
    for i in picks.tolist():
        chunk, offset = divmod(int(i), CHUNK)
        if chunk not in chunks:
            chunks[chunk] = identities(CHUNK, 512, seed=chunk)
        vec = chunks[chunk][offset]
        hits = matcher.search_faces(REGISTRY, vec, model_id=MODEL, k=1, min_score=0.9)
        dni = f"{DNI_BASE + int(i):08d}"
        if hits and hits[0].subject_ref == store.find_subject("reniec", dni):
            found += 1
    return found / len(picks)


def store_direct(n: int, root: Path) -> float:
    """Templates/s written to the encrypted store in-process (no gRPC, no validation)."""
    engine = make_engine(f"sqlite:///{root / 'direct.db'}")
    store = TemplateStore(engine, FileKeyProvider(root / "keys"))
    vecs = vectors(0, n)
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        records = [
            TemplateRecord(vector=vecs[j], dni=f"{DNI_BASE + j:08d}")
            for j in range(i, min(n, i + BATCH))
        ]
        store.add_templates("reniec", REGISTRY, MODEL, records, replace_existing=True)
    seconds = time.perf_counter() - t0
    engine.dispose()
    return n / seconds


def bare_build(n: int) -> float:
    """Seconds for hnswlib to bulk-build the same n vectors with the matcher's parameters."""
    import hnswlib

    hnsw = HnswSettings()
    vecs = vectors(0, n)
    index = hnswlib.Index(space="cosine", dim=512)
    index.init_index(max_elements=n, M=hnsw.M, ef_construction=hnsw.ef_construction)
    t0 = time.perf_counter()
    index.add_items(vecs, np.arange(n), num_threads=-1)
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
    with tempfile.TemporaryDirectory(prefix="centinela-bench-") as tmp:
        root = Path(tmp)
        print(f"registry import of {n:,} templates through the server …", file=sys.stderr)
        served = through_server(n, args.batches_per_stream, root / "served")
        print(f"store-direct baseline on {direct_n:,} …", file=sys.stderr)
        (root / "direct").mkdir()
        direct_per_s = store_direct(direct_n, root / "direct")
    print(f"bare hnswlib build of {n:,} …", file=sys.stderr)
    bare_s = bare_build(n)
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
    ]
    width = max(len(k) for k, _ in rows)
    print("Registry import (busy shared 2-core machine; one run)")
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
                "target_durable_per_s": 10_000,
                "target_searchable_over_bare": 2.0,
                "quick": bool(args.quick),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
