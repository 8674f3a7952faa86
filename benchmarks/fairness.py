"""Fairness between clients: many client certificates against one server.

    python -m benchmarks.fairness [--quick] [--templates N] [--porticos 19] [--portico-rate 2]
                                  [--gateway-streams 8] [--flood-callers 1,4,19]
                                  [--unary-flood] [--factor 10] [--seconds 20] [--pin]
                                  [--gain G] [--floor F] [--max-streams N] [--keep DIR]

``benchmarks/load.py`` has two clients, one flood and one well-behaved. The server shares
its adaptive limit on stream probes between the clients that called in the last second, and
between their organisations (``centinela.server.admission.InFlight``), so what each gets
depends on how many there are. This tool issues a certificate per client under the data
dir's development CA (distinct common names: the server tells callers apart by it; the
porticos and the operator are Miraflores', the gateway and the flood La Victoria's) and
measures, on the real server of
``load.py`` (``--serve``; the same synthetic watchlist, R14 ceilings lifted):

A. **gateway alone**: one certificate, ``--gateway-streams`` StreamMatch streams on one
   connection, each sending its next face when the last is answered (a gateway for many
   cameras): the server's capacity for this client, and its latency;
B. **gateway + an operator**: another certificate sends one unary MatchFace a second (a
   control room's lookup); the gateway now shares the limit with it: its throughput as a
   share of A's (what an occasional caller costs a busy one), the operator's latency;
C. **porticos alone**: ``--porticos`` certificates (Miraflores' 19 porticos, each its own),
   two streams each (opened once and kept open through every phase, as a portico's are all
   day), ``--portico-rate`` faces a second per stream on a fixed schedule (a
   frame missed by more than a period is skipped, as a camera drops a stale frame): each
   portico's latency;
D. **porticos + gateway**: both at once: the gateway's throughput against A's, the porticos'
   latency against C's;
E. **porticos + flood** over K certificates, for each K of ``--flood-callers``: the flood
   offers ``--factor`` times A's capacity (StreamMatch messages, one stream per connection,
   at least one connection per certificate, as ``load.py --flood-stream`` sends them; with
   ``--unary-flood`` unary calls): the porticos' latency, and what the flood got.

The porticos run in a process of their own (as ``load.py``'s probe client does), so that
their latencies are not those of a saturated load generator; with ``--pin`` the server is on
CPU 0 and both client processes on CPU 1. Per phase the server's admission is sampled every
50 ms over the phase's own seconds (limit, active callers and organisations, the most
probes one caller and one organisation held; medians printed). The porticos' probes are also
timed at the server, per probe: its wait for a unit of the admission and its time in the
service (``load.WhereTimeGoes.watch_probes``); and the porticos' process times how late its
event loop wakes a 20 ms timer. What a portico's latency adds to the server's times is its
own client's, on the core that client shares with the flood's generator. Every answer later than
``--deadline-ms`` counts as LATE, and any other error than the service's shedding is
reported (and fails the run). Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks import load
from centinela.server import certs
from centinela.server.demo import LAV_SITE, MIRA_SITE

#: Who calls: the porticos are Miraflores' (its sites), the gateway, the operator and the
#: flood La Victoria's; each certificate has a common name of its own.
PORTICO_ORG, OTHER_ORG = "muni-miraflores", "muni-la-victoria"
GATEWAY = "bench-gateway-gamarra"
OPERATOR = "bench-operator-miraflores"


def portico_name(k: int) -> str:
    return f"bench-portico-{k + 1:02d}"


def flood_name(k: int) -> str:
    return f"bench-flood-{k + 1:02d}"


def issue_identity(data_dir: Path, name: str, org: str) -> None:
    """A municipal client certificate ``name`` (operator, control_center; Lima) under the
    data dir's development CA, unless it is there already."""
    certs_dir = data_dir / "certs"
    if (certs_dir / f"{name}.crt").exists():
        return
    ca = certs.TlsFiles(certs_dir / "ca.crt", certs_dir / "ca.key", certs_dir / "ca.crt")
    ident = certs.DevIdentity(name, org, "municipality", ("operator", "control_center"), "lima")
    certs.issue_client(ca, certs_dir, ident)


#: Answers to frames sent this long into a phase are also counted apart (``steady_*``): the
#: first seconds include the streams' opening, all at once.
SETTLED_S = 2.0


def summarize(runs: list[load.Run], settled: list[float]) -> dict[str, Any]:
    """Per-client runs as one row: pooled latency, the spread between clients, and the
    latency of the answers to frames sent past ``SETTLED_S`` (``settled``)."""
    pooled = load.Run(max(r.seconds for r in runs))
    for r in runs:
        pooled.offered += r.offered
        pooled.codes.update(r.codes)
        pooled.latencies.extend(r.latencies)
        for code, text in r.details.items():
            pooled.details.setdefault(code, text)
    row = pooled.row()
    p50s = [load.percentile(r.latencies, 0.5) for r in runs if r.latencies]
    p99s = [load.percentile(r.latencies, 0.99) for r in runs if r.latencies]
    answered = [r.codes["OK"] for r in runs]
    row.update(
        codes=dict(pooled.codes),
        clients=len(runs),
        client_p50_ms_median=round(1000 * load.percentile(p50s, 0.5), 2),
        client_p50_ms_worst=round(1000 * max(p50s, default=float("nan")), 2),
        client_p99_ms_worst=round(1000 * max(p99s, default=float("nan")), 2),
        client_answered_min=min(answered, default=0),
        client_answered_max=max(answered, default=0),
        clients_without_answer=sum(1 for n in answered if n == 0),
        steady_p50_ms=round(1000 * load.percentile(settled, 0.5), 2),
        steady_p99_ms=round(1000 * load.percentile(settled, 0.99), 2),
    )
    return row


def full_row(run: load.Run) -> dict[str, Any]:
    """``run.row()`` with every code's count."""
    return {**run.row(), "codes": dict(run.codes)}


# ---- the porticos (a subprocess) ----------------------------------------------------------


#: A portico frame not sent because the last answer came more than a period late.
SKIPPED = "SKIPPED_STALE_FRAME"
#: A stream gRPC core dropped unstarted (its waiting bound), opened again.
REOPENED = "STREAM_REOPENED"
load._EXPECTED.update((SKIPPED, REOPENED))


class Stream:
    """One StreamMatch stream, opened on first use and opened again when gRPC core dropped
    it unstarted (CANCELLED without the service's request id: the waiting bound refused the
    new call), after a jittered pause, as ``centinela.clients`` does, counted in ``run`` as
    REOPENED. Any other end of the stream ends the run."""

    def __init__(self, channel: Any, run: load.Run) -> None:
        self.channel = channel
        self.run = run
        self.call: Any = None
        #: Messages sent on this stream so far (the next one's sequence number follows).
        self.sent = 0

    async def ask(self, sequence: int, face: bytes) -> Any:
        """Send one face; its answer."""
        message = load.stream_message(sequence, face)
        while True:
            if self.call is None:
                self.call = load.open_stream(self.channel)
            try:
                await self.call.write(message)
                answer = await self.call.read()
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                answer = load.STREAM_END  # the call ended before the write, or the read
            if answer is not load.STREAM_END:
                if answer.sequence != sequence:
                    raise SystemExit(f"StreamMatch answered {answer.sequence} for {sequence}")
                return answer
            code = await self.call.code()
            trailers = await self.call.trailing_metadata() or ()
            if code == grpc.StatusCode.CANCELLED and not any(
                k == "x-request-id" for k, _v in trailers
            ):
                self.run.codes[REOPENED] += 1
                self.call = None
                await asyncio.sleep(random.uniform(0.05, 0.2))
                continue
            raise SystemExit(f"a StreamMatch stream ended: {code} {await self.call.details()}")

    async def close(self) -> None:
        if self.call is None:
            return
        await self.call.done_writing()
        while await self.call.read() is not load.STREAM_END:
            pass


async def paced_stream(
    stream: Stream,
    payloads: load.Payloads,
    rate: float,
    seconds: float,
    deadline: float,
    run: load.Run,
    offset: float,
    settled: list[float],
) -> None:
    """One portico stream: a face every ``1 / rate`` s from ``offset`` on, each when the last
    is answered; a frame missed by more than a period is skipped (counted offered, not
    sent: the camera moved on). The stream stays open after the phase, as a portico's does
    all day."""
    stream.run = run
    period = 1.0 / rate
    start = time.perf_counter() + offset
    stop = start + seconds
    k = 0
    while (due := start + k * period) < stop:
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > period:
            behind = int((now - due) / period)
            run.offered += behind
            run.codes[SKIPPED] += behind
            k += behind
            continue
        stream.sent += 1
        run.offered += 1
        t0 = time.perf_counter()
        answer = await stream.ask(stream.sent, payloads.get(stream.sent))
        took = time.perf_counter() - t0
        run.answered(answer, took, deadline)
        if t0 - start + offset >= SETTLED_S and not answer.HasField("error"):
            settled.append(took)
        k += 1


async def gateway_loop(
    channel: Any, payloads: load.Payloads, streams: int, seconds: float, deadline: float
) -> load.Run:
    """``streams`` StreamMatch streams on one connection, each sending its next face when
    the last is answered (``load.stream_closed_loop``, with :class:`Stream`'s reopening)."""
    run = load.Run(seconds)
    stop = time.perf_counter() + seconds
    counter = iter(range(1, 10**12))

    async def worker() -> None:
        stream = Stream(channel, run)
        while time.perf_counter() < stop:
            i = next(counter)
            run.offered += 1
            t0 = time.perf_counter()
            answer = await stream.ask(i, payloads.get(i))
            run.answered(answer, time.perf_counter() - t0, deadline)
        await stream.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    run.seconds = time.perf_counter() - t0
    return run


async def porticos(args: argparse.Namespace) -> None:
    """``--porticos-client``: ``args.porticos`` certificates, one connection each; says
    ``ready``, then runs a phase (two paced streams per portico) per line ``go SECONDS`` on
    stdin, printing one JSON row each, until stdin ends."""
    clients: list[tuple[Any, load.Payloads]] = []
    for k in range(args.porticos):
        (channel,), payloads = await load.connect(
            args.data_dir, args.port, 50, (portico_name(k), MIRA_SITE), connections=1
        )
        clients.append((channel, payloads))
    for channel, payloads in clients:  # warm: TLS session, the stream path
        await load.stream_closed_loop(channel, payloads, 1, 0.05, 30.0)
    # Two streams a portico, opened now and kept for every phase, as a portico keeps its
    # streams open all day: opened at a phase's start, 38 of them beside a flood's 19 met
    # gRPC core's waiting bound and waited in its arrival-order queue, and their first
    # answers came after the deadline (session 20).
    streams = [[Stream(channel, load.Run(0)) for _ in range(2)] for channel, _ in clients]
    for pair, (_channel, payloads) in zip(streams, clients, strict=True):
        for stream in pair:
            stream.sent += 1
            await stream.ask(stream.sent, payloads.get(stream.sent))
    print("ready", flush=True)
    rng = random.Random(7)
    period = 1.0 / args.portico_rate
    while line := await asyncio.to_thread(sys.stdin.readline):
        seconds = float(line.split()[1])
        runs = [load.Run(seconds) for _ in clients]
        settled: list[float] = []
        lags: list[float] = []
        lagging = asyncio.create_task(loop_lag(lags))
        await asyncio.gather(
            *(
                paced_stream(
                    stream,
                    payloads,
                    args.portico_rate,
                    seconds,
                    args.deadline_ms / 1000,
                    run,
                    rng.uniform(0, period),
                    settled,
                )
                for (_channel, payloads), run, pair in zip(clients, runs, streams, strict=True)
                for stream in pair
            )
        )
        lagging.cancel()
        row = summarize(runs, settled)
        row["loop_lag_ms_p50"] = round(1000 * load.percentile(lags, 0.5), 2)
        row["loop_lag_ms_p99"] = round(1000 * load.percentile(lags, 0.99), 2)
        print(json.dumps(row), flush=True)
    for pair in streams:
        for stream in pair:
            await stream.close()
    for channel, _ in clients:
        await channel.close()


async def loop_lag(lags: list[float], every: float = 0.02) -> None:
    """How late this process's event loop wakes a timer, every ``every`` s, in ``lags``: the
    share of a portico's latency that is its own client's, on a core it shares with the
    flood's generator."""
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(every)
        lags.append(time.perf_counter() - t0 - every)


class Porticos:
    """The ``--porticos-client`` subprocess."""

    def __init__(self, args: argparse.Namespace, data_dir: Path, port: int) -> None:
        self.argv = [
            sys.executable,
            "-m",
            "benchmarks.fairness",
            "--porticos-client",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--porticos",
            str(args.porticos),
            "--portico-rate",
            str(args.portico_rate),
            "--deadline-ms",
            str(args.deadline_ms),
        ]

    async def start(self) -> None:
        self.p = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=load.ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.p.stdout is not None
        if (await self.p.stdout.readline()).strip() != b"ready":
            raise SystemExit("the porticos' client failed to start")

    def go(self, seconds: float) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(f"go {seconds}\n".encode())

    async def result(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        row: dict[str, Any] = json.loads(await self.p.stdout.readline())
        return row

    async def close(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.close()
        await self.p.wait()


# ---- the phases ---------------------------------------------------------------------------


async def paced_unary(call: Any, payloads: load.Payloads, rate: float, seconds: float) -> load.Run:
    """``rate`` unary calls a second on a fixed schedule, one at a time."""
    run = load.Run(seconds)
    start = time.perf_counter()
    i = 0
    while (due := start + i / rate) < start + seconds:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        run.offered += 1
        await load._one(call, payloads.get(i), 1.0, run)
        i += 1
    return run


class Admission:
    """The server's admission samples of one phase (``/bench.Load/Timings``)."""

    def __init__(self, channel: Any) -> None:
        self.call = channel.unary_unary(load.TIMINGS)

    async def reset(self) -> None:
        await self.call(b"", timeout=30)

    async def read(self) -> dict[str, float]:
        doc = json.loads(await self.call(b"", timeout=30))
        samples = doc["admission"]
        names = load.ADMISSION_FIELDS
        out = {
            f"{name}_p50": load.percentile([float(s[k]) for s in samples], 0.5)
            for k, name in enumerate(names)
            if name != "probing"
        }
        out["probing_share"] = round(sum(s[3] for s in samples) / max(1, len(samples)), 3)
        # The porticos' probes as the server saw them: the wait for a unit, the time in the
        # service (what the client's latency adds to these is the network and its own loop).
        for key in ("probe_wait_ms", "probe_service_ms"):
            times = doc[key].get(PORTICO_ORG, [])
            out[f"porticos_{key}_p50"] = round(load.percentile(times, 0.5), 2)
            out[f"porticos_{key}_p99"] = round(load.percentile(times, 0.99), 2)
            out[f"porticos_{key}_mean"] = round(sum(times) / max(1, len(times)), 2)
        return out


async def measure(args: argparse.Namespace, data_dir: Path, port: int) -> dict[str, Any]:
    deadline = args.deadline_ms / 1000
    seconds = args.seconds
    gw_chans, gw_payloads = await load.connect(data_dir, port, 200, (GATEWAY, LAV_SITE))
    gateway = gw_chans[0]
    op_chans, op_payloads = await load.connect(data_dir, port, 50, (OPERATOR, MIRA_SITE))
    operator = op_chans[0].unary_unary(load.METHOD)
    admission = Admission(gw_chans[1])
    results: dict[str, Any] = {}

    async def phase(name: str, *work: Any) -> list[Any]:
        load.say(f"{name} ({seconds:g} s) …")
        await admission.reset()
        t0 = time.perf_counter()

        async def sampled() -> dict[str, float]:
            # The phase's own seconds: a flood's late answers drain for a minute after it,
            # with the flood alone.
            await asyncio.sleep(seconds)
            return await admission.read()

        sampling = asyncio.create_task(sampled())
        out = list(await asyncio.gather(*work))
        results[name] = {"admission": await sampling, "wall_s": time.perf_counter() - t0}
        return out

    def gateway_run() -> Any:
        return gateway_loop(gateway, gw_payloads, args.gateway_streams, seconds, deadline)

    await gateway_loop(gateway, gw_payloads, args.gateway_streams, args.warmup, 30.0)
    (alone,) = await phase("A gateway alone", gateway_run())
    results["A gateway alone"]["gateway"] = full_row(alone)
    capacity = alone.ok_per_s

    if "B" in args.phases:
        gw, op = await phase(
            "B gateway + operator", gateway_run(), paced_unary(operator, op_payloads, 1.0, seconds)
        )
        results["B gateway + operator"].update(gateway=full_row(gw), operator=full_row(op))

    pc = Porticos(args, data_dir, port)
    await pc.start()

    async def porticos_run() -> dict[str, Any]:
        pc.go(seconds)
        return await pc.result()

    if "C" in args.phases:
        (pr,) = await phase("C porticos alone", porticos_run())
        results["C porticos alone"]["porticos"] = pr

    if "D" in args.phases:
        pr, gw = await phase("D porticos + gateway", porticos_run(), gateway_run())
        results["D porticos + gateway"].update(porticos=pr, gateway=full_row(gw))

    for k in args.flood_callers if "E" in args.phases else ():
        for j in range(k):
            issue_identity(data_dir, flood_name(j), OTHER_ORG)
        chans: list[Any] = []
        per_cert = max(1, load.CHANNELS // k)
        payloads = None
        for j in range(k):
            these, payloads = await load.connect(
                data_dir, port, 200, (flood_name(j), LAV_SITE), connections=per_cert
            )
            chans += these
        assert payloads is not None
        calls = [ch.unary_unary(load.METHOD) for ch in chans]
        flood = load.open_loop(
            calls,
            payloads,
            args.factor * capacity,
            seconds,
            deadline,
            streams=None if args.unary_flood else load.StreamFlood(chans),
        )
        name = f"E porticos + flood over {k}"
        pr, fl = await phase(name, porticos_run(), flood)
        flood_row = full_row(fl)
        # What the server decided for the flood, late answers included, over the phase with
        # the drain of what was sent (the open loop's own seconds are its sending time).
        decided = fl.codes["OK"] + fl.codes[load.LATE]
        flood_row["decided_per_s"] = round(decided / results[name]["wall_s"], 1)
        results[name].update(porticos=pr, flood=flood_row, flood_connections=len(chans))
        for ch in chans:
            await ch.close()
    await pc.close()
    for ch in (*gw_chans, *op_chans):
        await ch.close()
    results["capacity_per_s"] = round(capacity, 1)
    return results


# ---- the report ---------------------------------------------------------------------------


def report(args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    base_gw = res["A gateway alone"]["gateway"]
    base_pc = res.get("C porticos alone", {}).get("porticos")
    print(
        f"\nfairness: {args.templates:,} listed, {args.porticos} porticos × 2 streams × "
        f"{args.portico_rate:g}/s, gateway {args.gateway_streams} streams, deadline "
        f"{args.deadline_ms:g} ms{', pinned' if args.pin else ''}; gain {args.gain:g}, "
        f"floor {args.floor}; capacity (A) {res['capacity_per_s']}/s"
    )
    head = (
        f"{'phase':<28} {'gw|flood /s':>11} {'× A':>6} {'portico p50':>11} {'× C':>6} "
        f"{'worst p50':>9} {'worst p99':>9} {'p99 >2s':>8} {'late':>5} {'skip':>5} "
        f"{'reopen':>6} {'callers':>7} {'orgs':>4} {'held':>4} {'org held':>8} {'limit':>5}"
    )
    print(head)
    print("-" * len(head))
    errors = 0
    for name, doc in res.items():
        if not isinstance(doc, dict):
            continue
        heavy = doc.get("gateway") or doc.get("flood")
        pcs = doc.get("porticos")
        adm = doc["admission"]
        cols = [f"{name:<28}"]
        if heavy:
            rate = heavy.get("decided_per_s", heavy["ok_per_s"])
            cols += [f"{rate:>11}", f"{rate / base_gw['ok_per_s']:>6.2f}"]
            errors += heavy["other_errors"]
        else:
            cols += [f"{'':>11}", f"{'':>6}"]
        if pcs:
            ratio = (
                pcs["client_p50_ms_median"] / base_pc["client_p50_ms_median"]
                if base_pc
                else float("nan")
            )
            cols += [
                f"{pcs['client_p50_ms_median']:>11}",
                f"{ratio:>6.2f}",
                f"{pcs['client_p50_ms_worst']:>9}",
                f"{pcs['client_p99_ms_worst']:>9}",
                f"{pcs['steady_p99_ms']:>8}",
                f"{pcs['codes'].get(load.LATE, 0):>5}",
                f"{pcs['codes'].get(SKIPPED, 0):>5}",
            ]
            errors += pcs["other_errors"]
        else:
            cols += [f"{'':>11}", f"{'':>6}", f"{'':>9}", f"{'':>9}", f"{'':>8}", f"{'':>5}"]
            cols.append(f"{'':>5}")
        reopened = (pcs or {}).get("codes", {}).get(REOPENED, 0)
        if heavy:
            reopened += heavy["codes"].get(REOPENED, 0)
        cols.append(f"{reopened:>6}")
        cols += [
            f"{adm['callers_p50']:>7g}",
            f"{adm['orgs_p50']:>4g}",
            f"{adm['most_held_p50']:>4g}",
            f"{adm['org_held_p50']:>8g}",
            f"{adm['limit_p50']:>5g}",
        ]
        print(" ".join(cols))
        if pcs and "porticos_probe_wait_ms_p50" in adm:
            print(
                f"{'':<28} porticos at the server: wait p50 / p99 "
                f"{adm['porticos_probe_wait_ms_p50']} / {adm['porticos_probe_wait_ms_p99']} ms, "
                f"in the service {adm['porticos_probe_service_ms_p50']} / "
                f"{adm['porticos_probe_service_ms_p99']} ms (means "
                f"{adm['porticos_probe_wait_ms_mean']} + {adm['porticos_probe_service_ms_mean']}"
                f"); their client's loop late p50 / p99 {pcs['loop_lag_ms_p50']} / "
                f"{pcs['loop_lag_ms_p99']} ms"
            )
        if "operator" in doc:
            op = doc["operator"]
            print(f"{'':<28} operator: p50 {op['p50_ms']} ms, p99 {op['p99_ms']} ms")
            errors += op["other_errors"]
    print(
        "gw|flood /s: answers the gateway got (A, B, D), or what the server decided for the "
        "flood, late answers included, over the phase and its drain (E); × A: against the "
        "gateway alone. portico p50: the median of the porticos' own p50 (ms); × C: against "
        "the porticos alone; worst: the worst portico's; p99 >2s: all porticos' p99 past the "
        "phase's first 2 s (the streams' opening); late: answers past the deadline; "
        "skip: frames skipped behind a late answer; reopen: streams gRPC core dropped unstarted "
        "(its waiting bound), opened again. callers, orgs, held, org held, limit: the "
        "admission's medians over the phase's own seconds (active callers and "
        "organisations, the most stream probes one caller and one organisation held, the "
        "adaptive limit). porticos at the server: their probes' wait for a unit of the "
        "admission and their time in the service, as the server timed them; their client's "
        "loop late: how late the porticos' process woke a 20 ms timer (its share of the "
        "client core it shares with the flood's generator)."
    )
    summary = {"results": res, "other_errors": errors, "load_average_1m": os.getloadavg()[0]}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute")
    parser.add_argument("--templates", type=int, default=0, help="listed people (quick 2,000)")
    parser.add_argument("--porticos", type=int, default=19, help="portico certificates (19)")
    parser.add_argument(
        "--portico-rate", type=float, default=2.0, help="faces per second per stream (2)"
    )
    parser.add_argument("--gateway-streams", type=int, default=8, help="the gateway's (8)")
    parser.add_argument(
        "--flood-callers",
        default="1,4,19",
        help="certificates the flood is spread over, one phase each (1,4,19)",
    )
    parser.add_argument("--unary-flood", action="store_true", help="a unary MatchFace flood")
    parser.add_argument(
        "--phases", default="ABCDE", help="which of the phases to run (A always: capacity)"
    )
    parser.add_argument("--factor", type=float, default=10.0, help="flood / capacity (10)")
    parser.add_argument("--deadline-ms", type=float, default=1000.0, help="per answer (1000)")
    parser.add_argument("--seconds", type=float, default=0.0, help="per phase (20; quick 4)")
    parser.add_argument("--gain", type=float, default=-1.0, help="admission_gain (default)")
    parser.add_argument("--floor", type=int, default=0, help="admission_floor (default)")
    parser.add_argument(
        "--max-streams", type=int, default=-1, help="max_streams_per_connection (default)"
    )
    parser.add_argument("--keep", type=Path, help="reuse/keep the data dir under this directory")
    parser.add_argument(
        "--pin",
        action="store_true",
        help=f"server on CPU {load.SERVER_CPU}, clients on CPU {load.CLIENT_CPU}",
    )
    parser.add_argument("--porticos-client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.porticos_client:
        asyncio.run(porticos(args))
        return 0
    in_flight, pending, streams, wait_ms, per_caller, gain, floor, lanes = load.default_limits()
    args.gain = gain if args.gain < 0 else args.gain
    args.floor = args.floor or floor
    args.max_streams = streams if args.max_streams < 0 else args.max_streams
    args.templates = args.templates or (2_000 if args.quick else 100_000)
    args.seconds = args.seconds or (4.0 if args.quick else 20.0)
    args.warmup = 1.0 if args.quick else 3.0
    args.flood_callers = [int(k) for k in args.flood_callers.split(",") if k]
    data_dir = load.bench_data_dir(args.keep, args.templates, "centinela-fairness-")
    load.say(f"starting the server ({args.templates:,} listed) …")
    load.pin_clients(args.pin)  # the porticos' process inherits it
    with load.serving(
        data_dir,
        args.templates,
        in_flight,
        pending,
        max_streams=args.max_streams,
        lanes=lanes,
        admission=(wait_ms, per_caller, args.gain, args.floor),
        pin=args.pin,
    ) as (_proc, port):
        for name in (GATEWAY, OPERATOR):
            issue_identity(data_dir, name, OTHER_ORG if name == GATEWAY else PORTICO_ORG)
        for k in range(args.porticos):
            issue_identity(data_dir, portico_name(k), PORTICO_ORG)
        res = asyncio.run(measure(args, data_dir, port))
    return load.finish(report(args, res))


if __name__ == "__main__":
    raise SystemExit(main())
