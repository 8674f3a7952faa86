"""Overload: MatchFace driven at 10x its measured capacity, with per-call deadlines.

    python benchmarks/load.py [--quick] [--templates N] [--factor 10] [--deadline-ms 1000]
                              [--max-in-flight N] [--max-pending N] [--max-streams N]
                              [--lanes N] [--pin] [--flood-stream] [--probe-stream]
                              [--balancer-cap N]

A real server runs in a subprocess (the real MatchService on a synthetic watchlist, as
``_bench_server.py`` builds it, R14 ceilings lifted) with the admission bounds given
(``max_concurrent_rpcs``, ``max_pending_rpcs``, ``max_streams_per_connection`` and
``intake_lanes``, default the server's defaults; see
``centinela.server.admission``). This process then

1. measures capacity with a closed loop (concurrency 4, 8, 16, 32; quick: 8, 32): capacity is
   the best throughput; the 1x concurrency is the lowest reaching 95 % of it (or
   ``--base-concurrency``: that choice moves between runs, and the 1x figures with it);
2. runs the closed loop at the 1x concurrency again: the 1x latency;
3. offers ``--factor`` x capacity in an open loop (calls sent on a fixed schedule whatever
   the answers, each with the deadline ``--deadline-ms``) and counts what happens to them:
   answered (OK), shed by the service (RESOURCE_EXHAUSTED), dropped unstarted by gRPC
   (CANCELLED without the service's request id: the waiting queue was full), expired
   (DEADLINE_EXCEEDED), anything else (must be 0);
4. runs the closed loop again (recovery), and samples the server's RSS before, during (max,
   per window) and after the overload, with the growth per answered call at 1x and at 10x
   (equal rates mean the overload itself holds no memory: what grows is per decision).

During 2 and 3 a separate light client process (closed loop, concurrency 2, the same
deadline) measures what a well-behaved client sees: the load generator's own latencies
include its own saturation. The probe stamps each call with its send time (``x-load-sent``,
CLOCK_MONOTONIC, which every process on one machine shares), and an interceptor in front of
the server's own records, for those calls, when the first Python code saw the call and when
the service had answered it: the probe's latency splits into the wait **before the service**
(its client, TLS, HTTP/2, gRPC core's queue and the event loop's intake of the call, one call
per registered method at a time) and the time **in the service** (identity, admission,
policy, search, audit), printed per phase. Requests are pre-built bytes with a fresh
``client_request_id`` each (the idempotency store never short-cuts the work); one probe in
ten is a listed person's (an alert). Clients and server share the machine: the offered rate
achieved is what the table shows. Prints a table; the last line is one JSON object.

The flood and the well-behaved client each come in two shapes. By default both send unary
MatchFace calls: every call is a new HTTP/2 stream that gRPC core queues, in arrival order,
until the server's event loop takes it in. ``--probe-stream`` makes the well-behaved client
a portico: two StreamMatch streams opened once, each probe a message on its open stream,
which that queue never holds (its answer is late past the deadline; the split before/in
the service is measured for unary calls only). ``--flood-stream`` sends the flood as
StreamMatch messages, one stream per connection, written as fast as each stream takes them
(the server reads a stream only while it has a unit for its next probe); a message still
unwritten a deadline after its turn is dropped in the client, as a camera drops a stale
frame, and counted DEADLINE_EXCEEDED; an answer that comes after its deadline is counted
``late`` (the server decided it). The server's admission limit, units in flight and
work waiting are sampled every 50 ms and their medians printed per phase.

``--balancer-cap N`` sends the overload through HAProxy in TCP mode (mTLS passes through)
admitting N connections at once per source address, the per-source cap that
``deploy/README.md`` advises against a unary flood, and runs the probe client in a network
namespace of its own so that it has its own address (``benchmarks/_balancer.py``; needs
root, haproxy and iproute2). The flood keeps its four connections; those past the cap are
closed by the balancer, and calls on them fail UNAVAILABLE without reaching the server.
Capacity and the 1x closed loop still go straight to the server; the probe client goes
through the balancer in both phases.

``LOAD_LOG=info`` in the environment makes the server log at that level to stderr (its call
log among the rest; ``warning`` by default).

``--pin`` puts the server on CPU 0 and this process and the probe client on CPU 1 (needs two
CPUs): the load generator then cannot take the server's CPU, which on two shared cores made
the 10x figures a measure of the generator as much as of the server. Capacity is then one
core's, and 10x is offered against it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks import _balancer
from centinela.matcher import synth
from centinela.server import certs
from centinela.server.demo import LAV_SITE, MIRA_SITE, ts
from centinela.server.testing import LoopMeter, spawn_serving
from centinela.v1 import common_pb2 as c
from centinela.v1 import match_service_pb2 as mpb

ROOT = Path(__file__).resolve().parents[1]
METHOD = "/centinela.v1.MatchService/MatchFace"
STREAM_METHOD = "/centinela.v1.MatchService/StreamMatch"
#: gRPC status code numbers to their names (a StreamMatch answer's error carries the number).
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
#: What ``read()`` returns at a stream's end (grpc.aio.EOF; not in grpcio's type stubs).
STREAM_END: Any = grpc.aio.EOF  # type: ignore[attr-defined]
INFO = "/centinela.v1.MatchService/GetServerInfo"
PLACEHOLDER = b"0" * 32
CHANNELS = 4
#: The load generator's certificate and site, and the probe client's: another municipality,
#: so the server's per-caller queues (``centinela.server.admission``) tell them apart.
FLOOD = ("muni-miraflores", MIRA_SITE)
PROBE = ("muni-la-victoria", LAV_SITE)


# ---- the server (a subprocess of this script) ---------------------------------------------


async def serve(args: argparse.Namespace) -> None:
    """``--serve``: the benchmark server with the admission limit given."""
    import signal

    from benchmarks._bench_server import bench_bundle, echo_handler, populate
    from centinela import logs
    from centinela.config import Settings
    from centinela.server.app import CentinelaServer, freeze_startup_heap
    from centinela.server.wiring import build_application

    logs.configure(os.environ.get("LOAD_LOG", "warning"))
    settings = Settings(
        data_dir=args.data_dir,
        listen="127.0.0.1:0",
        max_concurrent_rpcs=args.max_in_flight,
        max_pending_rpcs=args.max_pending,
        max_streams_per_connection=args.max_streams,
        intake_lanes=args.lanes,
        admission_max_wait_ms=args.max_wait_ms,
        admission_queue_per_caller=args.queue_per_caller,
        admission_gain=args.gain,
        admission_floor=args.floor,
        policy_bundle=str(bench_bundle(args.data_dir)),
        shutdown_grace_s=2.0,
    )
    app = await build_application(settings)
    await asyncio.to_thread(populate, app, args.templates)
    timing = WhereTimeGoes()
    server = CentinelaServer(
        settings,
        app.servicers,
        on_stop=app.close,
        extra_handlers=[echo_handler(), timing.handler()],
        extra_interceptors=[timing],
    )
    port = await server.start()
    timing.watch_probes(server.interceptor.admission)
    sampler = asyncio.create_task(timing.sample(server.interceptor.admission))
    freeze_startup_heap()  # as `centinela serve` does
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop(2.0)))
    args.port_file.write_text(str(port))
    await server.wait()
    sampler.cancel()


#: What each admission sample holds: the limit, units in flight, work waiting, remeasuring
#: (0 or 1), the most probes one caller holds, a caller's share, active callers, active
#: organisations, the most probes one organisation holds, an organisation's share.
ADMISSION_FIELDS = (
    "limit",
    "in_flight",
    "waiting",
    "probing",
    "most_held",
    "share",
    "callers",
    "orgs",
    "org_held",
    "org_share",
)

#: The probe's send time (``time.monotonic()``) on each of its calls.
SENT_KEY = "x-load-sent"
TIMINGS = "/bench.Load/Timings"


class WhereTimeGoes(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """For calls that carry ``x-load-sent``: the wait before the service (from that send
    time to this interceptor, the first Python code gRPC runs for a call) and the time in the
    service (from here to the answer), in ms. ``/bench.Load/Timings`` returns them as JSON
    and starts afresh."""

    def __init__(self) -> None:
        self.before_ms: list[float] = []
        self.service_ms: list[float] = []
        #: The server's admission every 50 ms (``ADMISSION_FIELDS``).
        self.admission_samples: list[tuple[int, ...]] = []
        #: Per organisation, each stream probe's wait for its unit and its time in the
        #: service, in ms (:meth:`watch_probes`).
        self.probe_wait_ms: dict[str, list[float]] = {}
        self.probe_service_ms: dict[str, list[float]] = {}

    def watch_probes(self, admission: Any) -> None:
        """Time every stream probe at the admission, per organisation: the wait in
        ``acquire`` and the time in the service ``leave`` is given. Instruments this
        benchmark's server only (a coroutine wrapper per probe: a few microseconds)."""
        acquire, leave = admission.acquire, admission.leave
        org_of: dict[str, str] = {}

        async def timed_acquire(caller: str = "", **kw: Any) -> None:
            t0 = time.perf_counter()
            await acquire(caller, **kw)
            if kw.get("stream"):
                org = org_of[caller] = kw.get("org") or caller
                self.probe_wait_ms.setdefault(org, []).append(1000 * (time.perf_counter() - t0))

        def timed_leave(elapsed_s: float | None = None, **kw: Any) -> None:
            if kw.get("stream") and elapsed_s is not None:
                org = org_of.get(kw.get("caller", ""), "")
                self.probe_service_ms.setdefault(org, []).append(1000 * elapsed_s)
            leave(elapsed_s, **kw)

        admission.acquire, admission.leave = timed_acquire, timed_leave

    async def sample(self, admission: Any) -> None:
        while True:
            self.admission_samples.append(
                (
                    admission.limit,
                    admission.count,
                    admission.waiting,
                    int(admission.probing),
                    admission.most_held,
                    admission.share(),
                    admission.active,
                    admission.orgs,
                    admission.most_held_by_org,
                    admission.org_share(),
                )
            )
            await asyncio.sleep(0.05)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        entered = time.monotonic()
        sent = dict(details.invocation_metadata or ()).get(SENT_KEY)
        handler = await continuation(details)
        if sent is None or handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def timed(request: Any, context: Any) -> Any:
            try:
                return await inner(request, context)
            finally:
                self.before_ms.append(1000 * (entered - float(sent)))
                self.service_ms.append(1000 * (time.monotonic() - entered))

        return grpc.unary_unary_rpc_method_handler(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def handler(self) -> Any:
        async def timings(request: bytes, context: Any) -> bytes:
            doc = {
                "before_ms": self.before_ms,
                "service_ms": self.service_ms,
                "admission": self.admission_samples,
                "probe_wait_ms": self.probe_wait_ms,
                "probe_service_ms": self.probe_service_ms,
            }
            self.before_ms, self.service_ms, self.admission_samples = [], [], []
            self.probe_wait_ms, self.probe_service_ms = {}, {}
            return json.dumps(doc).encode()

        return grpc.method_handlers_generic_handler(
            "bench.Load", {"Timings": grpc.unary_unary_rpc_method_handler(timings)}
        )


SERVER_CPU, CLIENT_CPU = 0, 1


def pin_this_process(cpu: int) -> None:
    """Move every thread of this process (numpy's and gRPC's included) to ``cpu``."""
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), {cpu})


def start_server(
    data_dir: Path,
    templates: int,
    max_in_flight: int,
    max_pending: int,
    *,
    max_streams: int = 0,
    lanes: int = 1,
    admission: tuple[float, int, float, int] = (-1.0, 0, -1.0, 0),
    pin: bool = False,
) -> tuple[subprocess.Popen[bytes], int]:
    max_wait_ms, queue_per_caller, gain, floor = admission
    port_file = data_dir / "port"
    return spawn_serving(
        [
            sys.executable,
            "-m",
            "benchmarks.load",
            "--serve",
            "--data-dir",
            str(data_dir),
            "--templates",
            str(templates),
            "--max-in-flight",
            str(max_in_flight),
            "--max-pending",
            str(max_pending),
            "--max-streams",
            str(max_streams),
            "--lanes",
            str(lanes),
            "--max-wait-ms",
            str(max_wait_ms),
            "--queue-per-caller",
            str(queue_per_caller),
            "--gain",
            str(gain),
            "--floor",
            str(floor),
            "--port-file",
            str(port_file),
        ],
        port_file,
        cwd=ROOT,
        stderr=sys.stderr,
        # In the child before exec: every thread the server ever starts inherits it.
        preexec_fn=(lambda: os.sched_setaffinity(0, {SERVER_CPU})) if pin else None,
        what="load server",
        timeout_s=7200,
    )


def bench_data_dir(keep: Path | None, templates: int, prefix: str) -> Path:
    """The bench server's data dir: under ``keep`` (kept, and reused by the next run with as
    many templates), else under a new temporary directory named ``prefix``…."""
    base = keep or Path(tempfile.mkdtemp(prefix=prefix))
    data_dir = base / f"load-{templates}"
    data_dir.mkdir(parents=True, exist_ok=True)
    return data_dir


def pin_clients(pin: bool) -> None:
    """With ``pin``, move this process (and the client processes it starts later) to
    ``CLIENT_CPU``; the server goes to ``SERVER_CPU`` (:func:`start_server`).

    Raises:
        SystemExit: fewer than two CPUs.
    """
    if not pin:
        return
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("--pin needs two CPUs")
    pin_this_process(CLIENT_CPU)


@contextlib.contextmanager
def serving(
    data_dir: Path, templates: int, max_in_flight: int, max_pending: int, **options: Any
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """:func:`start_server` (``options`` are its keywords), stopped on the way out."""
    proc, port = start_server(data_dir, templates, max_in_flight, max_pending, **options)
    try:
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(60)


def finish(summary: dict[str, Any]) -> int:
    """Print ``summary`` as the run's last line (one JSON object); the exit status: 1 if
    anything but the service's shedding went wrong."""
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["other_errors"] == 0 else 1


def rss_mb(pid: int) -> float:
    """Resident set size of a process, MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- requests -----------------------------------------------------------------------------


class Payloads:
    """MatchFace request bytes; each call gets a fresh client request id spliced in."""

    def __init__(self, model_id: str, listed: int, n: int = 200, site: str = FLOOD[1]) -> None:
        identities = synth.identities(min(listed, 2000), seed=5)
        strangers = synth.strangers(n, seed=4242)
        rng = np.random.default_rng(1)
        self.templates: list[tuple[bytes, int]] = []
        for i in range(n):
            if i % 10 == 0:
                pick = identities[rng.integers(0, len(identities))][None, :]
                vec = synth.genuine_probes(pick, seed=i)[0]
            else:
                vec = strangers[i]
            raw = mpb.MatchFaceRequest(
                context=c.RequestContext(
                    purpose=c.PURPOSE_WANTED_PERSON,
                    site_id=site,
                    capture_time=ts(dt.datetime.now(dt.UTC)),
                    client_request_id=PLACEHOLDER.decode(),
                ),
                probe=c.FaceProbe(model_id=model_id, vector=vec.tolist(), quality=0.9),
            ).SerializeToString()
            at = raw.find(PLACEHOLDER)
            assert at >= 0
            assert raw.find(PLACEHOLDER, at + 1) < 0
            self.templates.append((raw, at))

    def get(self, i: int) -> bytes:
        raw, at = self.templates[i % len(self.templates)]
        return raw[:at] + uuid.uuid4().hex.encode() + raw[at + 32 :]


# ---- driving ------------------------------------------------------------------------------


def channels(
    data_dir: Path,
    port: int,
    identity: str = FLOOD[0],
    host: str = "127.0.0.1",
    connections: int = CHANNELS,
) -> list[Any]:
    files = certs.client_files(data_dir / "certs", identity)
    cert, key, ca = files.read()
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    # A local subchannel pool each: that many connections, not one shared.
    options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
    if host != "127.0.0.1":  # through the balancer's namespace: the certificate names loopback
        options.append(("grpc.ssl_target_name_override", "127.0.0.1"))
    return [
        grpc.aio.secure_channel(f"{host}:{port}", creds, options=options)
        for _ in range(connections)
    ]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@dataclasses.dataclass
class Run:
    """What one phase did."""

    seconds: float
    offered: int = 0
    codes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    latencies: list[float] = dataclasses.field(default_factory=list)
    #: The first error message seen per unexpected code (what went wrong, for the report).
    details: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok_per_s(self) -> float:
        return self.codes["OK"] / self.seconds

    def answered(self, answer: mpb.StreamMatchResponse, took: float, deadline: float) -> None:
        """Count a StreamMatch answer that took ``took`` seconds: by its error's code, as
        LATE past ``deadline``, else OK."""
        if answer.HasField("error"):
            code = _CODE_NAMES[answer.error.code]
            self.details.setdefault(code, answer.error.message[:200])
            self.codes[code] += 1
        elif took > deadline:
            self.codes[LATE] += 1
        else:
            self.latencies.append(took)
            self.codes["OK"] += 1

    def row(self) -> dict[str, Any]:
        other = sum(n for k, n in self.codes.items() if k not in _EXPECTED)
        return {
            "offered_per_s": round(self.offered / self.seconds, 1),
            "ok_per_s": round(self.ok_per_s, 1),
            "resource_exhausted_per_s": round(self.codes["RESOURCE_EXHAUSTED"] / self.seconds, 1),
            "deadline_exceeded_per_s": round(self.codes["DEADLINE_EXCEEDED"] / self.seconds, 1),
            "backlog_dropped_per_s": round(self.codes[DROPPED] / self.seconds, 1),
            "refused_stream_per_s": round(self.codes[REFUSED] / self.seconds, 1),
            "balancer_refused_per_s": round(self.codes[BALANCED] / self.seconds, 1),
            "late_per_s": round(self.codes[LATE] / self.seconds, 1),
            "ok_share": round(self.codes["OK"] / self.offered, 4) if self.offered else 0.0,
            "other_errors": other,
            "other_codes": {k: n for k, n in self.codes.items() if k not in _EXPECTED},
            "other_details": self.details,
            "p50_ms": round(1000 * percentile(self.latencies, 0.50), 2),
            "p99_ms": round(1000 * percentile(self.latencies, 0.99), 2),
        }


#: A call gRPC core refused unstarted (the waiting queue was full): CANCELLED, no request id.
DROPPED = "CANCELLED_BY_BACKLOG"
#: A stream the server reset unstarted, past its connection's stream bound (HTTP/2
#: REFUSED_STREAM, error code 7; the client sees UNAVAILABLE). Opened in the moment after the
#: client cancelled one the server had not yet closed.
REFUSED = "REFUSED_STREAM"
#: A StreamMatch answer that came after its deadline: decided (and audited), too late for
#: the camera. A stream has no per-message deadline the server could see.
LATE = "ANSWERED_LATE"
#: With ``--balancer-cap``: a call on a connection the balancer closed (past its cap per
#: source address); the client sees UNAVAILABLE, the server saw nothing.
BALANCED = "REFUSED_BY_BALANCER"
_EXPECTED = {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", DROPPED, REFUSED, LATE, BALANCED}
#: Whether a plain UNAVAILABLE is the balancer's refusal (set by ``main``).
_balanced = False


async def _one(
    call: Any, payload: bytes, deadline: float | None, run: Run, stamp: bool = False
) -> None:
    t0 = time.perf_counter()
    try:
        sent = ((SENT_KEY, repr(time.monotonic())),) if stamp else None
        await call(payload, timeout=deadline, metadata=sent)
    except grpc.aio.AioRpcError as err:
        code = err.code().name
        trailers: Any = err.trailing_metadata() or ()
        if code == "CANCELLED" and not any(m[0] == "x-request-id" for m in trailers):
            code = DROPPED  # refused by gRPC before it reached the service
        elif code == "UNAVAILABLE" and "error code 7" in str(err.details()):
            code = REFUSED
        elif code == "UNAVAILABLE" and _balanced:
            code = BALANCED
        if code not in _EXPECTED:
            run.details.setdefault(code, str(err.details())[:200])
        run.codes[code] += 1
        return
    run.latencies.append(time.perf_counter() - t0)
    run.codes["OK"] += 1


async def closed_loop(
    calls: list[Any],
    payloads: Payloads,
    conc: int,
    seconds: float,
    deadline: float = 30.0,
    stamp: bool = False,
) -> Run:
    """``conc`` clients, each sending its next call when the last one is answered."""
    run = Run(seconds)
    stop = time.perf_counter() + seconds
    counter = iter(range(10**12))

    async def worker() -> None:
        while time.perf_counter() < stop:
            i = next(counter)
            run.offered += 1
            await _one(calls[i % len(calls)], payloads.get(i), deadline, run, stamp)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    run.seconds = time.perf_counter() - t0
    return run


async def open_loop(
    calls: list[Any],
    payloads: Payloads,
    rate: float,
    seconds: float,
    deadline: float,
    on_tick: Any = None,
    streams: StreamFlood | None = None,
) -> Run:
    """Send ``rate`` calls a second on a fixed schedule for ``seconds``, whatever happens to
    them; ``run.seconds`` is the sending time (so offered/s is the achieved sending rate).
    With ``streams``, each is a StreamMatch message instead of a unary call."""
    run = Run(seconds)
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    start = loop.time()
    total = int(rate * seconds)
    next_tick = start
    if streams is not None:
        streams.start(run, deadline)
    for i in range(total):
        delay = start + i / rate - loop.time()
        await asyncio.sleep(max(0.0, delay))
        if streams is not None:
            streams.send(i, payloads.get(i))
        else:
            task = asyncio.create_task(_one(calls[i % len(calls)], payloads.get(i), deadline, run))
            pending.add(task)
            task.add_done_callback(pending.discard)
        run.offered += 1
        if on_tick is not None and loop.time() >= next_tick:
            on_tick()
            next_tick = loop.time() + 0.25
    run.seconds = loop.time() - start
    if streams is not None:
        finishing = asyncio.create_task(streams.finish())
        pending.add(finishing)
        finishing.add_done_callback(pending.discard)
    while pending:
        if on_tick is not None:
            on_tick()
        await asyncio.sleep(0.25)
    if streams is not None:
        finishing.result()  # a stream's own failure ends the run
    return run


def open_stream(channel: Any) -> Any:
    """A StreamMatch call on ``channel``; it writes bytes (:func:`stream_message`)."""
    return channel.stream_stream(
        STREAM_METHOD, response_deserializer=mpb.StreamMatchResponse.FromString
    )()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def stream_message(sequence: int, face: bytes) -> bytes:
    """A StreamMatchRequest's bytes (``sequence``, field 1; ``face``, field 2) around a
    MatchFaceRequest's bytes, without parsing and re-serialising them: the load generator
    writes thousands a second on a core it shares with the probe client."""
    return b"\x08" + _varint(sequence) + b"\x12" + _varint(len(face)) + face


class StreamFlood:
    """The flood as StreamMatch messages: one stream per connection, each message written
    when its turn comes, as fast as the stream takes them (the server reads a stream only
    while it has a unit for its next probe: HTTP/2 flow control holds the writer back).
    A message still unwritten ``deadline`` after its scheduled time is dropped in the client
    (a camera's stale frame) and counted DEADLINE_EXCEEDED; answers count as
    :meth:`Run.answered` says."""

    def __init__(self, channels: list[Any]) -> None:
        self.channels = channels
        self._queues: list[asyncio.Queue[tuple[int, float, bytes] | None]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, run: Run, deadline: float) -> None:
        for channel in self.channels:
            outbox: asyncio.Queue[tuple[int, float, bytes] | None] = asyncio.Queue()
            self._queues.append(outbox)
            self._tasks.append(asyncio.create_task(self._stream(channel, outbox, run, deadline)))

    def send(self, i: int, payload: bytes) -> None:
        self._queues[i % len(self._queues)].put_nowait((i, time.perf_counter(), payload))

    async def finish(self) -> None:
        for outbox in self._queues:
            outbox.put_nowait(None)
        await asyncio.gather(*self._tasks)

    @staticmethod
    async def _stream(
        channel: Any,
        outbox: asyncio.Queue[tuple[int, float, bytes] | None],
        run: Run,
        deadline: float,
    ) -> None:
        call = open_stream(channel)
        sent: dict[int, float] = {}

        async def write() -> None:
            while (item := await outbox.get()) is not None:
                i, scheduled, payload = item
                if time.perf_counter() - scheduled > deadline:
                    run.codes["DEADLINE_EXCEEDED"] += 1  # stale before it could be sent
                    continue
                sent[i] = scheduled
                await call.write(stream_message(i, payload))
            await call.done_writing()

        async def read() -> None:
            while (answer := await call.read()) is not STREAM_END:
                run.answered(answer, time.perf_counter() - sent.pop(answer.sequence), deadline)

        await asyncio.gather(write(), read())


async def connect(
    data_dir: Path,
    port: int,
    n: int = 200,
    who: tuple[str, str] = FLOOD,
    host: str = "127.0.0.1",
    connections: int = CHANNELS,
) -> tuple[list[Any], Payloads]:
    chans = channels(data_dir, port, who[0], host, connections)
    info_call = chans[0].unary_unary(
        INFO,
        request_serializer=mpb.GetServerInfoRequest.SerializeToString,
        response_deserializer=mpb.GetServerInfoResponse.FromString,
    )
    info = await info_call(mpb.GetServerInfoRequest(), timeout=30)
    gallery = info.galleries[0]
    return chans, Payloads(gallery.model_id, gallery.size, n, who[1])


async def stream_closed_loop(
    channel: Any, payloads: Payloads, conc: int, seconds: float, deadline: float
) -> Run:
    """``conc`` StreamMatch streams on one connection, as a portico gateway holds them, each
    sending its next face when the last is answered; answers count as :meth:`Run.answered`
    says (one later than ``deadline`` is LATE: a portico's alarm that came too late)."""
    run = Run(seconds)
    stop = time.perf_counter() + seconds
    counter = iter(range(10**12))

    async def worker() -> None:
        call = open_stream(channel)
        while time.perf_counter() < stop:
            i = next(counter)
            message = stream_message(i, payloads.get(i))
            run.offered += 1
            t0 = time.perf_counter()
            await call.write(message)
            answer = await call.read()
            took = time.perf_counter() - t0
            if answer.sequence != i:
                raise SystemExit(f"StreamMatch answered {answer.sequence} for {i}")
            run.answered(answer, took, deadline)
        await call.done_writing()
        while await call.read() is not STREAM_END:
            pass

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    run.seconds = time.perf_counter() - t0
    return run


async def probe(args: argparse.Namespace) -> None:
    """``--probe``: a light, well-behaved client (closed loop at concurrency 2, the same
    deadline) in its own process, so that its latencies are not those of a saturated load
    generator. Unary MatchFace calls, or with ``--probe-stream`` two StreamMatch streams (a
    portico's way). Says ``ready``, waits for a line on stdin, runs, prints one JSON row."""
    chans, payloads = await connect(args.data_dir, args.port, 50, PROBE, args.host)
    calls = [ch.unary_unary(METHOD) for ch in chans[:1]]
    await closed_loop(calls, payloads, 1, 0.5)
    if args.probe_stream:
        await stream_closed_loop(chans[0], payloads, 1, 0.5, 30.0)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    timings = chans[0].unary_unary(TIMINGS)
    await timings(b"", timeout=30)  # start afresh: what came before is not this phase's
    if args.probe_stream:
        run = await stream_closed_loop(chans[0], payloads, 2, args.seconds, args.deadline_ms / 1000)
    else:
        run = await closed_loop(calls, payloads, 2, args.seconds, args.deadline_ms / 1000, True)
    row = run.row()
    doc = json.loads(await timings(b"", timeout=30))
    for part in ("before", "service"):
        row[f"{part}_p50_ms"] = round(percentile(doc[f"{part}_ms"], 0.50), 2)
        row[f"{part}_p99_ms"] = round(percentile(doc[f"{part}_ms"], 0.99), 2)
    samples = doc["admission"]
    names = ADMISSION_FIELDS
    for k, name in enumerate(names):
        if name != "probing":
            row[f"admission_{name}_p50"] = percentile([float(a[k]) for a in samples], 0.5)
    # How often a caller's stream probes were held at its share, and how often the limit
    # was remeasuring.
    row["admission_at_limit_share"] = round(
        sum(a[4] >= a[5] for a in samples) / max(1, len(samples)), 3
    )
    row["admission_probing_share"] = round(sum(a[3] for a in samples) / max(1, len(samples)), 3)
    print(json.dumps(row), flush=True)
    for ch in chans:
        await ch.close()


class Probe:
    """The ``--probe`` subprocess."""

    def __init__(self, args: argparse.Namespace, data_dir: Path, port: int, seconds: float):
        balancer = getattr(args, "balancer", None)
        self.proc = subprocess.Popen(
            [
                *(balancer.exec_prefix if balancer else []),
                sys.executable,
                "-m",
                "benchmarks.load",
                "--probe",
                "--data-dir",
                str(data_dir),
                "--port",
                str(balancer.port if balancer else port),
                "--host",
                _balancer.HOST_ADDR if balancer else "127.0.0.1",
                "--seconds",
                str(seconds),
                "--deadline-ms",
                str(args.deadline_ms),
                *(["--probe-stream"] if args.probe_stream else []),
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    async def start(self) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stdin is not None
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if line.strip() != b"ready":
            raise SystemExit("the probe client failed to start")
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    async def result(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.to_thread(self.proc.stdout.readline)
        self.proc.wait(30)
        doc: dict[str, Any] = json.loads(line)
        return doc


async def measure(args: argparse.Namespace, data_dir: Path, pid: int, port: int) -> dict[str, Any]:
    chans, payloads = await connect(data_dir, port)
    calls = [ch.unary_unary(METHOD) for ch in chans]
    await closed_loop(calls, payloads, 8, args.warmup)  # warm-up (connections, caches)
    rss: dict[str, Any] = {"before_mb": rss_mb(pid)}
    say(f"server RSS before: {rss['before_mb']:.0f} MB")

    # 1. capacity, closed loop
    closed: dict[int, Run] = {}
    for conc in args.concurrency:
        closed[conc] = await closed_loop(calls, payloads, conc, args.capacity_seconds)
        r = closed[conc].row()
        say(f"closed loop c={conc}: {r['ok_per_s']}/s p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms")
    capacity = max(r.ok_per_s for r in closed.values())
    base_conc = args.base_concurrency or min(
        k for k, r in closed.items() if r.ok_per_s >= 0.95 * capacity
    )

    # 2. 1x: closed loop at that concurrency, the probe client beside it
    probe_1x = Probe(args, data_dir, port, args.capacity_seconds)
    await probe_1x.start()
    rss_start = rss_mb(pid)
    meter = LoopMeter(pid)
    base = await closed_loop(calls, payloads, base_conc, args.capacity_seconds)
    loop = {"1x": _loop_figures(meter, base.codes["OK"])}
    growth = {"1x": (rss_mb(pid) - rss_start) * 1024 / max(1, base.codes["OK"])}
    probe_base = await probe_1x.result()

    # 3. overload, open loop, the probe client beside it
    samples: list[float] = []

    def sample() -> None:
        samples.append(rss_mb(pid))

    rate = args.factor * capacity
    say(f"open loop: offering {rate:.0f}/s ({args.factor:g}x) for {args.overload_seconds:g} s")
    probe_10x = Probe(args, data_dir, port, args.overload_seconds)
    await probe_10x.start()
    balancer = getattr(args, "balancer", None)
    # Through the balancer, the flood's connections past its cap are closed at once.
    over_chans = channels(data_dir, balancer.port) if balancer else chans
    over_calls = [ch.unary_unary(METHOD) for ch in over_chans] if balancer else calls
    rss_start = rss_mb(pid)
    meter = LoopMeter(pid)
    over = await open_loop(
        over_calls,
        payloads,
        rate,
        args.overload_seconds,
        args.deadline_ms / 1000,
        sample,
        StreamFlood(chans) if args.flood_stream else None,
    )
    loop["overload"] = _loop_figures(meter, over.codes["OK"])
    growth["overload"] = (rss_mb(pid) - rss_start) * 1024 / max(1, over.codes["OK"])
    probe_over = await probe_10x.result()
    half = len(samples) // 2
    rss["during_max_mb"] = max(samples) if samples else float("nan")
    # A plateau, not a climb: the second half of the overload peaks no higher than the first.
    rss["during_first_half_max_mb"] = max(samples[:half]) if half else float("nan")
    rss["during_second_half_max_mb"] = max(samples[half:]) if half else float("nan")
    sixth = max(1, len(samples) // 6)
    rss_windows = [round(max(samples[i : i + sixth]), 1) for i in range(0, len(samples), sixth)]

    # 4. recovery, closed loop at the 1x concurrency
    await asyncio.sleep(1.0)
    after = await closed_loop(calls, payloads, base_conc, args.capacity_seconds)
    await asyncio.sleep(2.0)
    rss["after_mb"] = rss_mb(pid)
    for ch in {*chans, *over_chans}:
        await ch.close()
    return {
        "capacity_per_s": round(capacity, 1),
        "base_concurrency": base_conc,
        "closed": {str(k): r.row() for k, r in closed.items()},
        "base": base.row(),
        "probe_base": probe_base,
        "target_per_s": round(rate, 1),
        "overload": over.row(),
        "overload_codes": dict(over.codes),
        "probe_overload": probe_over,
        "recovery": after.row(),
        "rss": {k: round(v, 1) for k, v in rss.items()},
        "rss_windows_mb": rss_windows,
        "rss_growth_kb_per_ok": {k: round(v, 2) for k, v in growth.items()},
        "loop": loop,
    }


def _loop_figures(meter: LoopMeter, answered: int) -> dict[str, float]:
    """The server event loop's CPU per answered call (ms; what refusing the flood cost is
    in it) and its busy share over the phase ``meter`` measured."""
    per_call, busy = meter.read(answered)
    return {"ms_per_answered_call": round(per_call, 3), "busy": round(busy, 3)}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def report(args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    cores = (
        f"server pinned to CPU {SERVER_CPU}, clients to CPU {CLIENT_CPU}"
        if args.pin
        else f"{os.cpu_count()} cores shared by server and clients"
    )
    base, over, rec = res["base"], res["overload"], res["recovery"]
    pb, po = res["probe_base"], res["probe_overload"]
    rss = res["rss"]
    print(
        f"\nMatchFace at {args.factor:g}x capacity, {cores} ({args.templates:,} listed; "
        f"max_concurrent_rpcs {args.max_in_flight}, "
        f"max_pending_rpcs {args.max_pending}; max_streams_per_connection "
        f"{args.max_streams or 'unlimited'}; intake_lanes {args.lanes}; "
        f"admission wait {args.max_wait_ms:g} ms, "
        f"queue per caller {args.queue_per_caller}, gain {args.gain:g}, "
        f"floor {args.floor}; "
        f"deadline {args.deadline_ms:g} ms; "
        f"load average {os.getloadavg()[0]:.1f})"
    )
    print(
        f"{'phase':<24} {'offered/s':>9} {'ok/s':>6} {'exhausted/s':>11} {'dropped/s':>9} "
        f"{'deadline/s':>10} {'refused/s':>9} {'late/s':>6} {'other':>5} {'p50 ms':>7} "
        f"{'p99 ms':>7}"
    )
    rows = [
        (f"1x closed loop (c={res['base_concurrency']})", base),
        ("  probe client (c=2)", pb),
        (f"{args.factor:g}x open loop", over),
        ("  probe client (c=2)", po),
        (f"recovery (c={res['base_concurrency']})", rec),
    ]
    for name, r in rows:
        print(
            f"{name:<24} {r['offered_per_s']:>9.0f} {r['ok_per_s']:>6.0f} "
            f"{r['resource_exhausted_per_s']:>11.0f} {r['backlog_dropped_per_s']:>9.0f} "
            f"{r['deadline_exceeded_per_s']:>10.0f} {r['refused_stream_per_s']:>9.0f} "
            f"{r['late_per_s']:>6.0f} {r['other_errors']:>5} "
            f"{r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f}"
        )
    print(
        "exhausted = RESOURCE_EXHAUSTED (max_concurrent_rpcs); dropped = CANCELLED by gRPC "
        "before the service (max_pending_rpcs); deadline = DEADLINE_EXCEEDED; refused = "
        "REFUSED_STREAM (UNAVAILABLE: past max_streams_per_connection, the client retries); "
        "late = a StreamMatch answer after its deadline (the server decided it)"
    )
    if args.balancer_cap:
        print(
            f"balancer (HAProxy, {args.balancer_cap} connections per source address): "
            f"{over['balancer_refused_per_s']:.0f}/s of the flood's calls went to connections "
            "it closed (UNAVAILABLE, never at the server); the probe client came from its own "
            "address"
        )
    print(
        f"capacity {res['capacity_per_s']:.0f}/s; offered target {res['target_per_s']:.0f}/s; "
        f"server RSS before {rss['before_mb']:.0f} MB, during (max of 1st / 2nd half) "
        f"{rss['during_first_half_max_mb']:.0f} / {rss['during_second_half_max_mb']:.0f} MB, "
        f"after {rss['after_mb']:.0f} MB; growth per answered call "
        f"{res['rss_growth_kb_per_ok']['1x']:.1f} KB at 1x, "
        f"{res['rss_growth_kb_per_ok']['overload']:.1f} KB at {args.factor:g}x"
    )
    print(
        f"probe client, where its time went (p50 / p99 ms): at 1x {pb['before_p50_ms']} / "
        f"{pb['before_p99_ms']} before the service, {pb['service_p50_ms']} / "
        f"{pb['service_p99_ms']} in it; at {args.factor:g}x {po['before_p50_ms']} / "
        f"{po['before_p99_ms']} before, {po['service_p50_ms']} / {po['service_p99_ms']} in it"
    )
    at = {
        phase: ", ".join(
            f"{r[f'admission_{k}_p50']:g}"
            for k in ("limit", "callers", "share", "most_held", "in_flight", "waiting")
        )
        + f"; at a share {100 * r['admission_at_limit_share']:.0f} %, probing "
        f"{100 * r['admission_probing_share']:.0f} %"
        for phase, r in (("1x", pb), (f"{args.factor:g}x", po))
    }
    print(
        "server admission while the probe ran (median of 50 ms samples: limit, active "
        "callers, a caller's share of the limit, the most probes one caller held, units in "
        "flight, waiting; share of samples with a caller's probes at its share, and "
        "remeasuring at the floor): "
        + "; ".join(f"at {phase} {figures}" for phase, figures in at.items())
    )
    if args.max_streams:
        # Through the balancer the flood keeps only the connections its cap lets through.
        conns = min(args.balancer_cap, CHANNELS) if args.balancer_cap else CHANNELS
        open_streams = args.max_streams * conns + 2
        answered = over["ok_per_s"] + po["ok_per_s"]
        print(
            f"streams open at {args.factor:g}x: the flood's {args.max_streams} x {conns} "
            f"connections and the probe's 2 = {open_streams}; served in turn at "
            f"{answered:.0f}/s they take {1000 * open_streams / answered:.0f} ms "
            "(Little's law), the probe's p50 if it waits behind all of them"
        )
    lp = res["loop"]
    print(
        f"server event loop: {lp['1x']['ms_per_answered_call']} ms of CPU per answered call "
        f"at 1x (busy {lp['1x']['busy']:.2f}), {lp['overload']['ms_per_answered_call']} ms at "
        f"{args.factor:g}x (busy {lp['overload']['busy']:.2f}; refusals included)"
    )
    return {
        "templates": args.templates,
        "pinned": args.pin,
        "max_concurrent_rpcs": args.max_in_flight,
        "max_pending_rpcs": args.max_pending,
        "max_streams_per_connection": args.max_streams,
        "intake_lanes": args.lanes,
        "balancer_cap": args.balancer_cap,
        "admission_max_wait_ms": args.max_wait_ms,
        "admission_queue_per_caller": args.queue_per_caller,
        "admission_gain": args.gain,
        "admission_floor": args.floor,
        "deadline_ms": args.deadline_ms,
        "factor": args.factor,
        "capacity_per_s": res["capacity_per_s"],
        "closed_loop_per_s": {k: v["ok_per_s"] for k, v in res["closed"].items()},
        "target_offered_per_s": res["target_per_s"],
        "offered_per_s": over["offered_per_s"],
        "admitted_ok_per_s": over["ok_per_s"],
        "shed_resource_exhausted_per_s": over["resource_exhausted_per_s"],
        "shed_backlog_cancelled_per_s": over["backlog_dropped_per_s"],
        "shed_deadline_exceeded_per_s": over["deadline_exceeded_per_s"],
        "shed_refused_stream_per_s": over["refused_stream_per_s"],
        "shed_by_balancer_per_s": over["balancer_refused_per_s"],
        "answered_late_per_s": over["late_per_s"],
        "other_errors": sum(r["other_errors"] for _, r in rows),
        "other_codes": {k: v for _, r in rows for k, v in r["other_codes"].items()},
        "other_details": {k: v for _, r in rows for k, v in r["other_details"].items()},
        "p50_ms_1x": base["p50_ms"],
        "p99_ms_1x": base["p99_ms"],
        "p50_ms_overload": over["p50_ms"],
        "p99_ms_overload": over["p99_ms"],
        "probe_p50_ms_1x": pb["p50_ms"],
        "probe_p99_ms_1x": pb["p99_ms"],
        "probe_p50_ms_overload": po["p50_ms"],
        "probe_p99_ms_overload": po["p99_ms"],
        "probe_ok_share_overload": po["ok_share"],
        "probe_before_service_p50_ms_1x": pb["before_p50_ms"],
        "probe_in_service_p50_ms_1x": pb["service_p50_ms"],
        "probe_before_service_p50_ms_overload": po["before_p50_ms"],
        "probe_before_service_p99_ms_overload": po["before_p99_ms"],
        "probe_in_service_p50_ms_overload": po["service_p50_ms"],
        "probe_in_service_p99_ms_overload": po["service_p99_ms"],
        "recovery_ok_per_s": rec["ok_per_s"],
        "p99_ms_recovery": rec["p99_ms"],
        "rss_mb": rss,
        "rss_windows_mb": res["rss_windows_mb"],
        "rss_growth_kb_per_ok_call_1x": res["rss_growth_kb_per_ok"]["1x"],
        "rss_growth_kb_per_ok_call_overload": res["rss_growth_kb_per_ok"]["overload"],
        "loop_ms_per_answered_call_1x": res["loop"]["1x"]["ms_per_answered_call"],
        "loop_ms_per_answered_call_overload": res["loop"]["overload"]["ms_per_answered_call"],
        "loop_busy_overload": res["loop"]["overload"]["busy"],
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def default_limits() -> tuple[int, int, int, float, int, float, int, int]:
    from centinela.config import Settings

    defaults = Settings()
    return (
        defaults.max_concurrent_rpcs,
        defaults.max_pending_rpcs,
        defaults.max_streams_per_connection,
        defaults.admission_max_wait_ms,
        defaults.admission_queue_per_caller,
        defaults.admission_gain,
        defaults.admission_floor,
        defaults.intake_lanes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="under a minute")
    parser.add_argument("--templates", type=int, default=0, help="listed people (quick 2,000)")
    parser.add_argument("--factor", type=float, default=10.0, help="offered / capacity (10)")
    parser.add_argument("--deadline-ms", type=float, default=1000.0, help="per call (1000)")
    parser.add_argument(
        "--max-in-flight", type=int, default=0, help="max_concurrent_rpcs (server default)"
    )
    parser.add_argument(
        "--max-pending", type=int, default=0, help="max_pending_rpcs (server default)"
    )
    parser.add_argument(
        "--max-streams",
        type=int,
        default=-1,
        help="max_streams_per_connection (server default)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=-1.0,
        help="admission_max_wait_ms (server default)",
    )
    parser.add_argument(
        "--queue-per-caller",
        type=int,
        default=0,
        help="admission_queue_per_caller (server default)",
    )
    parser.add_argument(
        "--gain", type=float, default=-1.0, help="admission_gain (server default; 0 = fixed)"
    )
    parser.add_argument("--floor", type=int, default=0, help="admission_floor (server default)")
    parser.add_argument("--lanes", type=int, default=0, help="intake_lanes (server default)")
    parser.add_argument(
        "--base-concurrency",
        type=int,
        default=0,
        metavar="C",
        help="the 1x closed loop's concurrency (default: the lowest reaching 95 %% of the "
        "best throughput, which moves between runs; fix it to compare runs)",
    )
    parser.add_argument("--overload-seconds", type=float, default=0.0)
    parser.add_argument("--capacity-seconds", type=float, default=0.0)
    parser.add_argument("--keep", type=Path, help="reuse/keep the data dir under this directory")
    parser.add_argument(
        "--pin",
        action="store_true",
        help=f"server on CPU {SERVER_CPU}, load generator and probe client on CPU {CLIENT_CPU}",
    )
    parser.add_argument(
        "--flood-stream",
        action="store_true",
        help="the overload arrives as StreamMatch messages (one stream per connection) "
        "instead of unary MatchFace calls",
    )
    parser.add_argument(
        "--probe-stream",
        action="store_true",
        help="the well-behaved client holds two StreamMatch streams, as a portico does, "
        "instead of sending unary MatchFace calls",
    )
    parser.add_argument(
        "--balancer-cap",
        type=int,
        default=0,
        metavar="N",
        help="the flood through HAProxy admitting N connections per source address (TCP "
        "mode: mTLS passes through), the probe client from a network namespace of its own, "
        "as deploy/README.md advises against a unary flood; needs root, haproxy, iproute2",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    in_flight, pending, streams, wait_ms, per_caller, gain, floor, lanes = default_limits()
    args.lanes = args.lanes or lanes
    args.floor = args.floor or floor
    args.max_in_flight = args.max_in_flight or in_flight
    args.max_pending = args.max_pending or pending
    args.max_streams = streams if args.max_streams < 0 else args.max_streams
    args.max_wait_ms = wait_ms if args.max_wait_ms < 0 else args.max_wait_ms
    args.queue_per_caller = args.queue_per_caller or per_caller
    args.gain = gain if args.gain < 0 else args.gain
    if args.serve:
        asyncio.run(serve(args))
        return 0
    if args.probe:
        asyncio.run(probe(args))
        return 0
    if args.balancer_cap:
        if args.flood_stream:
            raise SystemExit(
                "--balancer-cap is for a unary flood: a flood over streams is held by the "
                "admission's shares (--gain)"
            )
        if (lack := _balancer.missing()) is not None:
            raise SystemExit(lack)
    args.templates = args.templates or (2_000 if args.quick else 100_000)
    args.capacity_seconds = args.capacity_seconds or (3.0 if args.quick else 10.0)
    args.overload_seconds = args.overload_seconds or (12.0 if args.quick else 60.0)
    args.warmup = 1.0 if args.quick else 3.0
    args.concurrency = [8, 32] if args.quick else [4, 8, 16, 32]
    data_dir = bench_data_dir(args.keep, args.templates, "centinela-load-")
    say(
        f"starting the server ({args.templates:,} listed, max_concurrent_rpcs "
        f"{args.max_in_flight}, max_pending_rpcs {args.max_pending}) …"
    )
    pin_clients(args.pin)  # the probe client, started later, inherits it
    with serving(
        data_dir,
        args.templates,
        args.max_in_flight,
        args.max_pending,
        max_streams=args.max_streams,
        lanes=args.lanes,
        admission=(args.max_wait_ms, args.queue_per_caller, args.gain, args.floor),
        pin=args.pin,
    ) as (proc, port):
        if args.balancer_cap:
            global _balanced
            _balanced = True
            cpu = CLIENT_CPU if args.pin else None
            with _balancer.Balancer(port, args.balancer_cap, cpu) as args.balancer:
                say(
                    f"balancer on port {args.balancer.port}: {args.balancer_cap} connections "
                    f"per source; the probe client from {_balancer.NETNS_ADDR}"
                )
                res = asyncio.run(measure(args, data_dir, proc.pid, port))
        else:
            res = asyncio.run(measure(args, data_dir, proc.pid, port))
    return finish(report(args, res))


if __name__ == "__main__":
    raise SystemExit(main())
