"""PostgreSQL goes away under MatchFace load, then comes back: the server fails closed with
UNAVAILABLE, answers nothing without its audit entry, and recovers by itself.

Real faults, not mocks, of two kinds:

* **The network.** The server reaches the machine's PostgreSQL (127.0.0.1:5432, database
  ``test``, a fresh schema) through a small TCP relay run by the test. Cutting the relay
  aborts every open connection (both ends see a reset) and closes its listening socket (new
  connections are refused); restoring it listens again on the same port.
* **PostgreSQL itself.** The machine's PostgreSQL is shared with every other test and never
  stopped, so the server runs on a PostgreSQL of the test's own (``_postgres.py``), which is
  stopped as the service is stopped (every session told it is being terminated, SQLSTATE
  57P01), started, then killed at once (a crash) and started again (it replays its WAL).

While the database is away, every call made gets UNAVAILABLE (never INTERNAL or UNKNOWN,
never an answer). When it returns, calls succeed again without restarting the server. At the
end, offline, the audit log verifies and holds the decision of every answer a client got, and
every alert answered is stored.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import os
import queue
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from centinela.config import Settings
from centinela.matcher import synth
from centinela.matcher.service import REGISTRY
from centinela.policy.bundle import Bundle
from centinela.server.demo import World, populate
from centinela.server.instance import advisory_key
from centinela.server.testing import ServerThread, TcpProxy
from centinela.v1 import common_pb2
from centinela.v1 import match_service_pb2 as mpb
from centinela.v1 import match_service_pb2_grpc as mgrpc
from centinela.v1 import registry_service_pb2 as rpb
from centinela.v1 import registry_service_pb2_grpc as rgrpc

from ._postgres import Netns, PrivatePostgres
from ._proc import lifted_bundle, verified_entries

THREADS = 8


@dataclasses.dataclass(frozen=True)
class Call:
    started: float
    ended: float
    code: grpc.StatusCode
    decision_id: str = ""
    alert_ids: tuple[str, ...] = ()


class Load:
    """``THREADS`` clients sending MatchFace back to back; one probe in four is the wanted
    person's (an alert)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._busy = 0
        self._threads = [threading.Thread(target=self._client, args=(k,)) for k in range(THREADS)]

    def _client(self, k: int) -> None:
        w = self.world
        stub = w.stub("muni-miraflores")
        i = k
        while not self._stop.is_set():
            with self._lock:
                go = self._go.is_set()
                self._busy += go
            if not go:
                self._go.wait(0.05)
                continue
            vec = w.genuine(0, seed=i) if i % 4 == 0 else w.stranger(seed=i % 500)
            t0 = time.monotonic()
            try:
                resp = stub.MatchFace(w.face_request(vec), timeout=20)
                call = Call(
                    t0,
                    time.monotonic(),
                    grpc.StatusCode.OK,
                    resp.decision.decision_id,
                    tuple(c.alert_id for c in resp.candidates),
                )
            except grpc.RpcError as err:
                call = Call(t0, time.monotonic(), cast(Any, err).code())
                time.sleep(0.02)  # a client backs off a little
            with self._lock:
                self.calls.append(call)
                self._busy -= 1
            i += THREADS

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def pause(self) -> None:
        """No new call until :meth:`resume`; returns once the calls under way have ended."""
        self._go.clear()
        deadline = time.monotonic() + 30
        while True:
            with self._lock:
                if not self._busy:
                    return
            assert time.monotonic() < deadline, "a call did not end"
            time.sleep(0.01)

    def resume(self) -> None:
        self._go.set()

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def wait(self, what: Callable[[list[Call]], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not what(self.snapshot()):
            assert time.monotonic() < deadline, collections.Counter(
                c.code.name for c in self.snapshot()
            )
            time.sleep(0.05)


def _made_after(t: float, n: int) -> Callable[[list[Call]], bool]:
    """At least ``n`` calls made after ``t`` have ended."""
    return lambda calls: sum(c.started > t for c in calls) >= n


def _recovered_after(t: float) -> Callable[[list[Call]], bool]:
    """The last 40 calls made after ``t`` were answered."""

    def recovered(calls: list[Call]) -> bool:
        after = [c for c in calls if c.started > t]
        return sum(c.code == grpc.StatusCode.OK for c in after[-40:]) == 40

    return recovered


def _import_and_wait_searchable(server: ServerThread, timeout: float = 60.0) -> None:
    model_id = str(server.app.components.face_model_id)
    vecs = synth.identities(10, seed=321)
    ctx = common_pb2.RequestContext(reference="RES-REN-2026-0901")
    batch = rpb.ImportTemplatesRequest(
        context=ctx,
        records=[
            rpb.RegistryRecord(dni=f"{43_000_000 + i:08d}", model_id=model_id, vector=v.tolist())
            for i, v in enumerate(vecs)
        ],
    )
    with server.channel("reniec") as ch:
        stub = rgrpc.RegistryServiceStub(ch)
        assert stub.ImportTemplates(iter([batch]), timeout=30).accepted == 10
        deadline = time.monotonic() + timeout
        while True:
            status = stub.GetImportStatus(rpb.GetImportStatusRequest(context=ctx), timeout=30)
            if status.index_lag == 0 and status.indexed >= 10:
                return
            assert time.monotonic() < deadline, "the index stopped catching up after the outage"
            time.sleep(0.1)


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TcpProxy]:
    url = sa.engine.make_url(pg_url)
    relay = TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    try:
        yield relay
    finally:
        relay.close()


@dataclasses.dataclass(frozen=True)
class Fault:
    """A way for the database to go away, and to come back."""

    name: str
    down: Callable[[], None]
    up: Callable[[], None]


def _outages(tmp_path: Path, database_url: str, faults: list[Fault]) -> None:
    """MatchFace load from ``THREADS`` clients while each fault in turn takes the database
    away for a while; then what every client got is checked against the audit log."""
    settings = _settings(tmp_path, database_url)
    windows: list[tuple[str, float, float]] = []
    with ServerThread(settings) as server:
        world = populate(server, registry=False)
        with Load(world) as load:
            load.wait(lambda calls: sum(c.code == grpc.StatusCode.OK for c in calls) >= 40)
            for fault in faults:
                fault.down()
                down_at = time.monotonic()
                load.wait(_made_after(down_at, 40))
                # Health says so, for a balancer or an orchestrator's readiness probe.
                _wait_until(lambda: _health(server) == NOT_SERVING)
                time.sleep(2.0)  # outlast the index catch-up's interval (0.5 s) a few times
                up_at = time.monotonic()
                fault.up()
                windows.append((fault.name, down_at, up_at))
                load.wait(_recovered_after(up_at))
                _wait_until(lambda: _health(server) == SERVING)
                # Serving again means serving under the lock again (read from PostgreSQL).
                assert _lock_holder(database_url) is not None, fault.name
        # The background index catch-up survived the outages too: a registry import made
        # after them becomes searchable without a restart.
        _import_and_wait_searchable(server)
        world.close()
    calls = load.snapshot()

    # While the database was away: UNAVAILABLE, and only that.
    for name, down_at, up_at in windows:
        down = [c for c in calls if c.started > down_at and c.ended < up_at]
        assert len(down) >= 20, name
        codes = collections.Counter(c.code.name for c in down)
        assert codes == {"UNAVAILABLE": len(down)}, (name, codes)
    _check_answers(tmp_path, database_url, calls)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(server: ServerThread) -> int:
    with server.channel("compliance") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status)


def _lock_key(conn: sa.Connection) -> int:
    database, schema = conn.exec_driver_sql("SELECT current_database(), current_schema()").one()
    return advisory_key(str(database), str(schema))


def _lock_holder(database_url: str) -> int | None:
    """The PostgreSQL backend pid holding the server lock of ``database_url``, if any."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            key = _lock_key(conn)
            pid = conn.execute(
                sa.text(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND objsubid = 1 AND classid = CAST(:hi AS oid) AND objid = CAST(:lo AS oid)"
                ),
                {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF},
            ).scalar()
        return None if pid is None else int(pid)
    finally:
        engine.dispose()


def _settings(tmp_path: Path, database_url: str) -> Settings:
    bundle = lifted_bundle(tmp_path / "bundle")
    return Settings(
        face_model_id=str(Bundle.load(str(bundle)).config["galleries"][REGISTRY]["model_id"]),
        data_dir=tmp_path / "data",
        listen="127.0.0.1:0",
        shutdown_grace_s=1.0,
        database_url=database_url,
        policy_bundle=str(bundle),
    )


def _check_answers(
    tmp_path: Path, database_url: str, calls: list[Call], data_dir: Path | None = None
) -> None:
    """No call met anything but OK or UNAVAILABLE; no answer without its audit entry;
    every alert answered is stored; the log verifies offline. ``database_url`` empty: the
    data directory's SQLite database."""
    data = data_dir or tmp_path / "data"
    everything = collections.Counter(c.code.name for c in calls)
    assert set(everything) <= {"OK", "UNAVAILABLE"}, everything
    answered = [c for c in calls if c.code == grpc.StatusCode.OK]
    assert any(c.alert_ids for c in answered), "no alert was raised: the load is not realistic"
    logged = {
        e.get("decision_id") for e in verified_entries(data, tmp_path / "x", database_url or None)
    }
    missing = [c.decision_id for c in answered if c.decision_id not in logged]
    assert len(missing) == 0, f"{len(missing)} answered decisions are not in the audit log"
    engine = sa.create_engine(database_url or f"sqlite:///{data / 'centinela.db'}")
    with engine.connect() as conn:
        stored = {r[0] for r in conn.exec_driver_sql("SELECT alert_id FROM alerts")}
    engine.dispose()
    assert {a for c in answered for a in c.alert_ids} <= stored


@pytest.mark.postgres
@pytest.mark.slow
def test_database_outage_fails_closed_and_recovers(
    tmp_path: Path, pg_url: str, proxy: TcpProxy
) -> None:
    """The network to the machine's PostgreSQL is cut, then restored."""
    url = sa.engine.make_url(pg_url).set(host="127.0.0.1", port=proxy.port)
    _outages(
        tmp_path,
        url.render_as_string(hide_password=False),
        [Fault("network cut", proxy.cut, proxy.restore)],
    )


@pytest.mark.slow
def test_postgres_stopped_then_crashed_under_load_fails_closed_and_recovers(
    tmp_path: Path, own_postgres: PrivatePostgres
) -> None:
    """PostgreSQL itself goes away: first stopped as the service is stopped (every session
    told it is being terminated), then killed at once (a crash, recovered from its WAL at the
    next start). Each time the server answers UNAVAILABLE until PostgreSQL is back, then
    serves again without a restart, and nothing it answered is missing from the audit log."""
    pg = own_postgres
    _outages(
        tmp_path,
        pg.url,
        [
            Fault("stopped (fast)", lambda: pg.stop("fast"), pg.start),
            Fault("crashed (immediate)", lambda: pg.stop("immediate"), pg.start),
        ],
    )


def _leaves(database_url: str) -> int:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT COUNT(*) FROM audit_leaves").scalar_one())
    finally:
        engine.dispose()


@pytest.mark.slow
def test_after_a_restart_nothing_is_appended_until_the_server_holds_its_lock_again(
    tmp_path: Path, own_postgres: PrivatePostgres
) -> None:
    """PostgreSQL restarts, and another process takes the server lock before Centinela
    takes it again (as a second server, started while the database was down, would).
    Centinela then appends nothing and answers every MatchFace UNAVAILABLE until that
    process lets go; then it takes its lock again and serves, without a restart.

    Before the audit writer asked for the lock, it appended again as soon as PostgreSQL
    answered, without the lock, and went on while the other process held it (the server's
    own check, every 5 s, only logged that)."""
    pg = own_postgres
    with ServerThread(_settings(tmp_path, pg.url)) as server:
        world = populate(server, registry=False)
        with Load(world) as load:
            load.wait(lambda calls: sum(c.code == grpc.StatusCode.OK for c in calls) >= 40)
            load.pause()
            other = None
            for _ in range(3):  # the server's own 5 s check may take it first: again
                pg.stop("fast")
                pg.start()
                candidate = sa.create_engine(pg.url).connect()
                got = candidate.execute(
                    sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": _lock_key(candidate)}
                ).scalar()
                candidate.commit()
                if got:
                    other = candidate
                    break
                candidate.close()
            assert other is not None, "the server took its lock back first, three times"
            try:
                leaves = _leaves(pg.url)
                held_at = time.monotonic()
                load.resume()
                load.wait(_made_after(held_at, 40))
                _wait_until(lambda: _health(server) == NOT_SERVING)
                time.sleep(1.0)
                # No call while the other process lets go: the server becomes ready again
                # by itself (a balancer sends nothing to a server that is not ready).
                load.pause()
                released_at = time.monotonic()
                refused = [c for c in load.snapshot() if c.started > held_at]
                # Nothing appended, nothing answered, while the other process held the lock.
                assert _leaves(pg.url) == leaves
            finally:
                other.close()
                other.engine.dispose()
            assert len(refused) >= 40
            codes = collections.Counter(c.code.name for c in refused)
            assert set(codes) == {"UNAVAILABLE"}, codes
            _wait_until(lambda: _health(server) == SERVING)
            assert _lock_holder(pg.url) is not None
            load.resume()
            load.wait(_recovered_after(released_at))
        world.close()
    _check_answers(tmp_path, pg.url, load.snapshot())


class _Portico:
    """A StreamMatch kept open, as a portico keeps it all day: probes are sent one at a time
    and each waits for its answer."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._out: queue.Queue[mpb.StreamMatchRequest | None] = queue.Queue()
        self._answers: queue.Queue[mpb.StreamMatchResponse | BaseException] = queue.Queue()
        stub = world.stub("muni-miraflores")
        self.call = stub.StreamMatch(iter(self._out.get, None), timeout=300)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.sequence = 0

    def _read(self) -> None:
        try:
            for answer in self.call:
                self._answers.put(answer)
        except grpc.RpcError as err:
            self._answers.put(err)

    def probe(self, vector: list[float]) -> mpb.StreamMatchResponse:
        self.sequence += 1
        self._out.put(
            mpb.StreamMatchRequest(sequence=self.sequence, face=self.world.face_request(vector))
        )
        answer = self._answers.get(timeout=60)
        assert isinstance(answer, mpb.StreamMatchResponse), f"the stream ended: {answer}"
        assert answer.sequence == self.sequence
        return answer

    def close(self) -> None:
        self._out.put(None)
        self._reader.join(30)


@pytest.mark.slow
def test_open_streams_survive_a_postgres_restart(
    tmp_path: Path, own_postgres: PrivatePostgres
) -> None:
    """A portico's StreamMatch and a control centre's SubscribeAlerts, both opened before
    PostgreSQL is stopped, stay open through the stop and the restart. Probes sent while it
    is down are refused one by one (UNAVAILABLE, in the answer, not on the stream); after
    it the same stream's hits raise alerts that reach the same subscription, and nothing
    refused raised one."""
    pg = own_postgres
    with ServerThread(_settings(tmp_path, pg.url)) as server:
        world = populate(server, registry=False)
        events: list[mpb.SubscribeAlertsResponse] = []
        centre = server.channel("pnp-center-lima")
        subscription = mgrpc.MatchServiceStub(centre).SubscribeAlerts(
            mpb.SubscribeAlertsRequest(
                context=common_pb2.RequestContext(operator_id="op-center-000001"),
                cursor="ev-0",  # from the first event: none is missed while it opens
            ),
            timeout=300,
        )
        ended: list[BaseException] = []

        def listen() -> None:
            try:
                events.extend(subscription)
            except grpc.RpcError as err:
                ended.append(err)

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        portico = _Portico(world)
        try:
            before = portico.probe(world.genuine(0))
            assert before.face.alert
            _wait_until(lambda: len(events) >= 1)

            pg.stop("fast")
            for vector in (world.genuine(0), world.stranger(seed=5), world.genuine(0)):
                refused = portico.probe(vector)
                assert refused.WhichOneof("result") == "error"
                assert refused.error.code == grpc.StatusCode.UNAVAILABLE.value[0], refused
            pg.start()

            # The first probe after it is served: the audit writer's connection, which the
            # restart ended, is replaced before anything is sent on it.
            after = portico.probe(world.genuine(0))
            assert after.face.alert, after
            _wait_until(lambda: len(events) >= 2)
            assert not ended, ended
            assert subscription.is_active()
            assert portico.call.is_active()
        finally:
            portico.close()
            cast(Any, subscription).cancel()
            listener.join(30)
            centre.close()
        raised = [before.face.candidates[0].alert_id, after.face.candidates[0].alert_id]
        assert [e.alert_id for e in events] == raised
        world.close()


def _wait_until(what: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def partitioned_postgres() -> Iterator[tuple[PrivatePostgres, Netns]]:
    netns = Netns()
    try:
        pg = PrivatePostgres(netns)
        try:
            pg.start()
            yield pg, netns
        finally:
            pg.close()
    finally:
        netns.close()


#: How long the partition below lasts, and the first part of it in which a call made must
#: still end before the network returns. PostgreSQL's liveness settings
#: (``storage.PG_LIVENESS``) declare a silent connection dead within 5-11 s and give a
#: connection attempt up after 5 s: a call waited 5-10 s here, up to 13.4 s with both cores
#: busy with other work.
PARTITION_S = 30.0
EARLY_S = 10.0


@pytest.mark.slow
def test_a_network_partition_from_postgres_fails_calls_and_heals(
    tmp_path: Path, partitioned_postgres: tuple[PrivatePostgres, Netns]
) -> None:
    """The network between the server and PostgreSQL fails silently (PostgreSQL in a network
    namespace of its own, its end of the link taken down: no reset, no ICMP) for 30 s.

    Calls made in the partition's first seconds end UNAVAILABLE before the network returns:
    the server gives up on silent connections instead of waiting for the network (before
    the liveness settings, every call waited the whole partition, holding its unit). When
    it returns, the server serves again by itself, under its lock again: PostgreSQL let go
    of the sessions the server had given up on, the lock's included. Nothing answered is
    missing from the audit log."""
    pg, netns = partitioned_postgres
    with ServerThread(_settings(tmp_path, pg.url)) as server:
        world = populate(server, registry=False)
        with Load(world) as load:
            load.wait(lambda calls: sum(c.code == grpc.StatusCode.OK for c in calls) >= 40)
            netns.cut()
            cut_at = time.monotonic()
            time.sleep(PARTITION_S)
            mended_at = time.monotonic()
            netns.mend()
            load.wait(_recovered_after(mended_at), timeout=90)
            assert _lock_holder(pg.url) is not None
        world.close()
    calls = load.snapshot()
    # The calls in flight when the network failed (one a client) and those made in its
    # first seconds.
    early = [c for c in calls if c.ended > cut_at and c.started < cut_at + EARLY_S]
    assert len(early) >= THREADS
    late = [round(c.ended - cut_at, 1) for c in early if c.ended >= mended_at]
    assert late == [], "calls waited for the network instead of failing"
    # Answered only if their entry was durable before the network failed.
    made = collections.Counter(c.code.name for c in early if c.started > cut_at)
    assert set(made) <= {"UNAVAILABLE"}, made
    assert {c.code.name for c in early} <= {"OK", "UNAVAILABLE"}
    _check_answers(tmp_path, pg.url, calls)


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 64 MB file system of the test's own (tmpfs), which the test may fill."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    where = Path(tempfile.mkdtemp(prefix="centinela-disk-"))
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        where.rmdir()
        if os.environ.get("CI") == "true":
            pytest.fail(f"could not mount a tmpfs: {out.stderr}")
        pytest.skip(f"could not mount a tmpfs: {out.stderr}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
        where.rmdir()


def _fill(disk: Path) -> Path:
    """Write a file until the file system is full; returns it."""
    ballast = disk / "ballast"
    block = b"\0" * (1 << 16)
    with ballast.open("wb", buffering=0) as out:
        while _written(out, block):
            pass
    return ballast


def _written(out: Any, block: bytes) -> bool:
    """Whether ``block`` was written; False once the file system is full."""
    try:
        out.write(block)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        return False
    return True


@pytest.mark.slow
def test_a_full_disk_fails_closed_and_recovers(tmp_path: Path, small_disk: Path) -> None:
    """The data directory's file system fills up under MatchFace load (SQLite, the default:
    the database, its WAL, the keys and snapshots on a 64 MB tmpfs, the rest of it taken by
    another file). Calls fail UNAVAILABLE, none is answered without its entry; when space is
    freed the server serves again by itself, and the log verifies."""
    settings = dataclasses.replace(_settings(tmp_path, ""), data_dir=small_disk / "data")
    with ServerThread(settings) as server:
        world = populate(server, registry=False)
        with Load(world) as load:
            load.wait(lambda calls: sum(c.code == grpc.StatusCode.OK for c in calls) >= 40)
            ballast = _fill(small_disk)
            full_at = time.monotonic()

            def refused(calls: list[Call]) -> bool:
                after = [c for c in calls if c.started > full_at]
                return sum(c.code == grpc.StatusCode.UNAVAILABLE for c in after) >= 40

            load.wait(refused, timeout=120)
            ballast.unlink()
            freed_at = time.monotonic()
            load.wait(_recovered_after(freed_at))
        world.close()
    calls = load.snapshot()
    _check_answers(tmp_path, "", calls, data_dir=small_disk / "data")


@pytest.mark.slow
def test_the_first_call_after_a_quiet_restart_is_served(
    tmp_path: Path, own_postgres: PrivatePostgres
) -> None:
    """PostgreSQL restarts while nobody calls (stopped, then crashed): the audit writer's
    connection ended with it, unknown to the writer. The next call is served all the same:
    the batch meets the dead connection before anything is sent on it, and goes again on a
    new one, through the reload and the lock (before, that call was refused UNAVAILABLE)."""
    pg = own_postgres
    with ServerThread(_settings(tmp_path, pg.url)) as server:
        world = populate(server, registry=False)
        stub = world.stub("muni-miraflores")
        for mode in ("fast", "immediate"):
            assert stub.MatchFace(world.face_request(world.genuine(0)), timeout=30).alert
            pg.stop(mode)
            pg.start()
            answer = stub.MatchFace(world.face_request(world.genuine(0)), timeout=30)
            assert answer.alert, mode
        assert _lock_holder(pg.url) is not None
        world.close()
