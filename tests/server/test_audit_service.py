"""AuditService end to end over mutual TLS: filters, paging, proofs, the audit of audit reads.

The server is real (dev PKI, SQLite, the embedded Rego engine with the shipped bundle); audit
traffic comes from ``centinela.server.demo.populate`` plus match, plate and denied calls. Every
expectation is computed independently from the raw leaf bytes in the database, and every proof
is checked with the offline verifier's Merkle functions against the signed checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from centinela.audit.checkpoint import SignedCheckpoint, Verifier, open_checkpoint
from centinela.audit.merkle import root_from_inclusion_proof, verify_consistency, verify_inclusion
from centinela.config import Settings
from centinela.server.demo import World, populate, rid, serving_world
from centinela.server.testing import ServerThread
from centinela.v1 import audit_service_pb2 as apb
from centinela.v1 import audit_service_pb2_grpc as agrpc
from centinela.v1 import common_pb2 as c


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with serving_world(tmp_path_factory.mktemp("audit-svc"), registry=False) as w:
        traffic(w)
        yield w


def traffic(w: World) -> None:
    """Face and plate matches from two municipalities (allowed or denied: both are audited)."""
    sites = (("muni-miraflores", "mira-portico-01"), ("muni-la-victoria", "lav-cam-01"))
    for identity, site in sites:
        stub = w.stub(identity)
        requests: list[tuple[Any, Any]] = [
            (stub.MatchFace, w.face_request(w.genuine(0), site=site)),
            (stub.MatchFace, w.face_request(w.stranger(), site=site)),
            (stub.MatchPlate, w.plate_request("ABC-123", site=site)),
            # Another municipality's site: denied (R5) and audited.
            (stub.MatchFace, w.face_request(w.stranger(), site="nowhere-01")),
        ]
        for method, request in requests:
            with contextlib.suppress(grpc.RpcError):
                method(request, timeout=30)


def audit(w: World) -> agrpc.AuditServiceStub:
    ch = w.server.channel("compliance")
    w._channels.append(ch)
    return agrpc.AuditServiceStub(ch)


def leaves(w: World) -> list[bytes]:
    log = w.server.app.components.audit
    return list(log.entries(0, log.size))


def signed(w: World, resp: apb.GetCheckpointResponse) -> SignedCheckpoint:
    # The key is taken from the server process itself: out of band for the client.
    key = w.server.app.components.audit.verifier_key()
    return open_checkpoint(resp.signed_note, [Verifier(key)], origin=key.split("+")[0])


def all_pages(stub: agrpc.AuditServiceStub, req: apb.ListEventsRequest) -> list[apb.AuditEvent]:
    out: list[apb.AuditEvent] = []
    while True:
        page = stub.ListEvents(req, timeout=30)
        out.extend(page.events)
        if not page.next_page_token:
            return out
        req.page_token = page.next_page_token


def code(err: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return err.value.code()


# ---- checkpoint and proofs -------------------------------------------------------------------


def test_checkpoint_is_signed_and_commits_to_the_stored_leaves(world: World) -> None:
    resp = audit(world).GetCheckpoint(apb.GetCheckpointRequest(), timeout=30)
    cp = signed(world, resp)
    assert cp.size == resp.tree_size > 10
    assert cp.root_hash == resp.root_hash
    assert resp.origin == cp.origin
    hashes = [hashlib.sha256(b"\x00" + e).digest() for e in leaves(world)[: cp.size]]
    from centinela.audit.merkle import root

    assert root(hashes) == cp.root_hash


def test_inclusion_proofs_verify_against_the_signed_checkpoint(world: World) -> None:
    stub = audit(world)
    cp = signed(world, stub.GetCheckpoint(apb.GetCheckpointRequest(), timeout=30))
    for index in (0, 1, cp.size // 2, cp.size - 1):
        p = stub.GetInclusionProof(
            apb.GetInclusionProofRequest(index=index, tree_size=cp.size), timeout=30
        )
        leaf = hashlib.sha256(b"\x00" + p.entry).digest()
        assert leaf == p.leaf_hash
        verify_inclusion(index, cp.size, leaf, list(p.hashes), cp.root_hash)


def test_inclusion_proof_of_a_fresh_entry_cuts_a_covering_checkpoint(world: World) -> None:
    stub = audit(world)
    newest = world.server.app.components.audit.size - 1
    p = stub.GetInclusionProof(apb.GetInclusionProofRequest(index=newest), timeout=30)
    assert p.tree_size > newest
    cp = signed(world, stub.GetCheckpoint(apb.GetCheckpointRequest(), timeout=30))
    assert cp.size >= p.tree_size
    leaf = hashlib.sha256(b"\x00" + p.entry).digest()
    root_s = root_from_inclusion_proof(newest, p.tree_size, leaf, list(p.hashes))
    assert root_s == p.root_hash
    if cp.size > p.tree_size:
        cons = stub.GetConsistencyProof(
            apb.GetConsistencyProofRequest(first_size=p.tree_size, second_size=cp.size),
            timeout=30,
        )
        verify_consistency(p.tree_size, cp.size, root_s, cp.root_hash, list(cons.hashes))
    else:
        assert root_s == cp.root_hash


def test_consistency_proofs_between_sizes(world: World) -> None:
    stub = audit(world)
    cp = signed(world, stub.GetCheckpoint(apb.GetCheckpointRequest(), timeout=30))
    hashes = [hashlib.sha256(b"\x00" + e).digest() for e in leaves(world)]
    from centinela.audit.merkle import root

    for first in (1, 3, cp.size // 2, cp.size):
        resp = stub.GetConsistencyProof(
            apb.GetConsistencyProofRequest(first_size=first), timeout=30
        )
        assert resp.second_size == cp.size
        assert resp.first_root == root(hashes[:first])
        verify_consistency(first, cp.size, root(hashes[:first]), cp.root_hash, list(resp.hashes))


def test_proof_requests_out_of_range_are_invalid(world: World) -> None:
    stub = audit(world)
    size = world.server.app.components.audit.size
    for req in (
        apb.GetInclusionProofRequest(index=size + 10),
        apb.GetInclusionProofRequest(index=5, tree_size=5),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.GetInclusionProof(req, timeout=30)
        assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
    for creq in (
        apb.GetConsistencyProofRequest(first_size=0),
        apb.GetConsistencyProofRequest(first_size=5, second_size=3),
        apb.GetConsistencyProofRequest(first_size=1, second_size=size + 100),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.GetConsistencyProof(creq, timeout=30)
        assert code(err) == grpc.StatusCode.INVALID_ARGUMENT


# ---- filters and paging ----------------------------------------------------------------------


def expected(w: World, pred: Any, upto: int) -> list[int]:
    return [i for i, e in enumerate(leaves(w)[:upto]) if pred(json.loads(e))]


FILTERS: list[tuple[dict[str, Any], Any]] = [
    ({"event_type": "ADMIN_CHANGE"}, lambda d: d["type"] == "ADMIN_CHANGE"),
    (
        {"caller_org": "muni-miraflores"},
        lambda d: d.get("caller", {}).get("org") == "muni-miraflores",
    ),
    ({"site_id": "lav-cam-01"}, lambda d: d.get("site_id") == "lav-cam-01"),
    ({"outcome": "DENIED"}, lambda d: d.get("outcome") == "DENIED"),
    ({"rule_id": "R16"}, lambda d: "R16" in d.get("rule_ids", ())),
    (
        {"purpose": c.PURPOSE_STOLEN_VEHICLE},
        lambda d: d.get("purpose") == "STOLEN_VEHICLE",
    ),
    (
        {"caller_org": "muni-la-victoria", "event_type": "DENIAL"},
        lambda d: d.get("caller", {}).get("org") == "muni-la-victoria" and d["type"] == "DENIAL",
    ),
]


@pytest.mark.parametrize(("fields", "pred"), FILTERS, ids=[str(f[0]) for f in FILTERS])
def test_filters_return_exactly_the_matching_entries(
    world: World, fields: dict[str, Any], pred: Any
) -> None:
    stub = audit(world)
    upto = world.server.app.components.audit.size
    got = all_pages(stub, apb.ListEventsRequest(page_size=1000, **fields))
    indexes = [e.index for e in got if e.index < upto]
    assert indexes == expected(world, pred, upto)
    assert indexes, "the scenario must produce matching events"
    for e in got:
        assert hashlib.sha256(b"\x00" + e.entry).digest() == e.leaf_hash


def test_time_range_filter(world: World) -> None:
    entries = [json.loads(e) for e in leaves(world)]
    times = sorted(dt.datetime.fromisoformat(d["time"].replace("Z", "+00:00")) for d in entries)
    since, until = times[len(times) // 3], times[2 * len(times) // 3]
    req = apb.ListEventsRequest(page_size=1000)
    req.since.FromDatetime(since)
    req.until.FromDatetime(until)
    got = [e.index for e in all_pages(audit(world), req)]

    def inside(d: dict[str, Any]) -> bool:
        t = dt.datetime.fromisoformat(d["time"].replace("Z", "+00:00"))
        return since <= t < until

    want = expected(world, inside, len(entries))
    # Microsecond timestamps round-trip through protobuf exactly.
    assert got == want
    assert got


def test_paging_visits_every_match_once_in_order(world: World) -> None:
    stub = audit(world)
    upto = world.server.app.components.audit.size
    req = apb.ListEventsRequest(page_size=3, event_type="ADMIN_CHANGE")
    pages = 0
    seen: list[int] = []
    while True:
        page = stub.ListEvents(req, timeout=30)
        pages += 1
        assert len(page.events) <= 3
        seen.extend(e.index for e in page.events)
        if not page.next_page_token:
            break
        req.page_token = page.next_page_token
    assert pages > 1
    assert seen == sorted(set(seen))
    assert [i for i in seen if i < upto] == expected(
        world, lambda d: d["type"] == "ADMIN_CHANGE", upto
    )


def test_scan_budget_bounds_a_page_and_returns_a_cursor(world: World) -> None:
    servicer = world.server.app.servicers.audit
    servicer._scan_budget = 4
    try:
        stub = audit(world)
        upto = world.server.app.components.audit.size
        req = apb.ListEventsRequest(page_size=1000, caller_org="muni-la-victoria")
        got: list[int] = []
        empty_pages_with_token = 0
        while True:
            page = stub.ListEvents(req, timeout=30)
            if not page.events and page.next_page_token:
                empty_pages_with_token += 1
            got.extend(e.index for e in page.events)
            if not page.next_page_token:
                break
            req.page_token = page.next_page_token
    finally:
        servicer._scan_budget = None
    pred = lambda d: d.get("caller", {}).get("org") == "muni-la-victoria"  # noqa: E731
    assert [i for i in got if i < upto] == expected(world, pred, upto)
    assert empty_pages_with_token > 0


@pytest.mark.parametrize("token", ["garbage", "ev1.!!!", "ev1.OTk5OTk5OTk5", "12"])
def test_forged_page_tokens_are_refused(world: World, token: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        audit(world).ListEvents(apb.ListEventsRequest(page_token=token), timeout=30)
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_filters_are_refused(world: World) -> None:
    stub = audit(world)
    for req in (
        apb.ListEventsRequest(page_size=1001),
        apb.ListEventsRequest(caller_org="x' OR 1=1 --"),
        apb.ListEventsRequest(purpose=99),  # type: ignore[arg-type]
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.ListEvents(req, timeout=30)
        assert code(err) == grpc.StatusCode.INVALID_ARGUMENT


# ---- export and stats ------------------------------------------------------------------------


def test_export_streams_consecutive_entries_then_the_signed_note(world: World) -> None:
    stub = audit(world)
    chunks = list(stub.ExportEntries(apb.ExportEntriesRequest(start=2, end=9), timeout=30))
    events = [e for ch in chunks for e in ch.events]
    assert [e.index for e in events] == list(range(2, 9))
    assert [e.entry for e in events] == leaves(world)[2:9]
    assert chunks[-1].signed_note
    assert chunks[-1].verifier_key
    assert all(not ch.signed_note for ch in chunks[:-1])
    cp = open_checkpoint(
        chunks[-1].signed_note, [Verifier(chunks[-1].verifier_key)], origin="centinela.local/audit"
    )
    assert cp.size >= 9


def assert_counts(resp: apb.GetStatsResponse, counted: list[dict[str, Any]]) -> None:
    """GetStats' denials by rule and outcomes are those of the ``counted`` entries."""
    denials: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    for d in counted:
        if d["type"] == "DENIAL":
            for r in d.get("rule_ids") or ["-"]:
                denials[r] = denials.get(r, 0) + 1
        if "outcome" in d:
            outcomes[d["outcome"]] = outcomes.get(d["outcome"], 0) + 1
    assert dict(resp.denials_by_rule) == denials
    assert dict(resp.by_outcome) == outcomes


def test_stats_count_what_the_log_holds(world: World) -> None:
    resp = audit(world).GetStats(apb.GetStatsRequest(), timeout=30)
    docs = [json.loads(e) for e in leaves(world)]
    assert resp.total_events <= len(docs)
    counted = docs[: resp.total_events]
    assert_counts(resp, counted)
    match = [
        d
        for d in counted
        if d["type"] == "MATCH_DECISION" or (d["type"] == "DENIAL" and d.get("purpose"))
    ]
    assert sum(resp.by_municipality.values()) == len(match) > 0
    assert set(resp.by_site) <= {"mira-portico-01", "lav-cam-01", "nowhere-01"}
    since = apb.GetStatsRequest()
    since.since.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    assert audit(world).GetStats(since, timeout=30).total_events == 0


def _warmed(text: str) -> dict[str, int]:
    """The counts of the server's ``audit_stats.warmed`` log line in ``text`` (JSON or
    console rendering)."""
    for line in text.splitlines():
        if "audit_stats.warmed" in line:
            fields = dict(re.findall(r'"?(resumed_at|scanned)"?[=:] ?(\d+)', line))
            return {k: int(v) for k, v in fields.items()}
    raise AssertionError("no audit_stats.warmed line")


def test_a_restart_resumes_the_saved_statistics_instead_of_scanning_the_log(
    tmp_path: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    """A clean stop saves whole-log statistics (sealed, bound to the log's root); the next
    start resumes from them and counts only what came after, and GetStats stays exact."""
    settings = Settings(data_dir=tmp_path / "d", listen="127.0.0.1:0", shutdown_grace_s=1.0)
    with ServerThread(settings) as server:
        w = populate(server, registry=False)
        traffic(w)
        w.close()
    saved = json.loads((tmp_path / "d" / "audit-stats.json").read_text())["body"]
    assert saved["size"] == saved["stats"]["total"] > 10
    capfd.readouterr()
    with ServerThread(settings) as server:
        deadline, text = time.monotonic() + 30, ""
        while "audit_stats.warmed" not in text and time.monotonic() < deadline:
            time.sleep(0.05)
            out = capfd.readouterr()
            text += out.out + out.err
        warmed = _warmed(text)
        ch = server.channel("compliance")
        resp = agrpc.AuditServiceStub(ch).GetStats(apb.GetStatsRequest(), timeout=30)
        ch.close()
        log = server.app.components.audit
        docs = [json.loads(e) for e in log.entries(0, log.size)]
    # The stopping server counted every entry of its run, its own SERVICE_STOP included.
    assert docs[saved["size"] - 1]["type"] == "SERVICE_STOP"
    assert docs[saved["size"]]["type"] == "SERVICE_START"
    assert warmed["resumed_at"] == saved["size"]
    assert warmed["scanned"] <= 2  # what this run added before it warmed, nothing older
    assert resp.total_events >= saved["size"]
    assert_counts(resp, docs[: resp.total_events])


# ---- the audit of audit reads (R16) ----------------------------------------------------------


def find_by_request(w: World, request_id: str) -> list[dict[str, Any]]:
    return [d for d in map(json.loads, leaves(w)) if d.get("request_id") == request_id]


@pytest.mark.parametrize(
    ("rpc", "message"),
    [
        ("GetCheckpoint", apb.GetCheckpointRequest()),
        ("ListEvents", apb.ListEventsRequest(page_size=5)),
        ("GetInclusionProof", apb.GetInclusionProofRequest(index=1)),
        ("GetConsistencyProof", apb.GetConsistencyProofRequest(first_size=2)),
        ("GetStats", apb.GetStatsRequest()),
    ],
)
def test_every_read_is_audited_before_the_answer(world: World, rpc: str, message: Any) -> None:
    rid_ = rid()
    message.context.CopyFrom(c.RequestContext(client_request_id=rid_))
    getattr(audit(world), rpc)(message, timeout=30, metadata=(("x-request-id", rid_),))
    # The answer is back: its entry is already durable in the database.
    (entry,) = find_by_request(world, rid_)
    assert entry["type"] == "AUDIT_READ"
    assert entry["caller"] == {"kind": "compliance", "org": "compliance"}
    assert entry["outcome"] == "READ"
    assert "R16" in entry["rule_ids"]


def test_export_is_audited_with_its_range(world: World) -> None:
    rid_ = rid()
    list(
        audit(world).ExportEntries(
            apb.ExportEntriesRequest(start=1, end=4), timeout=30, metadata=(("x-request-id", rid_),)
        )
    )
    (entry,) = find_by_request(world, rid_)
    assert entry["metrics"] == {"entries": 3, "from_index": 1, "to_index": 4}


def test_audit_read_fails_closed_when_the_log_cannot_record_it(world: World) -> None:
    """The log is put in its faulted state (what a failed database write leaves), then healed:
    the only way to make a real append fail on demand without breaking the shared server."""
    log = world.server.app.components.audit
    log._fault = "simulated: the database refused the write"
    try:
        with pytest.raises(grpc.RpcError) as err:
            audit(world).ListEvents(apb.ListEventsRequest(), timeout=30)
        assert code(err) == grpc.StatusCode.UNAVAILABLE
    finally:
        log._fault = None


@pytest.mark.parametrize("identity", ["muni-miraflores", "pnp-admin", "pnp-national", "reniec"])
def test_non_compliance_callers_are_denied_and_the_denial_is_audited(
    world: World, identity: str
) -> None:
    ch = world.server.channel(identity)
    world._channels.append(ch)
    stub = agrpc.AuditServiceStub(ch)
    calls: list[Callable[[Any], Any]] = [
        lambda m: stub.GetCheckpoint(apb.GetCheckpointRequest(), timeout=30, metadata=m),
        lambda m: stub.ListEvents(apb.ListEventsRequest(), timeout=30, metadata=m),
        lambda m: stub.GetStats(apb.GetStatsRequest(), timeout=30, metadata=m),
        lambda m: stub.GetInclusionProof(
            apb.GetInclusionProofRequest(index=0), timeout=30, metadata=m
        ),
        lambda m: list(stub.ExportEntries(apb.ExportEntriesRequest(), timeout=30, metadata=m)),
    ]
    for call in calls:
        rid_ = rid()
        with pytest.raises(grpc.RpcError) as err:
            call((("x-request-id", rid_),))
        assert code(err) == grpc.StatusCode.PERMISSION_DENIED
        assert "R16" in (err.value.details() or "")
        (entry,) = find_by_request(world, rid_)
        assert entry["type"] == "DENIAL"
        assert "R16" in entry["rule_ids"]


# ---- evidence --------------------------------------------------------------------------------


def admin_decision(w: World) -> tuple[str, int]:
    from centinela.server.demo import admin_context
    from centinela.v1 import watchlist_service_pb2 as wpb

    resp = w.admin().RegisterSite(
        wpb.RegisterSiteRequest(
            context=admin_context(),
            site=wpb.Site(
                site_id="sjl-cam-" + rid()[:6],
                municipality="muni-sjl",
                region="lima",
                kind=wpb.SITE_KIND_CAMERA,
            ),
        ),
        timeout=30,
    )
    return resp.decision.decision_id, resp.decision.audit_index


def test_evidence_of_a_decision_verifies_and_its_creation_is_audited(world: World) -> None:
    decision_id, index = admin_decision(world)
    stub = audit(world)
    rid_ = rid()
    ev = stub.CreateEvidence(
        apb.CreateEvidenceRequest(
            context=c.RequestContext(reference="CASE-2026-0042", client_request_id=rid_),
            decision_id=decision_id,
        ),
        timeout=30,
        metadata=(("x-request-id", rid_),),
    )
    assert ev.event.index == index
    assert json.loads(ev.event.entry)["decision_id"] == decision_id
    cp = open_checkpoint(
        ev.signed_note, [Verifier(ev.verifier_key)], origin="centinela.local/audit"
    )
    assert cp.size == ev.tree_size > index
    leaf = hashlib.sha256(b"\x00" + ev.event.entry).digest()
    verify_inclusion(index, cp.size, leaf, list(ev.inclusion_proof), cp.root_hash)
    (entry,) = find_by_request(world, rid_)
    assert entry["type"] == "EVIDENCE_EXPORT"
    assert entry["refs"] == {"reference": "CASE-2026-0042", "target": decision_id}


@pytest.mark.parametrize(
    ("reference", "decision_id", "status"),
    [
        ("", "dec_000000000000000000000000", grpc.StatusCode.INVALID_ARGUMENT),
        ("ABC-123", "dec_000000000000000000000000", grpc.StatusCode.INVALID_ARGUMENT),
        ("CASE-2026-0042", "", grpc.StatusCode.INVALID_ARGUMENT),
        ("CASE-2026-0042", "dec_ffffffffffffffffffffffff", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_evidence_needs_a_reference_and_a_known_decision(
    world: World, reference: str, decision_id: str, status: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        audit(world).CreateEvidence(
            apb.CreateEvidenceRequest(
                context=c.RequestContext(reference=reference), decision_id=decision_id
            ),
            timeout=30,
        )
    assert code(err) == status


def test_denied_caller_learns_nothing_about_the_log(world: World) -> None:
    """Range checks that depend on the log's size run only after the policy allowed the call."""
    ch = world.server.channel("muni-miraflores")
    world._channels.append(ch)
    stub = agrpc.AuditServiceStub(ch)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetInclusionProof(apb.GetInclusionProofRequest(index=10**9), timeout=30)
    assert code(err) == grpc.StatusCode.PERMISSION_DENIED
    assert "size" not in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ExportEntries(apb.ExportEntriesRequest(end=10**9), timeout=30))
    assert code(err) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        stub.ListEvents(apb.ListEventsRequest(page_token="ev1.OTk5OTk5OTk5"), timeout=30)
    assert code(err) == grpc.StatusCode.PERMISSION_DENIED
