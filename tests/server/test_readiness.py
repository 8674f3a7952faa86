"""Health follows the audit log: a server whose store was altered behind it stops serving."""

from __future__ import annotations

import hashlib
import sqlite3
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from centinela.audit.entry import AuditEvent, Caller, EventType
from centinela.audit.log import AuditLog
from centinela.audit.stored_tree import Growth
from centinela.config import Settings
from centinela.errors import AuditUnavailable
from centinela.server.demo import populate
from centinela.server.testing import ServerThread
from centinela.v1 import match_service_pb2 as mpb
from centinela.v1 import match_service_pb2_grpc as mgrpc

STATUS = health_pb2.HealthCheckResponse


def _health(server: ServerThread) -> int:
    with server.channel("compliance") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status)


def _info(server: ServerThread) -> mpb.GetServerInfoResponse:
    with server.channel("compliance") as ch:
        info: mpb.GetServerInfoResponse = mgrpc.MatchServiceStub(ch).GetServerInfo(
            mpb.GetServerInfoRequest(), timeout=10
        )
        return info


def _entry(i: int) -> AuditEvent:
    return AuditEvent(
        EventType.MATCH_DECISION,
        request_id=f"req-{i:020d}x",
        caller=Caller("municipio-lima", "municipal", "op-7f3a9c2e51d4"),
        purpose="STOLEN_VEHICLE",
        site_id="portico-07",
        outcome="NO_HIT",
        rule_ids=["R1"],
    )


def test_an_altered_audit_store_turns_health_to_not_serving(settings: Settings) -> None:
    with ServerThread(settings) as server:
        assert server.app is not None
        log = server.app.components.audit
        for i in range(300):  # past 256 entries: a subtree hash is stored
            log.append_blocking(_entry(i))
        assert _health(server) == STATUS.SERVING
    # A DBA drops the trigger and rewrites a leaf under the stored subtree. The signed root,
    # read from the stored subtrees, still matches: the server starts.
    db = sqlite3.connect(str(settings.data_dir / "centinela.db"), isolation_level=None)
    db.execute("DROP TRIGGER audit_leaves_no_update")
    db.execute(
        "UPDATE audit_leaves SET leaf_hash = ? WHERE idx = 3",
        (hashlib.sha256(b"\x00{}").digest(),),
    )
    db.close()
    # The full check runs beside the service and takes milliseconds here: it usually faults
    # the log before the server's own start entry, and the server refuses to start; if the
    # start entry wins, the server starts and health turns. Either way no match is answered.
    refused: AuditUnavailable | None = None
    try:
        server = ServerThread(settings).start()
    except AuditUnavailable as exc:
        refused = exc
    if refused is not None:
        assert "altered" in str(refused)
        return
    try:
        _wait_not_serving(server)
        assert _info(server).audit_history_check == mpb.AUDIT_HISTORY_CHECK_FAILED
        world = populate(server, registry=False)
        with pytest.raises(grpc.RpcError) as err:
            world.stub("muni-miraflores").MatchFace(
                world.face_request(world.stranger()), timeout=30
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        world.close()
    finally:
        server.stop()


def test_server_info_reports_the_history_check_of_the_log_as_opened(settings: Settings) -> None:
    with ServerThread(settings) as server:
        assert server.app is not None
        for i in range(300):
            server.app.components.audit.append_blocking(_entry(i))
    db = sqlite3.connect(str(settings.data_dir / "centinela.db"))
    (opened_size,) = db.execute("SELECT COUNT(*) FROM audit_leaves").fetchone()
    db.close()
    with ServerThread(settings) as server:
        deadline = time.monotonic() + 30
        info = _info(server)
        while info.audit_history_check == mpb.AUDIT_HISTORY_CHECK_RUNNING:
            assert time.monotonic() < deadline, "the history check did not finish"
            time.sleep(0.05)
            info = _info(server)
        assert info.audit_history_check == mpb.AUDIT_HISTORY_CHECK_PASSED
        # What was there when the server opened the log: not its own start entry.
        assert info.audit_history_checked_size == opened_size > 300
        assert info.audit_size > opened_size


def test_a_faulted_audit_log_turns_health_to_not_serving_and_matches_unavailable(
    settings: Settings,
) -> None:
    """Deterministic: the writer hits a bug after a commit (a stand-in tree whose publish
    step raises, as in tests/audit/test_log.py), the log faults, health follows."""
    with ServerThread(settings) as server:
        assert server.app is not None
        log: AuditLog = server.app.components.audit
        world = populate(server, registry=False)
        stub = world.stub("muni-miraflores")
        assert stub.MatchFace(world.face_request(world.stranger()), timeout=30).decision
        assert _health(server) == STATUS.SERVING
        real = log._tree

        class Broken:
            size = real.size

            def grow(self, leaves: list[bytes]) -> Growth:
                return real.grow(leaves)

            def apply(self, _growth: Growth) -> None:
                raise RuntimeError("a bug")

        log._tree = Broken()  # type: ignore[assignment]
        with pytest.raises(grpc.RpcError) as err:
            stub.MatchFace(world.face_request(world.stranger()), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        _wait_not_serving(server)
        world.close()


def _wait_not_serving(server: ServerThread) -> None:
    deadline = time.monotonic() + 30
    while _health(server) != STATUS.NOT_SERVING:
        assert time.monotonic() < deadline, "health never left SERVING"
        time.sleep(0.2)
