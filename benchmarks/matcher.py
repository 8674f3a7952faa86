"""Matcher benchmark: HNSW face galleries against exact numpy search, in the same run.

For each generator (realistic manifold embeddings, isotropic random vectors) and size, it
builds a :class:`~centinela.matcher.gallery.FaceGallery`, tunes ``ef`` on a sample, and
measures on genuine probes:

* hit recall: among probes whose true template scores >= the threshold in exact search,
  the share for which the gallery search returns it (threshold, top-k as in production);
* recall@10: overlap of the gallery's top-10 with exact top-10;
* single-thread queries/s of the gallery search and of exact numpy search (medians);
* build time, index memory over raw float32 bytes, and start-up from an encrypted snapshot.

Usage: ``.venv/bin/python benchmarks/matcher.py [--quick] [--sizes 100000,1000000]``.
The last line of output is one JSON object.
"""

from __future__ import annotations

import os

# The exact baseline is single-threaded like the gallery search it is compared with; BLAS
# threads also spin badly on a busy shared machine. Must be set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from centinela.matcher import synth  # noqa: E402
from centinela.matcher.gallery import FaceGallery  # noqa: E402
from centinela.matcher.snapshot import read_snapshot, write_snapshot  # noqa: E402

THRESHOLD = 0.40
K = 10


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def exact_topk(templates: np.ndarray, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k ids and scores per probe (blocked matrix product)."""
    ids = np.empty((len(probes), k), dtype=np.int64)
    scores = np.empty((len(probes), k), dtype=np.float32)
    for start in range(0, len(probes), 64):
        block = templates @ probes[start : start + 64].T  # (n, b)
        part = np.argpartition(-block, k, axis=0)[:k].T
        s = np.take_along_axis(block.T, part, axis=1)
        order = np.argsort(-s, axis=1)
        ids[start : start + 64] = np.take_along_axis(part, order, axis=1)
        scores[start : start + 64] = np.take_along_axis(s, order, axis=1)
    return ids, scores


def run_one(generator: str, n: int, queries: int, exact_queries: int, args: Any) -> dict[str, Any]:
    make = synth.identities if generator == "realistic" else synth.isotropic
    t0 = time.perf_counter()
    templates = make(n, 512, seed=11)
    probe_src = np.random.default_rng(5).choice(n, size=min(queries, n), replace=False)
    probes = synth.genuine_probes(templates[probe_src], seed=12)
    gen_s = time.perf_counter() - t0

    truth_ids, truth_scores = exact_topk(templates, probes, K)
    genuine = np.einsum("ij,ij->i", templates[probe_src], probes)

    # Exact numpy search, one query at a time (what a server without an index would do).
    lat = []
    for q in probes[:exact_queries]:
        s = time.perf_counter()
        scores = templates @ q
        top = np.argpartition(-scores, K)[:K]
        top[np.argsort(-scores[top])]
        lat.append(time.perf_counter() - s)
    exact_ms = statistics.median(lat) * 1e3

    ids = [f"t{i:08d}" for i in range(n)]
    subjects = [f"s{i:08d}" for i in range(n)]
    rss0 = rss_bytes()
    gallery = FaceGallery(
        "bench", "synthetic", 512, M=args.M, ef_construction=args.ef_construction, capacity=n
    )
    t0 = time.perf_counter()
    gallery.add_batch(ids, subjects, templates, chunk=max(4096, n // 16))
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ef = gallery.tune_ef(sample=min(1000, n))
    tune_s = time.perf_counter() - t0
    rss_delta = rss_bytes() - rss0
    raw = n * 512 * 4
    memory_ratio = gallery.memory_bytes() / raw

    now = dt.datetime.now(dt.UTC)
    lat = []
    hits = eligible = 0
    overlap = 0
    for qi, q in enumerate(probes):
        s = time.perf_counter()
        res = gallery.search(q, k=K, min_score=THRESHOLD, now=now)
        lat.append(time.perf_counter() - s)
        if genuine[qi] >= THRESHOLD:
            eligible += 1
            hits += int(probe_src[qi]) in {int(h.template_id[1:]) for h in res}
        everything = gallery.search(q, k=K, min_score=-1.0, now=now)
        got = {int(h.template_id[1:]) for h in everything}
        overlap += len(got & set(truth_ids[qi].tolist()))
    hnsw_ms = statistics.median(lat) * 1e3
    p99_ms = float(np.percentile(lat, 99) * 1e3)

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "bench.snap"
        key = os.urandom(32)
        t0 = time.perf_counter()
        write_snapshot(path, gallery, owner="pnp", key_id="k", data_key=key, store_id="bench")
        snap_write_s = time.perf_counter() - t0
        snap_bytes = path.stat().st_size
        del gallery
        t0 = time.perf_counter()
        loaded = read_snapshot(
            path,
            gallery="bench",
            model_id="synthetic",
            dim=512,
            owner="pnp",
            store_id="bench",
            store_seq=0,
            key_lookup=lambda _kid: key,
        )
        loaded.search(probes[0], k=K, min_score=-1.0, now=now)
        snapshot_start_s = time.perf_counter() - t0
        del loaded

    return {
        "generator": generator,
        "size": n,
        "queries": len(probes),
        "hit_recall": hits / max(eligible, 1),
        "hit_eligible": eligible,
        "recall_at_10": overlap / (K * len(probes)),
        "genuine_median": float(np.median(genuine)),
        "top_impostor_median": float(
            np.median(
                np.where(truth_ids[:, 0] == probe_src, truth_scores[:, 1], truth_scores[:, 0])
            )
        ),
        "ef": ef,
        "M": args.M,
        "ef_construction": args.ef_construction,
        "build_s": round(build_s, 2),
        "build_per_s": round(n / build_s, 1),
        "tune_s": round(tune_s, 2),
        "generate_s": round(gen_s, 2),
        "exact_ms": round(exact_ms, 3),
        "hnsw_ms": round(hnsw_ms, 4),
        "hnsw_p99_ms": round(p99_ms, 4),
        "qps_hnsw": round(1e3 / hnsw_ms, 1),
        "qps_exact": round(1e3 / exact_ms, 2),
        "speedup_vs_exact": round(exact_ms / hnsw_ms, 1),
        "memory_ratio": round(memory_ratio, 3),
        "rss_ratio": round(rss_delta / raw, 3),
        "snapshot_bytes": snap_bytes,
        "snapshot_write_s": round(snap_write_s, 2),
        "snapshot_start_s": round(snapshot_start_s, 2),
    }


def real_embeddings() -> dict[str, Any] | None:
    """Embeddings the edge encoder makes from the face photos that packages ship.

    Too few faces for a speed figure; what they check is the synthetic generator's
    calibration: impostor cosines of real ArcFace embeddings against the generator's
    N(0, 0.08²), and genuine cosines (here a mirrored capture of each face, and Yao Ming's
    portrait against the team photo he appears in) against its 0.5-0.7.
    """
    try:
        import cv2

        from centinela.clients.encoder import FaceEncoder
        from centinela.models import packaged_model_dir
    except ImportError:
        return None
    model_dir = packaged_model_dir()
    if model_dir is None:
        return None
    import skimage.data

    enc = FaceEncoder(threads=1)
    images: dict[str, Any] = {p.name: cv2.imread(str(p)) for p in sorted(model_dir.glob("*.jpg"))}
    images["astronaut"] = cv2.cvtColor(
        skimage.data.astronaut(),  # type: ignore[no-untyped-call]
        cv2.COLOR_RGB2BGR,
    )
    t0 = time.perf_counter()
    faces, flips, names = [], [], []
    for name, img in images.items():
        mirrored = enc.encode(cv2.flip(img, 1))
        for f in enc.encode(img):
            faces.append(f.vector)
            names.append(name)
            cx = (f.box[0] + f.box[2]) / 2
            mirror_cx = img.shape[1] - cx
            near = [m for m in mirrored if abs((m.box[0] + m.box[2]) / 2 - mirror_cx) < 10]
            flips.append(near[0].vector if near else None)
    encode_s = time.perf_counter() - t0
    vecs = np.asarray(faces, dtype=np.float32)
    sims = vecs @ vecs.T
    yao = [i for i, n in enumerate(names) if n == "yaoming.jpg"]
    team = [i for i, n in enumerate(names) if n == "players.jpg"]
    same = np.zeros_like(sims, dtype=bool)
    yao_best = float("nan")
    if yao and team:
        j = max(team, key=lambda t: float(sims[yao[0], t]))
        yao_best = float(sims[yao[0], j])
        same[yao[0], j] = same[j, yao[0]] = True  # the one known same-person pair
    iu = np.triu_indices(len(vecs), 1)
    impostor = sims[iu][~same[iu]]
    genuine = [float(vecs[i] @ fl) for i, fl in enumerate(flips) if fl is not None]
    return {
        "generator": "real",
        "faces": len(vecs),
        "encode_s": round(encode_s, 2),
        "impostor_mean": round(float(impostor.mean()), 4),
        "impostor_std": round(float(impostor.std()), 4),
        "impostor_max": round(float(impostor.max()), 4),
        "mirror_genuine_median": round(float(np.median(genuine)), 4) if genuine else None,
        "yao_portrait_vs_team_photo": round(yao_best, 4),
        "synthetic_impostor_std_target": 0.08,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    ap.add_argument("--sizes", default="100000,1000000", help="realistic generator sizes")
    ap.add_argument("--isotropic-sizes", default="100000", help="isotropic generator sizes")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=100)
    ap.add_argument("--tmp", default=None, help="directory for the snapshot file")
    args = ap.parse_args(argv)
    if args.quick:
        plan = [("realistic", 5000), ("realistic", 10000), ("isotropic", 5000)]
        queries, exact_queries = 300, 100
    else:
        plan = [("realistic", int(s)) for s in args.sizes.split(",") if s]
        plan += [("isotropic", int(s)) for s in args.isotropic_sizes.split(",") if s]
        queries, exact_queries = args.queries, 200
    print(f"matcher benchmark: {len(plan)} runs, threshold {THRESHOLD}, k={K}", flush=True)
    runs = []
    for generator, n in plan:
        r = run_one(generator, n, queries, exact_queries, args)
        runs.append(r)
        print(json.dumps(r), flush=True)
    header = (
        f"{'generator':<10} {'size':>9} {'hit_rec':>8} {'rec@10':>7} {'ef':>4} {'build_s':>8} "
        f"{'hnsw_ms':>8} {'exact_ms':>9} {'speedup':>8} {'mem':>6} {'snap_s':>7}"
    )
    print(header)
    for r in runs:
        print(
            f"{r['generator']:<10} {r['size']:>9} {r['hit_recall']:>8.4f} "
            f"{r['recall_at_10']:>7.4f} {r['ef']:>4} {r['build_s']:>8.1f} {r['hnsw_ms']:>8.3f} "
            f"{r['exact_ms']:>9.2f} {r['speedup_vs_exact']:>8.1f} {r['memory_ratio']:>6.3f} "
            f"{r['snapshot_start_s']:>7.2f}"
        )
    real = real_embeddings()
    if real is not None:
        print(
            f"real ArcFace (w600k_mbf) on {real['faces']} faces from package photos: impostor "
            f"cosine mean {real['impostor_mean']} std {real['impostor_std']} max "
            f"{real['impostor_max']} (generator: std 0.08); mirrored-capture genuine median "
            f"{real['mirror_genuine_median']}; Yao Ming portrait vs team photo "
            f"{real['yao_portrait_vs_team_photo']}"
        )
    realistic = [r for r in runs if r["generator"] == "realistic"]
    head = max(realistic or runs, key=lambda r: r["size"])
    summary: dict[str, Any] = {
        key: head[key]
        for key in (
            "hit_recall",
            "recall_at_10",
            "speedup_vs_exact",
            "memory_ratio",
            "snapshot_start_s",
            "build_s",
            "qps_hnsw",
            "qps_exact",
        )
    }
    summary["headline"] = f"{head['generator']}@{head['size']}"
    summary["quick"] = args.quick
    summary["runs"] = {f"{r['generator']}@{r['size']}": r for r in runs}
    summary["real_embeddings"] = real
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
