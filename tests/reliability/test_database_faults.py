"""PostgreSQL becomes unreachable under MatchFace load, then comes back: the server fails
closed with UNAVAILABLE, answers nothing without its audit entry, and recovers by itself.

The fault is a real network fault, not a mock: the server reaches PostgreSQL (127.0.0.1:5432,
database ``test``, a fresh schema) through a small TCP relay run by this test. Cutting the
relay aborts every open connection (both ends see a reset, as when PostgreSQL stops) and
closes its listening socket (new connections are refused, as when PostgreSQL is down);
restoring it listens again on the same port. The machine's PostgreSQL service itself is never
stopped: other users share it.

While the database is away, every call made gets UNAVAILABLE (never INTERNAL or UNKNOWN,
never an answer). When it returns, calls succeed again without restarting the server. At the
end, offline, the audit log verifies and holds the decision of every answer a client got, and
every alert answered is stored.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import sqlalchemy as sa

from centinela.config import Settings
from centinela.matcher import synth
from centinela.matcher.service import REGISTRY
from centinela.policy.bundle import Bundle
from centinela.server.demo import World, populate
from centinela.server.testing import ServerThread, TcpProxy
from centinela.v1 import common_pb2
from centinela.v1 import registry_service_pb2 as rpb
from centinela.v1 import registry_service_pb2_grpc as rgrpc

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
        self._threads = [threading.Thread(target=self._client, args=(k,)) for k in range(THREADS)]

    def _client(self, k: int) -> None:
        w = self.world
        stub = w.stub("muni-miraflores")
        i = k
        while not self._stop.is_set():
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
            i += THREADS

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

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


@pytest.mark.postgres
@pytest.mark.slow
def test_database_outage_fails_closed_and_recovers(
    tmp_path: Path, pg_url: str, proxy: TcpProxy
) -> None:
    url = sa.engine.make_url(pg_url).set(host="127.0.0.1", port=proxy.port)
    bundle = lifted_bundle(tmp_path / "bundle")
    settings = Settings(
        face_model_id=str(Bundle.load(str(bundle)).config["galleries"][REGISTRY]["model_id"]),
        data_dir=tmp_path / "data",
        listen="127.0.0.1:0",
        shutdown_grace_s=1.0,
        database_url=url.render_as_string(hide_password=False),
        policy_bundle=str(bundle),
    )
    with ServerThread(settings) as server:
        world = populate(server, registry=False)
        with Load(world) as load:
            load.wait(lambda calls: sum(c.code == grpc.StatusCode.OK for c in calls) >= 40)
            proxy.cut()
            cut_at = time.monotonic()
            load.wait(lambda calls: sum(c.started > cut_at for c in calls) >= 40)
            time.sleep(2.0)  # outlast the index catch-up's interval (0.5 s) a few times
            restored_at = time.monotonic()
            proxy.restore()

            def recovered(calls: list[Call]) -> bool:
                after = [c for c in calls if c.started > restored_at]
                return sum(c.code == grpc.StatusCode.OK for c in after[-40:]) == 40

            load.wait(recovered)
        # The background index catch-up survived the outage too: a registry import made
        # after it becomes searchable without a restart.
        _import_and_wait_searchable(server)
        world.close()
    calls = load.snapshot()

    # While the database was away: UNAVAILABLE, and only that.
    down = [c for c in calls if c.started > cut_at and c.ended < restored_at]
    assert len(down) >= 20
    codes = collections.Counter(c.code.name for c in down)
    assert codes == {"UNAVAILABLE": len(down)}, codes
    # Over the whole run no call met anything but OK or UNAVAILABLE.
    everything = collections.Counter(c.code.name for c in calls)
    assert set(everything) <= {"OK", "UNAVAILABLE"}, everything

    # No answer without its audit entry; every alert answered is stored; the log verifies.
    answered = [c for c in calls if c.code == grpc.StatusCode.OK]
    assert any(c.alert_ids for c in answered), "no alert was raised: the load is not realistic"
    logged = {
        e.get("decision_id") for e in verified_entries(tmp_path / "data", tmp_path / "x", pg_url)
    }
    missing = [c.decision_id for c in answered if c.decision_id not in logged]
    assert len(missing) == 0, f"{len(missing)} answered decisions are not in the audit log"
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        stored = {r[0] for r in conn.exec_driver_sql("SELECT alert_id FROM alerts")}
    engine.dispose()
    assert {a for c in answered for a in c.alert_ids} <= stored
