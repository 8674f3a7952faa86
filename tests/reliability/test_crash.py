"""SIGKILL under concurrent MatchFace load: nothing a client was told is lost.

A real server runs in a subprocess (``benchmarks/_bench_server.py``: the real service on a
populated watchlist) and is killed with SIGKILL while 64 clients send probes, a quarter of
them of listed people. Afterwards, offline: every decision a client received is in the audit
log, every alert it received is in the outbox, and the log verifies. Then the server starts
again on the same data and serves.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from centinela.matcher import synth
from centinela.server import certs
from centinela.server.demo import MIRA_SITE, ts
from centinela.server.testing import secure_channel
from centinela.v1 import common_pb2 as c
from centinela.v1 import match_service_pb2 as mpb
from centinela.v1 import match_service_pb2_grpc as mgrpc

from ._proc import sigkill, start_bench_server, terminate, verified_entries

CLIENTS = 64  # concurrent MatchFace clients (issue 9: 64-way load)


@pytest.mark.slow
@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_sigkill_under_load_loses_no_answered_decision(
    tmp_path: Path, db: str, request: pytest.FixtureRequest
) -> None:
    """On SQLite and on PostgreSQL (where the killed process's sessions, its server lock's
    among them, end with its connections, so the restarted server takes the lock)."""
    database_url = "" if db == "sqlite" else str(request.getfixturevalue("pg_url"))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    proc, port = start_bench_server(data_dir, database_url=database_url)
    files = certs.client_files(data_dir / "certs", "muni-miraflores")
    identities = synth.identities(200, seed=5)  # what _bench_server enrolled
    received: list[tuple[str, list[str]]] = []
    lock = threading.Lock()
    stop = threading.Event()
    with secure_channel(f"127.0.0.1:{port}", files) as ch:
        model = mgrpc.MatchServiceStub(ch).GetServerInfo(mpb.GetServerInfoRequest(), timeout=30)
    model_id = model.galleries[0].model_id

    def client(k: int) -> None:
        with secure_channel(f"127.0.0.1:{port}", files) as ch:
            stub = mgrpc.MatchServiceStub(ch)
            i = k
            while not stop.is_set():
                vec = (
                    synth.genuine_probes(identities[i % 200][None, :], seed=i)[0]
                    if i % 4 == 0
                    else synth.identities(1, seed=50_000 + i)[0]
                )
                req = mpb.MatchFaceRequest(
                    context=c.RequestContext(
                        purpose=c.PURPOSE_WANTED_PERSON,
                        site_id=MIRA_SITE,
                        capture_time=ts(dt.datetime.now(dt.UTC)),
                        client_request_id=uuid.uuid4().hex,
                    ),
                    probe=c.FaceProbe(model_id=model_id, vector=vec.tolist(), quality=0.9),
                )
                try:
                    resp = stub.MatchFace(req, timeout=10)
                except grpc.RpcError as err:
                    if err.code() in (
                        grpc.StatusCode.CANCELLED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                    ):
                        continue  # shed (waiting bound, in-flight limit): send again
                    return  # the server is gone
                with lock:
                    received.append(
                        (resp.decision.decision_id, [x.alert_id for x in resp.candidates])
                    )
                i += CLIENTS

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(4.0)
    sigkill(proc)
    stop.set()
    for t in threads:
        t.join(30)
    assert len(received) > 20, "the load did not get going before the kill"
    answered_alerts = {a for _, alerts in received for a in alerts}
    assert answered_alerts, "no alert was answered before the kill"

    # Offline: export and verify the log the dead server left behind.
    logged = {
        e.get("decision_id")
        for e in verified_entries(data_dir, tmp_path / "export", database_url or None)
    }
    missing = [d for d, _ in received if d not in logged]
    assert missing == [], f"{len(missing)} answered decisions are not in the audit log"
    engine = sa.create_engine(database_url or f"sqlite:///{data_dir / 'centinela.db'}")
    with engine.connect() as conn:
        stored = {r[0] for r in conn.exec_driver_sql("SELECT alert_id FROM alerts")}
    engine.dispose()
    assert answered_alerts <= stored  # alerts commit with their decision's entry

    # The server comes back on the same data and serves.
    proc, port = start_bench_server(data_dir, database_url=database_url)
    try:
        with secure_channel(f"127.0.0.1:{port}", files) as ch:
            info = mgrpc.MatchServiceStub(ch).GetServerInfo(mpb.GetServerInfoRequest(), timeout=30)
            assert info.audit_size >= len(logged)
    finally:
        terminate(proc)
