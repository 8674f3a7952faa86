"""CalibrateGallery over mutual TLS against the live gallery, next to exact numpy search.

    python benchmarks/calibrate.py [--quick] [--sizes 100000] [--strangers 5000] [--exact 1000]

For each watchlist size the benchmark server (``_bench_server.py``: the real service, its
watchlist filled with ``synth.identities(n, seed=5)``) runs in a subprocess. The PNP
administrator's certificate streams ``--strangers`` synthetic non-mated templates to
``CalibrateGallery`` (500 a message, as ``centinela admin calibrate`` sends them). In the same
run this process regenerates the very same gallery vectors and computes, with numpy, the
exact top-1 score of the first ``--exact`` strangers. Two figures come out:

* **throughput**: templates/s through the RPC, against exact numpy's templates/s on the
  same machine in the same run (the ratio holds on a noisy machine);
* **agreement**: the threshold for the bundle's ``target_fpir`` and the FPIR at its floor,
  from the service and from exact search over the same subset of strangers (HNSW's misses
  can only lower a score, so the service's FPIR may sit a little under the exact one).

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from match_e2e import (  # type: ignore[import-not-found]
    admin_channel,
    calibration_messages,
    start_server,
)

from centinela.matcher import synth
from centinela.matcher.calibration import fpir, threshold_for_fpir
from centinela.policy.bundle import Bundle
from centinela.v1 import match_service_pb2 as mpb
from centinela.v1 import match_service_pb2_grpc as mgrpc


def exact_top1(gallery: np.ndarray, probes: np.ndarray) -> tuple[np.ndarray, float]:
    """Exact best scores, and the seconds they took (BLAS, both cores)."""
    t0 = time.perf_counter()
    out = np.empty(len(probes))
    for start in range(0, len(probes), 256):
        out[start : start + 256] = (gallery @ probes[start : start + 256].T).max(axis=0)
    return out, time.perf_counter() - t0


def run_size(data_dir: Path, n: int, strangers: int, exact_n: int, rounds: int) -> dict[str, Any]:
    cfg = Bundle.load("interim").config["galleries"]["pnp_watchlist"]
    floor, target = float(cfg["threshold_floor"]), float(cfg["target_fpir"])
    proc, port = start_server(data_dir, n)
    try:
        with admin_channel(data_dir, port) as ch:
            stub = mgrpc.MatchServiceStub(ch)
            info = stub.GetServerInfo(mpb.GetServerInfoRequest(), timeout=60)
            model_id = info.galleries[0].model_id
            probes = synth.strangers(strangers, seed=4242)
            subset = probes[:exact_n]
            rpc_s, answer, sub_answer = [], None, None
            for _ in range(rounds):
                msgs = calibration_messages(model_id, probes, target)
                t0 = time.perf_counter()
                answer = stub.CalibrateGallery(iter(msgs), timeout=3600)
                rpc_s.append(time.perf_counter() - t0)
            # The same subset the exact baseline covers, so the two compare like for like.
            sub_answer = stub.CalibrateGallery(iter(calibration_messages(model_id, subset, target)))
    finally:
        proc.terminate()
        proc.wait(60)
    gallery = synth.identities(n, seed=5).astype(np.float32)
    exact_s = []
    for _ in range(rounds):
        exact, seconds = exact_top1(gallery, subset.astype(np.float32))
        exact_s.append(seconds)
    assert answer is not None
    assert sub_answer is not None
    rpc_rate = strangers / statistics.median(rpc_s)
    exact_rate = exact_n / statistics.median(exact_s)
    exact_threshold = threshold_for_fpir(exact, target)
    return {
        "gallery_size": int(answer.gallery_size),
        "strangers": strangers,
        "rpc_templates_per_s": round(rpc_rate, 1),
        "exact_templates_per_s": round(exact_rate, 1),
        "rpc_vs_exact": round(rpc_rate / exact_rate, 2),
        "threshold": round(answer.threshold, 4),
        "resolved": bool(answer.resolved),
        "fpir_at_floor": round(answer.fpir_at_floor, 4),
        "fpir_at_floor_ci": [
            round(answer.fpir_at_floor_low, 4),
            round(answer.fpir_at_floor_high, 4),
        ],
        "subset": exact_n,
        "subset_threshold_service": round(sub_answer.threshold, 4),
        "subset_threshold_exact": round(exact_threshold, 4),
        "subset_fpir_at_floor_service": round(sub_answer.fpir_at_floor, 4),
        "subset_fpir_at_floor_exact": round(fpir(exact, floor), 4),
        "floor": floor,
        "target_fpir": target,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k listed, 2,000 strangers")
    parser.add_argument("--sizes", default="100000")
    parser.add_argument("--strangers", type=int, default=5000)
    parser.add_argument("--exact", type=int, default=1000, help="strangers searched exactly")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--keep", type=Path, help="reuse/keep data dirs under this directory")
    args = parser.parse_args()
    sizes = [10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    strangers = 2000 if args.quick else args.strangers
    exact_n = min(args.exact, strangers)
    rounds = 1 if args.quick else args.rounds
    base = args.keep or Path(tempfile.mkdtemp(prefix="centinela-bench-"))
    rows: dict[str, Any] = {}
    for n in sizes:
        data_dir = base / f"e2e-{n}"
        data_dir.mkdir(parents=True, exist_ok=True)
        rows[str(n)] = run_size(data_dir, n, strangers, exact_n, rounds)
    print(
        f"\nCalibrateGallery over mTLS vs exact numpy top-1 ({os.cpu_count()} cores, "
        f"median of {rounds} round(s))"
    )
    print(
        f"{'listed':>9} {'strangers':>9} {'rpc t/s':>8} {'exact t/s':>9} {'ratio':>6} "
        f"{'threshold':>9} {'FPIR@floor':>10} | subset {'thr svc':>7} {'thr exact':>9} "
        f"{'FPIR svc':>8} {'FPIR exact':>10}"
    )
    for size, r in rows.items():
        print(
            f"{int(size):>9,} {r['strangers']:>9,} {r['rpc_templates_per_s']:>8.0f} "
            f"{r['exact_templates_per_s']:>9.0f} {r['rpc_vs_exact']:>6.2f} "
            f"{r['threshold']:>9.4f} {r['fpir_at_floor']:>10.4f} | {r['subset']:>6,} "
            f"{r['subset_threshold_service']:>7.4f} {r['subset_threshold_exact']:>9.4f} "
            f"{r['subset_fpir_at_floor_service']:>8.4f} {r['subset_fpir_at_floor_exact']:>10.4f}"
        )
    print(json.dumps({"per_size": rows}, sort_keys=True))


if __name__ == "__main__":
    main()
