"""Policy evaluations that porticos cost the server: decisions reused across time or not.

A model of the national programme's cameras: N cameras (each its own site) in K
municipalities, each sending 2 probes a second for S simulated seconds, with capture times a
fraction of a second before the server's ``now`` and probe qualities drawn per frame
(0.80-0.99, rounded down to 0.05 as the server does). Every probe goes through
``server.decision_cache.DecisionCache`` on the real embedded engine and interim bundle,
in three modes measured in the same run:

* per second   - the cache as it was until session 21: a decision declares no time
                 instants, so it is reused only within the second it was taken at (the
                 engine's answers with ``instants`` and ``reads`` taken out);
* instants     - session 21: a decision is reused across every time between the instants
                 the policy declares (none for a municipal alert search), and every
                 decision is dropped at any change of the policy's data (``reads`` taken
                 out);
* reads        - the cache now: a change of data drops only the decisions that read a
                 changed entry (session 22).

The data change three times, as the programme's administrators change it: a municipality
registers a new camera (second 3), a court's authorisation is granted to the PNP (second
5), a camera is deactivated (second 7; its later probes must be refused, R5, in every mode).
Each change is pushed as the server pushes it (the engine recompiled with the new data,
then the cache told what changed).

Reported per mode: engine evaluations per simulated second, CPU seconds in the cache (this
process), the evaluations the changes cost (in their seconds, less the steady rate), the
longest the cache held its lock to drop what a change touched (every probe waits on it), and
from the steady state (the second half of the simulated seconds, the changes' seconds
left out) the CPU a second of traffic costs, scaled to 3,000 cameras. The first seconds
are every camera's first sight of each quality step in every mode.

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
from centinela.policy.testing import Undeclared, load_cases
from centinela.server.decision_cache import DecisionCache, changes

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


#: Simulated second -> what changes in the data then (applied before its probes).
CHANGE_SECONDS = (3, 5, 7)


def changed_data(dynamic: dict[str, Any], deactivated: str) -> dict[int, dict[str, Any]]:
    """The data after each change: a new camera, an authorisation, a camera deactivated."""
    sites = dynamic["sites"]
    first = {**dynamic, "sites": {**sites, "muni-000-cam-new": sites[min(sites)]}}
    granted = {
        "court": "1er Juzgado de Investigacion Preparatoria de Lima",
        "sites": ["pnp-van-12"],
        "not_before": "2026-02-01T00:00:00Z",
        "not_after": "2026-04-01T00:00:00Z",
        "offences": ["ROBO_AGRAVADO"],
        "subjects": [],
        "revoked": False,
    }
    second = {**first, "authorisations": {**first["authorisations"], "AUT-2026-0931": granted}}
    gone = {**second["sites"][deactivated], "active": False}
    third = {**second, "sites": {**second["sites"], deactivated: gone}}
    return dict(zip(CHANGE_SECONDS, (first, second, third), strict=True))


def run(
    policy: PolicyService,
    probes: list[tuple[int, dict[str, Any]]],
    seconds: int,
    change: dict[int, dict[str, Any]],
    deactivated: str,
) -> Any:
    """Per simulated second: (evaluations, CPU s); and the CPU s of each drop."""
    cache = DecisionCache(policy)
    evaluations = [0] * seconds
    cpu = [0.0] * seconds
    drops: list[float] = []
    refused = 0
    current = -1
    for second, doc in probes:
        if second != current:
            current = second
            if second in change:
                old = policy.dynamic_data
                policy.set_dynamic_data(change[second])
                changed = changes(old, change[second])
                t0 = time.perf_counter()
                cache.invalidate(changed)  # under the lock every probe takes
                drops.append(time.perf_counter() - t0)
        before = cache.misses
        t0 = time.process_time()
        result = cache.decide(doc)
        cpu[second] += time.process_time() - t0
        evaluations[second] += cache.misses - before
        gone = doc["context"]["site_id"] == deactivated and second >= CHANGE_SECONDS[-1]
        if gone:
            assert result.active.reasons == ("R5",), "a deactivated camera is refused at once"
            refused += 1
        else:
            assert result.active.allow, "every other probe is a lawful alert search"
    assert refused > 0
    return evaluations, cpu, drops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cameras", type=int, default=NATIONAL)
    ap.add_argument("--orgs", type=int, default=70, help="municipalities (default 70)")
    ap.add_argument("--seconds", type=int, default=10, help="simulated seconds (default 10)")
    ap.add_argument("--quick", action="store_true", help="200 cameras in 10 municipalities")
    args = ap.parse_args()
    if args.quick:
        args.cameras, args.orgs = 200, 10
    if args.seconds <= CHANGE_SECONDS[-1] + 1:
        ap.error(f"--seconds must be more than {CHANGE_SECONDS[-1] + 1}")
    probes, dynamic = traffic(args.cameras, args.orgs, args.seconds)
    deactivated = max(dynamic["sites"])
    change = changed_data(dynamic, deactivated)
    steady = [s for s in range(args.seconds // 2, args.seconds) if s not in change]
    print(
        f"{args.cameras} cameras in {args.orgs} municipalities, 2 probes/s each, "
        f"{args.seconds} simulated s ({len(probes)} probes); real engine, interim bundle"
    )
    rows: dict[str, dict[str, Any]] = {}
    for mode, strip in (
        ("per second", {"instants": True, "reads": True}),
        ("instants", {"instants": False, "reads": True}),
        ("reads", {"instants": False, "reads": False}),
    ):
        print(f"  running {mode} ...", flush=True)
        # Each mode its own engine: the changes recompile it with their data.
        engine = EmbeddedEngine(Bundle.load("interim"), dynamic)
        policy = PolicyService(Undeclared(engine, **strip))
        policy.set_dynamic_data(dynamic)
        evaluations, cpu, drops = run(policy, probes, args.seconds, change, deactivated)
        steady_cpu = sum(cpu[s] for s in steady) / len(steady)
        steady_rate = sum(evaluations[s] for s in steady) / len(steady)
        rows[mode] = {
            "evaluations_per_second": evaluations,
            "cpu_s": sum(cpu),
            "change_evaluations": [round(evaluations[s] - steady_rate) for s in change],
            "drop_ms_max": max(drops) * 1e3,
            "steady_evaluations_per_camera_s": sum(evaluations[s] for s in steady)
            / (len(steady) * args.cameras),
            "steady_cpu_s_per_s": steady_cpu,
            "cores_at_3000": steady_cpu * NATIONAL / args.cameras,
        }
    print(
        "engine evaluations in each simulated second; changes of data at seconds "
        f"{', '.join(map(str, change))}; steady state = seconds {', '.join(map(str, steady))}"
    )
    print(
        f"{'mode':<12}{'evaluations per second':<50}{'per cam-s':>10}{'CPU s':>8}"
        f"{'cores at 3,000':>16}{'changes cost':>20}{'drop ms':>9}"
    )
    for mode, r in rows.items():
        per_s = " ".join(str(e) for e in r["evaluations_per_second"])
        cost = " / ".join(str(e) for e in r["change_evaluations"])
        print(
            f"{mode:<12}{per_s[:49]:<50}{r['steady_evaluations_per_camera_s']:>10.3f}"
            f"{r['cpu_s']:>8.2f}{r['cores_at_3000']:>16.3f}{cost:>20}{r['drop_ms_max']:>9.2f}"
        )
    old, new = rows["per second"], rows["reads"]
    ratio = old["steady_cpu_s_per_s"] / max(new["steady_cpu_s_per_s"], 1e-9)
    print(f"steady-state CPU, per second / reads: {ratio:.0f}x")
    before, now = sum(rows["instants"]["change_evaluations"]), sum(new["change_evaluations"])
    print(f"evaluations the three changes cost, instants / reads: {before} / {now}")
    print(
        json.dumps(
            {
                "cameras": args.cameras,
                "orgs": args.orgs,
                "seconds": args.seconds,
                "probes": len(probes),
                "per_second": old,
                "instants": rows["instants"],
                "reads": new,
                "steady_cpu_ratio": round(ratio, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
