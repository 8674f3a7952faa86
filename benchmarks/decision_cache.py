"""Policy evaluations that porticos cost the server: decisions reused across time or not.

A model of the national programme's cameras: N cameras (each its own site) in K
municipalities, each sending 2 probes a second for S simulated seconds, with capture times a
fraction of a second before the server's ``now`` and probe qualities drawn per frame
(0.80-0.99, rounded down to 0.05 as the server does). Every probe goes through
``server.decision_cache.DecisionCache`` on the real embedded engine and interim bundle,
in two modes measured in the same run:

* per second   - the cache as it was until session 21: a decision declares no time
                 instants, so it is reused only within the second it was taken at (the
                 engine's answers with ``instants`` taken out);
* instants     - the cache now: a decision is reused across every time between the instants
                 the policy declares (none for a municipal alert search).

Reported per mode: engine evaluations per simulated second, CPU seconds in the cache (this
process), and from the steady state (the second half of the simulated seconds) the CPU a
second of traffic costs, scaled to 3,000 cameras. The first seconds are every camera's first
sight of each quality step in both modes.

Usage: .venv/bin/python benchmarks/decision_cache.py [--cameras N] [--seconds S] [--quick]
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import time
from typing import Any

from centinela.policy import Bundle, EmbeddedEngine, PolicyService
from centinela.policy.testing import WithoutInstants, load_cases
from centinela.server.decision_cache import DecisionCache

NATIONAL = 3_000


def traffic(
    cameras: int, orgs: int, seconds: int, seed: int = 7
) -> tuple[list[tuple[int, dict[str, Any]]], dict[str, Any]]:
    """(simulated second, policy input) in time order, and the dynamic data with the sites."""
    cases, fixture = load_cases(Bundle.load("interim"))
    base = cases["r1_allow_declared_purpose"]["input"]
    base = {k: v for k, v in base.items() if k != "rate"}  # the server enforces the rate
    rng = random.Random(seed)
    sites: dict[str, Any] = {}
    plan: list[tuple[float, str, str]] = []
    for cam in range(cameras):
        org = f"muni-{cam % orgs:03d}"
        site = f"{org}-cam-{cam:05d}"
        sites[site] = {"municipality": org, "region": "LIMA", "active": True}
        offset = rng.random() / 2
        plan.extend((s + offset + half, org, site) for s in range(seconds) for half in (0, 0.5))
    plan.sort()
    start = dt.datetime(2026, 3, 1, 10, tzinfo=dt.UTC)
    out = []
    for at, org, site in plan:
        now = start + dt.timedelta(seconds=at)
        capture = now - dt.timedelta(seconds=rng.uniform(0.05, 0.4))
        quality = math.floor(rng.uniform(0.80, 0.99) * 20) / 20
        doc = {
            **base,
            "caller": {**base["caller"], "org": org},
            "context": {
                "site_id": site,
                "now": now.replace(microsecond=0).isoformat(),
                "capture_time": capture.replace(microsecond=0).isoformat(),
            },
            "probe": {**base["probe"], "quality": quality},
        }
        out.append((int(at), doc))
    return out, {**fixture, "sites": sites}


def run(cache: DecisionCache, probes: list[tuple[int, dict[str, Any]]], seconds: int) -> Any:
    """Per simulated second: (evaluations, CPU s)."""
    evaluations = [0] * seconds
    cpu = [0.0] * seconds
    allowed = 0
    for second, doc in probes:
        before = cache.misses
        t0 = time.process_time()
        result = cache.decide(doc)
        cpu[second] += time.process_time() - t0
        evaluations[second] += cache.misses - before
        allowed += result.active.allow
    assert allowed == len(probes), "every probe of the model is a lawful alert search"
    return evaluations, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cameras", type=int, default=NATIONAL)
    ap.add_argument("--orgs", type=int, default=70, help="municipalities (default 70)")
    ap.add_argument("--seconds", type=int, default=10, help="simulated seconds (default 10)")
    ap.add_argument("--quick", action="store_true", help="200 cameras in 10 municipalities")
    args = ap.parse_args()
    if args.quick:
        args.cameras, args.orgs = 200, 10
    probes, dynamic = traffic(args.cameras, args.orgs, args.seconds)
    engine = EmbeddedEngine(Bundle.load("interim"), dynamic)
    steady = range(args.seconds // 2, args.seconds)
    print(
        f"{args.cameras} cameras in {args.orgs} municipalities, 2 probes/s each, "
        f"{args.seconds} simulated s ({len(probes)} probes); real engine, interim bundle"
    )
    rows: dict[str, dict[str, Any]] = {}
    for mode, policy in (
        ("per second", PolicyService(WithoutInstants(engine))),
        ("instants", PolicyService(engine)),
    ):
        print(f"  running {mode} ...", flush=True)
        evaluations, cpu = run(DecisionCache(policy), probes, args.seconds)
        steady_cpu = sum(cpu[s] for s in steady) / len(steady)
        rows[mode] = {
            "evaluations_per_second": evaluations,
            "cpu_s": sum(cpu),
            "steady_evaluations_per_camera_s": sum(evaluations[s] for s in steady)
            / (len(steady) * args.cameras),
            "steady_cpu_s_per_s": steady_cpu,
            "cores_at_3000": steady_cpu * NATIONAL / args.cameras,
        }
    print(
        "engine evaluations in each simulated second; steady state = seconds "
        f"{steady.start}-{steady.stop - 1}"
    )
    print(
        f"{'mode':<12}{'evaluations per second':<40}{'per cam-s':>10}{'CPU s':>8}"
        f"{'cores at 3,000':>16}"
    )
    for mode, r in rows.items():
        per_s = " ".join(str(e) for e in r["evaluations_per_second"])
        print(
            f"{mode:<12}{per_s[:39]:<40}{r['steady_evaluations_per_camera_s']:>10.3f}"
            f"{r['cpu_s']:>8.2f}{r['cores_at_3000']:>16.3f}"
        )
    old, new = rows["per second"], rows["instants"]
    ratio = old["steady_cpu_s_per_s"] / max(new["steady_cpu_s_per_s"], 1e-9)
    print(f"steady-state CPU, per second / instants: {ratio:.0f}x")
    print(
        json.dumps(
            {
                "cameras": args.cameras,
                "orgs": args.orgs,
                "seconds": args.seconds,
                "probes": len(probes),
                "per_second": old,
                "instants": new,
                "steady_cpu_ratio": round(ratio, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
