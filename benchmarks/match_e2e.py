"""End-to-end MatchFace over mutual TLS on loopback, against a bare echo RPC on the same server.

    python benchmarks/match_e2e.py [--quick] [--sizes 100000,1000000] [--seconds 10] [--rounds 3]

For each watchlist size a real server runs in a subprocess (policy, durable audit with group
commit, HNSW search, response shaping); this process drives it with grpc.aio at concurrency
1, 8 and 32, and in the same run drives ``/bench.Echo/Echo`` (the same request bytes
returned as they are) on the same server: the ceiling of Python gRPC on this machine, client
included. StreamMatch throughput is measured with as many streams as the unary concurrency,
each stream keeping up to ``STREAM_WINDOW`` probes unanswered (how a portico streams: it sends
as it captures); ``pingpong`` is the same streams sending one probe at a time.
The figures that hold on a noisy 2-core machine are the ratios: ``ratio_vs_echo`` and
``stream_gain``, and the CPU the server's event-loop thread spends per answered call
(``loop_ms_per_call``, read from ``/proc`` for the server's main thread, which runs the
loop; ``loop_cpu_vs_echo`` is its ratio to echo's). Throughput on a shared machine moves
with whatever else runs, up to 30 % between runs of the same code; CPU per call moves far
less, and ``loop_busy`` (the thread's CPU over the cell's time) says whether the loop was
the bottleneck: near 1.0, it was. ``audit_entries_per_call`` is what the cell added to the
server's audit log per answer: every worked call adds its decision's entry before it is
answered, so under 1.0 means answers were replayed from the idempotency store, and the run
warns. ``disk_kb_per_call`` is what the device under the data directory took per answered
call (``/proc/diskstats``: the audit entry, its companions, the WAL and its checkpoints;
echo's figure is the floor of the machine's own writes). Every cell
runs ``--rounds`` times (3; 1 with ``--quick``), round after round, and the table gives each
figure's median over the rounds (a p99 is each round's p99, then their median).
``ratio_vs_echo`` and ``stream_gain`` are paired: the ratio of two cells of the same round,
then the median of those, so a slow stretch that falls on one round moves both sides of its
ratio. Last line: one JSON object.

The CPU budget. Client and server share the machine's two cores, so a cell's throughput can
never exceed 2 cores over its CPU per answered call, client and server together
(``cpu ms/call``: every thread of the server, from ``/proc/PID/stat``, plus this process).
Echo uses the cores nearly fully (``cores`` near 2), so ``bound`` = echo's CPU per call over
MatchFace's is the ratio to echo that MatchFace could reach if it, too, used both cores fully:
with no waiting anywhere, no GIL, no serial step. ``ratio_vs_echo`` can only exceed
``bound`` by using the cores more fully than echo does; to raise ``bound``, the CPU per call
itself must fall. (``cpu_bound_ratio`` is paired per round, as the ratio is.)

Every MatchFace and StreamMatch probe is sent once, with its own client request id: a probe
sent twice would be answered from the idempotency store without matching. (Until session 3
the benchmark cycled 2,000 probes, so in 10-second rounds most calls above ~200/s were such
replays and the full-run figures were inflated; ``--quick`` rounds were short enough.) The
ids are the client library's (``new_request_id``, time first); ``--random-request-ids``
sends UUID4s instead, as another client may, which costs the server's disk more.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from centinela.clients.builders import new_request_id
from centinela.clients.calibrate_cli import matrix_batches, messages
from centinela.matcher import synth
from centinela.matcher.calibration import floor_for
from centinela.server import certs
from centinela.server.demo import MIRA_SITE, ts
from centinela.server.match_service import STREAM_WINDOW
from centinela.server.testing import AuditMeter, CpuMeter, DiskMeter, LoopMeter, spawn_serving
from centinela.v1 import common_pb2 as c
from centinela.v1 import match_service_pb2 as mpb
from centinela.v1 import match_service_pb2_grpc as mgrpc

ROOT = Path(__file__).resolve().parents[1]


def start_server(
    data_dir: Path, templates: int, floor: float = 0.0
) -> tuple[subprocess.Popen[bytes], int]:
    argv = [sys.executable, str(ROOT / "benchmarks" / "_bench_server.py"), "--data-dir"]
    argv += [str(data_dir), "--templates", str(templates), "--port-file", str(data_dir / "port")]
    argv += ["--watchlist-floor", str(floor)]
    return spawn_serving(
        argv, data_dir / "port", what="benchmark server", timeout_s=7200, stderr=sys.stderr
    )


def channel(data_dir: Path, port: int) -> Any:
    files = certs.client_files(data_dir / "certs", "muni-miraflores")
    cert, key, ca = files.read()
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


def admin_channel(data_dir: Path, port: int) -> grpc.Channel:
    """A blocking channel with the PNP administrator's certificate (calibration)."""
    cert, key, ca = certs.client_files(data_dir / "certs", "pnp-admin").read()
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def calibration_messages(
    model_id: str, vectors: np.ndarray, target: float = 0.0
) -> list[mpb.CalibrateGalleryRequest]:
    """A CalibrateGallery stream of ``vectors``, as ``centinela admin calibrate`` sends it."""
    batches = matrix_batches(vectors, model_id)
    return list(messages(c.GALLERY_PNP_WATCHLIST, target, "CAL-BENCH-01", batches))


def calibrated_floor(data_dir: Path, port: int, strangers: int = 5000) -> tuple[float, float]:
    """The watchlist floor for the bundle's target FPIR, measured with CalibrateGallery on
    strangers other than the benchmark's probes; and the packaged floor's FPIR."""
    with admin_channel(data_dir, port) as ch:
        stub = mgrpc.MatchServiceStub(ch)
        model_id = stub.GetServerInfo(mpb.GetServerInfoRequest(), timeout=60).galleries[0].model_id
        msgs = calibration_messages(model_id, synth.strangers(strangers, seed=777))
        answer = stub.CalibrateGallery(iter(msgs), timeout=3600)
    return floor_for(answer.threshold), answer.fpir_at_floor


def requests(
    model_id: str, identities: np.ndarray, n: int, request_id: Callable[[], str] = new_request_id
) -> list[mpb.MatchFaceRequest]:
    """A mix: one probe in ten is a genuine probe of a listed person (an alert)."""
    rng = np.random.default_rng(1)
    strangers = synth.strangers(n, seed=4242)
    out = []
    for i in range(n):
        if i % 10 == 0:
            vec = synth.genuine_probes(
                identities[rng.integers(0, len(identities))][None, :], seed=i
            )[0]
        else:
            vec = strangers[i]
        out.append(
            mpb.MatchFaceRequest(
                context=c.RequestContext(
                    purpose=c.PURPOSE_WANTED_PERSON,
                    site_id=MIRA_SITE,
                    capture_time=ts(dt.datetime.now(dt.UTC)),
                    client_request_id=request_id(),
                ),
                probe=c.FaceProbe(model_id=model_id, vector=vec.tolist(), quality=0.9),
            )
        )
    return out


async def drive(
    call: Any, payloads: list[Any], concurrency: int, seconds: float, *, wrap: bool = False
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` workers, each sending the next payload when answered.

    Without ``wrap`` each payload is sent once (a MatchFace payload sent again carries the
    same client request id and would be answered from the idempotency store, not worked):
    a round ends early if the payloads run out, and ``exhausted`` says so.
    """
    lat: list[float] = []
    errors = alerts = 0
    stop = time.perf_counter() + seconds
    counter = 0
    exhausted = False

    async def worker(wid: int) -> None:
        nonlocal errors, alerts, counter, exhausted
        i = wid
        while time.perf_counter() < stop:
            if not wrap and i >= len(payloads):
                exhausted = True
                break
            t0 = time.perf_counter()
            try:
                answer = await call(payloads[i % len(payloads)])
                lat.append(time.perf_counter() - t0)
                alerts += bool(getattr(answer, "alert", False))
            except grpc.RpcError:
                errors += 1
            i += concurrency
            counter += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {
        "per_s": len(lat) / elapsed,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else float("nan"),
        "p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else float("nan"),
        "errors": errors,
        "alert_rate": alerts / len(lat) if lat else 0.0,
        "n": len(lat),
        "exhausted": exhausted,
    }


async def drive_stream(
    stub: Any,
    payloads: list[mpb.MatchFaceRequest],
    streams: int,
    seconds: float,
    window: int = 1,
) -> dict[str, Any]:
    """``streams`` StreamMatch calls, each keeping up to ``window`` probes unanswered.

    ``window=1`` is ping-pong (send, wait for the answer, send the next); a portico sends
    probes as it captures them, which is a window larger than one.
    """
    done = errors = 0
    stop = time.perf_counter() + seconds

    async def one(sid: int) -> None:
        nonlocal done, errors
        call = stub.StreamMatch()
        room = asyncio.Semaphore(window)
        sent = 0

        async def write() -> None:
            nonlocal sent
            i = sid
            while time.perf_counter() < stop and i < len(payloads):  # each probe once
                await room.acquire()
                await call.write(
                    mpb.StreamMatchRequest(sequence=i, face=payloads[i % len(payloads)])
                )
                sent += 1
                i += streams
            await call.done_writing()

        async def read() -> None:
            nonlocal done, errors
            async for answer in call:
                if answer.WhichOneof("result") == "face":
                    done += 1
                else:  # an error answer is not a match: counted apart, as unary errors are
                    errors += 1
                room.release()

        await asyncio.gather(write(), read())

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s) for s in range(streams)))
    return {"per_s": done / (time.perf_counter() - t0), "n": done, "errors": errors}


async def metered(pid: int, data_dir: Path, run: Any) -> dict[str, Any]:
    """``await run`` (a cell returning ``per_s`` and ``n``), adding the CPU per answered call
    of the server's loop, of the whole server and of this process (the client), what the
    disk under ``data_dir`` took, and the audit entries the cell added, per answered call."""
    meter, disk = LoopMeter(pid), DiskMeter(data_dir)
    server, client = CpuMeter(pid), CpuMeter(os.getpid())
    audited = AuditMeter(data_dir / "centinela.db")
    out: dict[str, Any] = await run
    out["audit_entries_per_call"] = audited.read(out["n"])
    out["loop_ms_per_call"], out["loop_busy"] = meter.read(out["n"])
    out["server_ms_per_call"], out["server_cores"] = server.read(out["n"])
    out["client_ms_per_call"], out["client_cores"] = client.read(out["n"])
    out["disk_kb_per_call"] = disk.read(out["n"])
    return out


async def measure(
    data_dir: Path,
    port: int,
    seconds: float,
    conc: list[int],
    pid: int,
    rounds: int = 1,
    request_id: Callable[[], str] = new_request_id,
) -> dict[str, Any]:
    """Each cell ``rounds`` times, the rounds one after the other (every cell of a round
    before the next round), so a slow stretch of the machine falls on all cells of a round
    alike; ``out[cell]`` is the list of its rounds."""
    ch = channel(data_dir, port)
    stub: Any = mgrpc.MatchServiceStub(ch)
    info = await stub.GetServerInfo(mpb.GetServerInfoRequest())
    model_id = info.galleries[0].model_id
    size = info.galleries[0].size
    identities = synth.identities(min(size, 2000), seed=5)
    # Enough probes that none is sent twice in a round (a repeat would be an idempotent
    # replay, not a match): up to 5,000/s.
    payloads = requests(model_id, identities, max(2000, int(seconds * 5000)), request_id)
    raw = [p.SerializeToString() for p in payloads[:2000]]
    echo = ch.unary_unary("/bench.Echo/Echo")
    warm = [mpb.MatchFaceRequest() for _ in range(50)]
    for w, p in zip(warm, payloads, strict=False):
        w.CopyFrom(p)
        w.context.client_request_id = request_id()
    await drive(stub.MatchFace, warm, 4, 1.0)  # warm-up
    out: dict[str, Any] = {"size": size}

    def fresh() -> list[mpb.MatchFaceRequest]:
        # Fresh request ids for every cell, so idempotency never short-cuts the work.
        for p in payloads:
            p.context.client_request_id = request_id()
        return payloads

    # Each cell is made only when its turn comes, so that ``fresh()`` gives it ids no
    # earlier cell sent (made all at once, every cell would share the last ids and all
    # but the first would be answered from the idempotency store).
    cells: dict[str, Callable[[int], Awaitable[dict[str, Any]]]] = {
        "match": lambda c: metered(pid, data_dir, drive(stub.MatchFace, fresh(), c, seconds)),
        "echo": lambda c: metered(pid, data_dir, drive(echo, raw, c, seconds, wrap=True)),
        "pingpong": lambda c: drive_stream(stub, fresh(), c, seconds, window=1),
        "stream": lambda c: metered(
            pid, data_dir, drive_stream(stub, fresh(), c, seconds, window=STREAM_WINDOW)
        ),
    }
    for rnd in range(rounds):
        if rounds > 1:
            print(f"  {size:,} listed: round {rnd + 1} of {rounds}", file=sys.stderr)
        for k in conc:
            for name, cell in cells.items():  # one at a time, in this order
                out.setdefault(f"{name}_c{k}", []).append(await cell(k))
    await ch.close()
    return out


def median_cell(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A cell's rounds as one: the median of each figure, errors summed, ``exhausted`` if
    any round ran out of payloads."""
    cell: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, bool):
            cell[key] = any(r[key] for r in runs)
        elif key in ("errors", "n"):
            cell[key] = sum(r[key] for r in runs)
        else:
            cell[key] = statistics.median(r[key] for r in runs)
    return cell


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[float]:
    """``a``'s throughput over ``b``'s, round by round (each pair ran minutes apart at most)."""
    return [x["per_s"] / y["per_s"] if y["per_s"] else 0.0 for x, y in zip(a, b, strict=True)]


def cpu_ms(cell: dict[str, Any]) -> float:
    """A cell's CPU per answered call, server (every thread) and client together."""
    return float(cell["server_ms_per_call"] + cell["client_ms_per_call"])


def cpu_bounds(match: list[dict[str, Any]], echo: list[dict[str, Any]]) -> list[float]:
    """Echo's CPU per call over MatchFace's, round by round: the ratio to echo the two cores
    would allow if both cells used them equally fully (see the module's docstring)."""
    return [cpu_ms(e) / cpu_ms(m) for m, e in zip(match, echo, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="under a minute: 10k templates")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--rounds",
        type=int,
        help="run every cell this many times, round after round, and report medians "
        "(ratios and gains are paired within a round); default 3, 1 with --quick",
    )
    parser.add_argument(
        "--random-request-ids",
        action="store_true",
        help="send random (UUID4) client request ids, as a client other than Centinela's "
        "may, instead of the client library's time-ordered ones",
    )
    parser.add_argument("--keep", type=Path, help="reuse/keep data dirs under this directory")
    parser.add_argument(
        "--calibrated",
        action="store_true",
        help="first calibrate the watchlist floor for the bundle's target FPIR on 5,000 "
        "other strangers (CalibrateGallery), then measure at that floor",
    )
    args = parser.parse_args()
    sizes = [10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    seconds = 3.0 if args.quick else args.seconds
    rounds = args.rounds or (1 if args.quick else 3)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    request_id = (lambda: uuid.uuid4().hex) if args.random_request_ids else new_request_id
    conc = [1, 8, 32]
    results: dict[str, Any] = {}
    base = args.keep or Path(tempfile.mkdtemp(prefix="centinela-bench-"))
    for n in sizes:
        data_dir = base / f"e2e-{n}"
        data_dir.mkdir(parents=True, exist_ok=True)
        proc, port = start_server(data_dir, n)
        floor = 0.0
        if args.calibrated:
            try:
                floor, at_packaged = calibrated_floor(data_dir, port)
            finally:
                proc.terminate()
                proc.wait(60)
            print(
                f"  {n:,}: calibrated floor {floor:.3f} (FPIR at the packaged floor "
                f"{at_packaged:.3f})",
                file=sys.stderr,
            )
            proc, port = start_server(data_dir, n, floor)
        try:
            results[str(n)] = asyncio.run(
                measure(data_dir, port, seconds, conc, proc.pid, rounds, request_id)
            )
            results[str(n)]["floor"] = floor
        finally:
            proc.terminate()
            proc.wait(60)
    print(
        f"\nMatchFace over mTLS vs echo on the same server ({os.cpu_count()} cores, "
        f"{seconds:.0f}s per cell; medians of {rounds} round{'s' if rounds > 1 else ''}, "
        "ratio and gain paired within each round)"
    )
    print(
        f"{'size':>9} {'conc':>4} {'match/s':>9} {'echo/s':>9} {'ratio':>6} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'stream/s':>9} {'gain':>5} {'pingpong/s':>10} "
        f"{'loop ms/call':>12} {'echo':>5} {'busy':>5} {'stream':>6} {'disk KB/call':>12} "
        f"{'cpu ms/call':>11} {'echo':>5} {'bound':>5} {'cores':>5}"
    )
    summary: dict[str, Any] = {"per_size": {}}
    for size_key, r in results.items():
        per: dict[str, Any] = {}
        for k in conc:
            ratios = paired(r[f"match_c{k}"], r[f"echo_c{k}"])
            gains = paired(r[f"stream_c{k}"], r[f"match_c{k}"])
            bounds = cpu_bounds(r[f"match_c{k}"], r[f"echo_c{k}"])
            ratio, gain = statistics.median(ratios), statistics.median(gains)
            bound = statistics.median(bounds)
            m, e, s, pp = (
                median_cell(r[f"{name}_c{k}"]) for name in ("match", "echo", "stream", "pingpong")
            )
            print(
                f"{size_key:>9} {k:>4} {m['per_s']:>9.0f} {e['per_s']:>9.0f} {ratio:>6.2f} "
                f"{m['p50_ms']:>7.2f} {m['p99_ms']:>7.2f} {s['per_s']:>9.0f} {gain:>5.2f} "
                f"{pp['per_s']:>10.0f} {m['loop_ms_per_call']:>12.2f} "
                f"{e['loop_ms_per_call']:>5.2f} {m['loop_busy']:>5.2f} "
                f"{s['loop_ms_per_call']:>6.2f} {m['disk_kb_per_call']:>12.1f} "
                f"{cpu_ms(m):>11.2f} {cpu_ms(e):>5.2f} {bound:>5.2f} "
                f"{m['server_cores'] + m['client_cores']:>5.2f}"
            )
            per[str(k)] = {
                "match_face_per_s": round(m["per_s"], 1),
                "echo_per_s": round(e["per_s"], 1),
                "ratio_vs_echo": round(ratio, 3),
                "p50_ms": round(m["p50_ms"], 3),
                "p99_ms": round(m["p99_ms"], 3),
                "match_errors": m["errors"],
                "alert_rate": round(m["alert_rate"], 3),
                "payloads_ran_out": m["exhausted"],
                "stream_per_s": round(s["per_s"], 1),
                "stream_gain": round(gain, 3),
                "ratio_vs_echo_rounds": [round(x, 3) for x in ratios],
                "stream_gain_rounds": [round(x, 3) for x in gains],
                "pingpong_per_s": round(pp["per_s"], 1),
                "pingpong_gain": round(pp["per_s"] / m["per_s"] if m["per_s"] else 0.0, 3),
                "loop_ms_per_call": round(m["loop_ms_per_call"], 3),
                "echo_loop_ms_per_call": round(e["loop_ms_per_call"], 3),
                "loop_cpu_vs_echo": round(m["loop_ms_per_call"] / e["loop_ms_per_call"], 2),
                "loop_busy": round(m["loop_busy"], 3),
                "stream_loop_ms_per_probe": round(s["loop_ms_per_call"], 3),
                "stream_cpu_ms_per_probe": round(cpu_ms(s), 3),
                # The stream gain the CPU alone allows (as ``cpu_bound_ratio`` for echo).
                "stream_gain_cpu_bound": round(cpu_ms(m) / cpu_ms(s), 3),
                "disk_kb_per_call": round(m["disk_kb_per_call"], 1),
                "audit_entries_per_call": round(m["audit_entries_per_call"], 3),
                "stream_audit_entries_per_probe": round(s["audit_entries_per_call"], 3),
                "stream_disk_kb_per_probe": round(s["disk_kb_per_call"], 1),
                "echo_disk_kb_per_call": round(e["disk_kb_per_call"], 2),
                "server_ms_per_call": round(m["server_ms_per_call"], 3),
                "client_ms_per_call": round(m["client_ms_per_call"], 3),
                "echo_server_ms_per_call": round(e["server_ms_per_call"], 3),
                "echo_client_ms_per_call": round(e["client_ms_per_call"], 3),
                "cpu_bound_ratio": round(bound, 3),
                "cpu_bound_ratio_rounds": [round(x, 3) for x in bounds],
                "cores_used": round(m["server_cores"] + m["client_cores"], 2),
                "echo_cores_used": round(e["server_cores"] + e["client_cores"], 2),
                "errors": m["errors"],
                "stream_errors": s["errors"] + pp["errors"],
            }
        summary["per_size"][size_key] = per
        if rounds > 1:
            for k in conc:
                cell = per[str(k)]
                print(
                    f"{'':>9} {k:>4}   by round: ratio "
                    + " ".join(f"{x:.2f}" for x in cell["ratio_vs_echo_rounds"])
                    + ", stream gain "
                    + " ".join(f"{x:.2f}" for x in cell["stream_gain_rounds"])
                )
    first = str(sizes[0])
    best = max(conc, key=lambda k: summary["per_size"][first][str(k)]["match_face_per_s"])
    head = summary["per_size"][first][str(best)]
    summary.update(
        {
            "size": sizes[0],
            "concurrency": best,
            "match_face_per_s": head["match_face_per_s"],
            "echo_per_s": head["echo_per_s"],
            "ratio_vs_echo": head["ratio_vs_echo"],
            "p99_ms": {k: summary["per_size"][first][str(k)]["p99_ms"] for k in map(str, conc)},
            "stream_gain": summary["per_size"][first]["32"]["stream_gain"],
            "rounds": rounds,
            "median_ratio_vs_echo": statistics.median(
                v["ratio_vs_echo"] for v in summary["per_size"][first].values()
            ),
        }
    )
    # 0.0: the packaged floor; else the floor --calibrated measured for the bundle's target.
    summary["watchlist_floor"] = {k: r["floor"] for k, r in results.items()}
    summary["request_ids"] = "random" if args.random_request_ids else "time-ordered"
    for size_key, per in summary["per_size"].items():
        failed = sum(v["errors"] + v["stream_errors"] for v in per.values())
        if failed:
            print(
                f"WARNING: at {size_key} templates {failed} calls or stream probes were "
                "answered with an error (not counted as answers)",
                file=sys.stderr,
            )
        # A worked MatchFace or probe adds its decision's entry before it is answered: fewer
        # entries than answers means answers came from the idempotency store (ids reused).
        unworked = [
            f"c = {k}"
            for k, v in per.items()
            if min(v["audit_entries_per_call"], v["stream_audit_entries_per_probe"]) < 0.99
        ]
        if unworked:
            print(
                f"WARNING: at {size_key} templates some answers added no audit entry "
                f"({', '.join(unworked)}): they were replayed, not worked; the figures are "
                "inflated",
                file=sys.stderr,
            )
        rates = [v["alert_rate"] for v in per.values()]
        if min(rates) < 0.05:  # one probe in ten is a listed person's
            print(
                f"WARNING: at {size_key} templates only {min(rates):.1%} of MatchFace answers "
                "were alerts, against ~10% genuine probes: hits are being lost",
                file=sys.stderr,
            )
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
