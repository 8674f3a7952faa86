"""Open-set identification at the watchlist threshold: FPIR and hit rate against gallery size.

    python benchmarks/threshold_fpir.py [--quick] [--sizes 10000,100000,1000000]

For each size it builds a :class:`~centinela.matcher.gallery.FaceGallery` of synthetic
identities (``synth.identities``, the matcher's parameters) and searches it, top-1, with

* strangers (``synth.strangers``: captures of people not enrolled) — the false-positive
  identification rate FPIR(t) is the share whose best score is at least t;
* genuine probes of enrolled people — the hit rate is the share whose best candidate is
  their own template at a score of at least t.

It prints both at the packaged ``pnp_watchlist`` floor (``policy/rego/interim``), at a few
thresholds above it, and at the threshold that meets the bundle's ``target_fpir``, with
the number of strangers that estimate rests on. Baseline in the same run: exact top-1 by
numpy for a subset of the strangers, so an FPIR the index made up (a missed best
candidate) would show as a disagreement. FPIR grows with the gallery, since each stranger
gets one chance per enrolled person to resemble someone; R8 asks for a threshold
calibrated for a target FPIR, hence per gallery size. The generator's impostor cosines have
std ≈ 0.08 (real ArcFace: 0.091, ``benchmarks/matcher.py``); these are its figures, not a
calibration of any real model. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from typing import Any

import numpy as np

from centinela.matcher import synth
from centinela.matcher.calibration import fpir, threshold_for_fpir
from centinela.matcher.gallery import FaceGallery
from centinela.policy.bundle import Bundle

GRID = (0.45, 0.50, 0.55, 0.60)


def hit_rate(own_top1: np.ndarray, t: float) -> float:
    """``own_top1``: the best score where the best candidate is the probe's own template,
    -inf where it is someone else's."""
    return float(np.mean(np.asarray(own_top1) >= t))


def exact_top1(templates: np.ndarray, probes: np.ndarray) -> np.ndarray:
    out = np.empty(len(probes), dtype=np.float64)
    for start in range(0, len(probes), 64):
        out[start : start + 64] = (templates @ probes[start : start + 64].T).max(axis=0)
    return out


def run_one(n: int, strangers: int, genuine: int, exact: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    templates = synth.identities(n, seed=5)
    g = FaceGallery("bench", "synthetic", 512, capacity=n)
    g.add_batch([f"t{i}" for i in range(n)], [f"s{i}" for i in range(n)], templates)
    g.tune_ef(sample=min(1000, n))
    build_s = time.perf_counter() - t0
    now = dt.datetime.now(dt.UTC)

    def top1(probe: np.ndarray) -> tuple[str, float]:
        hits = g.search(probe, k=1, min_score=-1.0, now=now)
        return (hits[0].template_id, hits[0].score) if hits else ("", -math.inf)

    others = synth.strangers(strangers, seed=4242)
    s_top = np.array([top1(p)[1] for p in others])
    mated = np.random.default_rng(7).choice(n, size=min(genuine, n), replace=False)
    probes = synth.genuine_probes(templates[mated], seed=8)
    own = []
    for i, p in zip(mated.tolist(), probes, strict=True):
        tid, score = top1(p)
        own.append(score if tid == f"t{i}" else -math.inf)
    own_top = np.array(own)
    sub = min(exact, strangers)
    exact_scores = exact_top1(templates, others[:sub])
    agree = float(np.mean(np.abs(exact_scores - s_top[:sub]) < 1e-4))
    print(f"  {n:,}: built and searched in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return {
        "build_s": round(build_s, 1),
        "stranger_top1_p50": round(float(np.median(s_top)), 4),
        "s_top": s_top,
        "own_top": own_top,
        "exact_agreement": round(agree, 4),
        "exact_scores": exact_scores,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k and 30k, 1,000 strangers")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--strangers", type=int, default=3000)
    parser.add_argument("--genuine", type=int, default=2000)
    parser.add_argument("--exact", type=int, default=300, help="strangers checked exactly")
    args = parser.parse_args()
    sizes = [10_000, 30_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    strangers = 1000 if args.quick else args.strangers
    genuine = 500 if args.quick else args.genuine
    cfg = Bundle.load("interim").config["galleries"]["pnp_watchlist"]
    floor, target = float(cfg["threshold_floor"]), float(cfg["target_fpir"])
    rows: dict[str, Any] = {}
    for n in sizes:
        r = run_one(n, strangers, genuine, args.exact)
        s_top, own_top = r.pop("s_top"), r.pop("own_top")
        exact_scores = r.pop("exact_scores")
        t_target = threshold_for_fpir(s_top, target)
        thresholds = (floor, *GRID, t_target)
        r.update(
            {
                "fpir_at": {f"{t:.3f}": round(fpir(s_top, t), 4) for t in thresholds},
                "hit_rate_at": {f"{t:.3f}": round(hit_rate(own_top, t), 4) for t in thresholds},
                "exact_fpir_at_floor": round(fpir(exact_scores, floor), 4),
                "index_fpir_at_floor_same_subset": round(
                    fpir(s_top[: len(exact_scores)], floor), 4
                ),
                "threshold_for_target": round(t_target, 4),
            }
        )
        rows[str(n)] = r
    print(
        f"\npnp_watchlist floor {floor} (interim bundle), target FPIR {target}; "
        f"{strangers:,} strangers, {genuine:,} genuine probes, top-1"
    )
    head = " ".join(f"{'@' + format(t, '.2f'):>11}" for t in (floor, *GRID))
    print(f"{'size':>9} {head} {'t(target)':>10} {'hit@t':>7} {'exact=HNSW':>10}")
    for size_key, r in rows.items():
        cells = " ".join(
            f"{r['fpir_at'][k]:>5.3f}/{r['hit_rate_at'][k]:<5.3f}"
            for k in list(r["fpir_at"])[: 1 + len(GRID)]
        )
        t_key = f"{r['threshold_for_target']:.3f}"
        hit_t = r["hit_rate_at"].get(t_key, float("nan"))
        print(
            f"{size_key:>9} {cells} {r['threshold_for_target']:>10.3f} {hit_t:>7.3f} "
            f"{r['exact_agreement']:>10.3f}"
        )
    print("cells: FPIR / hit rate at each threshold; hit rate = own template first and >= t")
    if strangers < 10 / target:
        sigma = math.sqrt(target / strangers)
        print(
            f"note: {strangers:,} strangers resolve FPIR {target} to ±{sigma:.4f} (one sigma);"
            " use more for a calibration",
            file=sys.stderr,
        )
    print(json.dumps({"floor": floor, "target_fpir": target, "per_size": rows}, sort_keys=True))


if __name__ == "__main__":
    main()
