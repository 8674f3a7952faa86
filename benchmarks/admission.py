"""The admission's own cost per completion, with many callers waiting (a national programme).

    python -m benchmarks.admission [--quick] [--completions N] [--rounds R]

:class:`~centinela.server.admission.InFlight` on the server's event loop, driven by a model
of saturated demand and nothing else (no gRPC, no decisions): N callers (client
certificates) in K organisations, two StreamMatch streams each, every stream sending its
next probe as soon as its last is answered, so that whatever the shares hold back waits. The
oldest probe in flight completes each step, 2.5 ms of the limiter's clock apart (400
decisions a second: one core). Measured per completion: the whole step (the limiter's
``leave``, the hand-over to a waiter, the waiter's task taking its unit and queueing its next
probe) and ``leave`` alone, which is the hand-over's cost; and how evenly the callers were
served (fewest and most completions of one caller).

Baseline in the same run: two callers, nobody waiting. A ratio near 1 at 3,000 callers means
the admission costs the same however many cameras wait; a decision's own CPU is 2-3 ms
(docs/performance.md), against which the step's microseconds are read. Medians of
``--rounds`` rounds. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import time

from centinela.server.admission import InFlight

#: (callers, organisations): a portico pair, a municipality's porticos and a flood, the
#: 19 porticos of Miraflores among other districts, 1,000 and 3,000 cameras in 30 and 70.
SIZES = [(2, 1), (20, 2), (200, 10), (1000, 30), (3000, 70)]
STEP_S = 0.0025
STREAMS = 2


async def _round(callers: int, orgs: int, completions: int) -> dict[str, float]:
    clock = [1000.0]
    f = InFlight(256, gain=2.0, floor=2, max_wait_s=0.25, clock=lambda: clock[0])
    loop = asyncio.get_running_loop()
    in_flight: collections.deque[tuple[str, asyncio.Future[None]]] = collections.deque()
    served: collections.Counter[str] = collections.Counter()
    stop = False

    async def stream(caller: str, org: str) -> None:
        while not stop:
            await f.acquire(caller, org=org, stream=True)
            answered = loop.create_future()
            in_flight.append((caller, answered))
            await answered

    tasks = [
        asyncio.create_task(stream(f"cam-{i:04d}", f"muni-{i % orgs:02d}"))
        for i in range(callers)
        for _ in range(STREAMS)
    ]
    await asyncio.sleep(0)  # every stream asks for its first unit
    waiting = []
    leave_s = 0.0
    began = time.perf_counter()
    for n in range(completions):
        caller, answered = in_flight.popleft()  # never empty: demand is saturated
        clock[0] += STEP_S
        t = time.perf_counter()
        f.leave(STEP_S, stream=True, caller=caller)
        leave_s += time.perf_counter() - t
        answered.set_result(None)
        served[caller] += 1
        await asyncio.sleep(0)  # the waiter that was handed the unit queues its next probe
        if n % 64 == 0:
            waiting.append(f.waiting)
    step_s = time.perf_counter() - began
    stop = True
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    counts = [served[f"cam-{i:04d}"] for i in range(callers)]
    return {
        "step_us": step_s / completions * 1e6,
        "leave_us": leave_s / completions * 1e6,
        "waiting_p50": statistics.median(waiting),
        "served_min": min(counts),
        "served_max": max(counts),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer completions, one round")
    ap.add_argument(
        "--completions",
        type=int,
        default=0,
        help="completions a round (default: ten per caller, at least 20,000)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds per size (median)")
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds
    print(f"admission cost per completion, saturated demand, {STREAMS} streams a caller")
    print(f"(medians of {rounds} rounds; baseline: {SIZES[0][0]} callers, nobody waiting)")
    print(
        f"{'callers':>8}{'orgs':>6}{'waiting':>9}{'step µs':>10}{'× base':>8}"
        f"{'leave µs':>10}{'× base':>8}{'served min/max':>16}"
    )
    rows = []
    base: dict[str, float] = {}
    for callers, orgs in SIZES:
        n = args.completions or max(20_000, 10 * callers)
        if args.quick:
            n = max(2_000, 2 * callers)
        results = [asyncio.run(_round(callers, orgs, n)) for _ in range(rounds)]
        row = {k: statistics.median(r[k] for r in results) for k in results[0]}
        base = base or row
        print(
            f"{callers:>8}{orgs:>6}{row['waiting_p50']:>9.0f}{row['step_us']:>10.1f}"
            f"{row['step_us'] / base['step_us']:>8.2f}{row['leave_us']:>10.1f}"
            f"{row['leave_us'] / base['leave_us']:>8.2f}"
            f"{int(row['served_min']):>9}/{int(row['served_max'])}"
        )
        rows.append({"callers": callers, "orgs": orgs, "completions": n, **row})
    print(json.dumps({"rounds": rounds, "sizes": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
