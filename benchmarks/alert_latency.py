"""Alert latency: from a MatchFace answer to the alert at every subscribed control center.

    python benchmarks/alert_latency.py [--quick] [--seconds 20]

A real server runs in a subprocess (see ``_bench_server.py``). In this process, 1 and then
20 control centers subscribe (``SubscribeAlerts`` over mutual TLS, each on its own
connection) while 8 concurrent
clients send MatchFace probes, one in four of a listed person. For every alert the time
from the MatchFace answer to its arrival at each subscriber is recorded (one clock: both
ends are in this process). ``lost_alerts`` counts alerts answered but never delivered to
some subscriber within 10 s after the load stopped. The baseline printed beside it is the
MatchFace latency itself, measured in the same run. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from match_e2e import channel, requests, start_server  # type: ignore[import-not-found]

from centinela.matcher import synth
from centinela.v1 import common_pb2 as c
from centinela.v1 import match_service_pb2 as mpb
from centinela.v1 import match_service_pb2_grpc as mgrpc


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * q))]


async def run_round(data_dir: Path, port: int, subscribers: int, seconds: float) -> dict[str, Any]:
    ch = channel(data_dir, port)
    stub = mgrpc.MatchServiceStub(ch)
    info = await stub.GetServerInfo(mpb.GetServerInfoRequest())
    identities = synth.identities(min(info.galleries[0].size, 2000), seed=5)
    payloads = requests(info.galleries[0].model_id, identities, 800)
    rng = np.random.default_rng(7)
    for i, p in enumerate(payloads):  # one in four a listed person
        if i % 4 == 0:
            vec = synth.genuine_probes(
                identities[rng.integers(0, len(identities))][None, :], seed=i
            )[0]
            del p.probe.vector[:]
            p.probe.vector.extend(vec.tolist())
    answered: dict[str, float] = {}
    arrived: list[dict[str, float]] = [{} for _ in range(subscribers)]
    match_lat: list[float] = []
    ready = asyncio.Event()
    started = 0

    # Every control center is its own client with its own connection, as deployed; the
    # MatchFace load shares one connection (one portico gateway).
    sub_channels = [channel(data_dir, port) for _ in range(subscribers)]

    async def subscriber(k: int) -> None:
        nonlocal started
        call = mgrpc.MatchServiceStub(sub_channels[k]).SubscribeAlerts(
            mpb.SubscribeAlertsRequest(context=c.RequestContext(operator_id=f"op-center-n{k:03d}x"))
        )
        started += 1
        if started == subscribers:
            ready.set()
        try:
            async for ev in call:
                if ev.state == mpb.ALERT_STATE_PENDING:
                    arrived[k].setdefault(ev.alert_id, time.perf_counter())
        except asyncio.CancelledError:
            call.cancel()
            raise

    subs = [asyncio.create_task(subscriber(k)) for k in range(subscribers)]
    await ready.wait()
    await asyncio.sleep(1.5)  # subscriptions start "from now": let them register
    stop = time.perf_counter() + seconds

    async def client(w: int) -> None:
        i = w
        while time.perf_counter() < stop:
            req = payloads[i % len(payloads)]
            req.context.client_request_id = uuid.uuid4().hex
            t0 = time.perf_counter()
            resp = await stub.MatchFace(req)
            t1 = time.perf_counter()
            match_lat.append(t1 - t0)
            for cand in resp.candidates:
                if cand.alert_id:
                    answered[cand.alert_id] = t1
            i += 8

    await asyncio.gather(*(client(w) for w in range(8)))
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline:
        if all(set(answered) <= set(a) for a in arrived):
            break
        await asyncio.sleep(0.1)
    for t in subs:
        t.cancel()
    await asyncio.gather(*subs, return_exceptions=True)
    for sc in sub_channels:
        await sc.close()
    await ch.close()
    lat = [(a[aid] - t) * 1000 for a in arrived for aid, t in answered.items() if aid in a]
    lost = sum(1 for a in arrived for aid in answered if aid not in a)
    return {
        "subscribers": subscribers,
        "alerts": len(answered),
        "deliveries": len(lat),
        "alert_p50_ms": round(pct(lat, 0.5), 2),
        "alert_p99_ms": round(pct(lat, 0.99), 2),
        "lost_alerts": lost,
        "match_p50_ms": round(pct([x * 1000 for x in match_lat], 0.5), 2),
        "match_per_s": round(len(match_lat) / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    seconds = 5.0 if args.quick else args.seconds
    data_dir = Path(tempfile.mkdtemp(prefix="centinela-alerts-"))
    proc, port = start_server(data_dir, 2000)
    try:
        rounds = [asyncio.run(run_round(data_dir, port, n, seconds)) for n in (1, 20)]
    finally:
        proc.terminate()
        proc.wait(60)
    print("\nAlert delivery under MatchFace load (8 clients; one probe in four hits)")
    print(
        f"{'subs':>5} {'alerts':>7} {'p50 ms':>8} {'p99 ms':>8} {'lost':>5} "
        f"{'match p50':>10} {'match/s':>8}"
    )
    for r in rounds:
        print(
            f"{r['subscribers']:>5} {r['alerts']:>7} {r['alert_p50_ms']:>8} "
            f"{r['alert_p99_ms']:>8} {r['lost_alerts']:>5} {r['match_p50_ms']:>10} "
            f"{r['match_per_s']:>8}"
        )
    last = rounds[-1]
    print(
        json.dumps(
            {
                "alert_p50_ms": last["alert_p50_ms"],
                "alert_p99_ms": last["alert_p99_ms"],
                "lost_alerts": sum(r["lost_alerts"] for r in rounds),
                "rounds": rounds,
            },
            sort_keys=True,
        )
    )


if __name__ == "__main__":
    main()
