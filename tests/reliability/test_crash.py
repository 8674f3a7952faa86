"""SIGKILL under concurrent MatchFace load: nothing a client was told is lost.

A real server runs in a subprocess (``benchmarks/_bench_server.py``: the real service on a
populated watchlist) and is killed with SIGKILL while 16 clients send probes, a quarter of
them of listed people. Afterwards, offline: every decision a client received is in the audit
log, every alert it received is in the outbox, and the log verifies. Then the server starts
again on the same data and serves.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
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

ROOT = Path(__file__).resolve().parents[2]


def _start(data_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port_file = data_dir / "port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "_bench_server.py"),
            "--data-dir",
            str(data_dir),
            "--templates",
            "200",
            "--port-file",
            str(port_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not port_file.exists():
        assert proc.poll() is None, "server died at start"
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)
    return proc, int(port_file.read_text())


@pytest.mark.slow
def test_sigkill_under_load_loses_no_answered_decision(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    proc, port = _start(data_dir)
    files = certs.client_files(data_dir / "certs", "muni-miraflores")
    identities = synth.identities(200, seed=5)  # what _bench_server enrolled
    received: list[tuple[str, list[str]]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        with secure_channel(f"127.0.0.1:{port}", files) as ch:
            stub = mgrpc.MatchServiceStub(ch)
            model = stub.GetServerInfo(mpb.GetServerInfoRequest(), timeout=30).galleries[0]
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
                    probe=c.FaceProbe(model_id=model.model_id, vector=vec.tolist(), quality=0.9),
                )
                try:
                    resp = stub.MatchFace(req, timeout=10)
                except grpc.RpcError:
                    return  # the server is gone
                with lock:
                    received.append(
                        (resp.decision.decision_id, [x.alert_id for x in resp.candidates])
                    )
                i += 16

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    time.sleep(4.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    stop.set()
    for t in threads:
        t.join(30)
    assert len(received) > 20, "the load did not get going before the kill"
    answered_alerts = {a for _, alerts in received for a in alerts}
    assert answered_alerts, "no alert was answered before the kill"

    # Offline: export and verify the log the dead server left behind.
    export = tmp_path / "export"
    env = dict(os.environ)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "centinela.cli",
            "audit",
            "export",
            "--data-dir",
            str(data_dir),
            "--out",
            str(export),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    verify = subprocess.run(
        [
            sys.executable,
            "-m",
            "centinela.cli",
            "audit",
            "verify",
            str(export),
            "--trusted-key",
            str(export / "log.pub"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    logged = {
        json.loads(line).get("decision_id")
        for line in (export / "entries.jsonl").read_text().splitlines()
    }
    missing = [d for d, _ in received if d not in logged]
    assert missing == [], f"{len(missing)} answered decisions are not in the audit log"
    engine = sa.create_engine(f"sqlite:///{data_dir / 'centinela.db'}")
    with engine.connect() as conn:
        stored = {r[0] for r in conn.exec_driver_sql("SELECT alert_id FROM alerts")}
    engine.dispose()
    assert answered_alerts <= stored  # alerts commit with their decision's entry

    # The server comes back on the same data and serves.
    proc, port = _start(data_dir)
    try:
        with secure_channel(f"127.0.0.1:{port}", files) as ch:
            info = mgrpc.MatchServiceStub(ch).GetServerInfo(mpb.GetServerInfoRequest(), timeout=30)
            assert info.audit_size >= len(logged)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
