"""``centinela audit …`` against a real server over mutual TLS, as a compliance officer runs it.

Commands are run through ``centinela.audit.cli.main`` (what ``centinela audit`` delegates to),
so the routing between the offline tools and the online ones is exercised too. Exports and
evidence packages are checked with the offline verifier (``centinela audit verify``) and with
the Merkle functions alone, as any RFC 9162 implementation would.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from centinela.audit.cli import main as audit_main
from centinela.audit.merkle import verify_inclusion
from centinela.config import Settings
from centinela.server.demo import World, admin_context, populate, rid
from centinela.server.testing import ServerThread
from centinela.v1 import audit_service_pb2 as apb
from centinela.v1 import audit_service_pb2_grpc as agrpc
from centinela.v1 import watchlist_service_pb2 as wpb

SECRETS = ("41234567", "42345678", "ABC-123", "ABC123")
# The in-process server logs to the same stdout (structlog console or JSON lines).
_SERVER_LOG = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[|\{\"(component|event)\")")


def own(text: str) -> str:
    """The tool's output without the in-process server's log lines."""
    return "".join(line for line in text.splitlines(True) if not _SERVER_LOG.match(line))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("compliance"), listen="127.0.0.1:0", shutdown_grace_s=1.0
    )
    with ServerThread(settings) as server:
        w = populate(server, registry=False)
        stub = w.stub("muni-miraflores")
        for call in (
            lambda: stub.MatchFace(w.face_request(w.genuine(0)), timeout=30),
            lambda: stub.MatchPlate(w.plate_request("ABC-123"), timeout=30),
            lambda: stub.MatchFace(w.face_request(w.stranger(), site="lav-cam-01"), timeout=30),
        ):
            with contextlib.suppress(grpc.RpcError):
                call()
        yield w
        w.close()


@pytest.fixture
def run(world: World, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    def _run(*argv: str, identity: str = "compliance") -> tuple[int, str, str]:
        args = [
            *argv,
            "--server",
            world.server.target,
            "--data-dir",
            str(world.server.settings.data_dir),
            "--identity",
            identity,
        ]
        code = audit_main(args)
        out, err = (own(t) for t in capsys.readouterr())
        for secret in SECRETS:
            assert secret not in out
            assert secret not in err
        return code, out, err

    return _run


def trusted_key(world: World, tmp_path: Path) -> Path:
    """The log's key as an officer obtains it out of band (here: from the server process)."""
    path = tmp_path / "trusted.pub"
    path.write_text(world.server.app.components.audit.verifier_key() + "\n")
    return path


def verify(export: Path, key: Path, *extra: str) -> int:
    return audit_main(["verify", str(export), "--trusted-key", str(key), *extra])


# ---- reading -------------------------------------------------------------------------------


def test_checkpoint_shows_a_verified_signed_note(run, world: World, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run("checkpoint", "--trusted-key", str(trusted_key(world, tmp_path)))
    assert code == 0
    assert "signature   valid (trusted key" in out
    assert "\u2014 centinela.local/audit " in out
    code, out, _ = run("checkpoint", "--json")
    doc = json.loads(out)
    assert doc["tree_size"] > 0
    assert len(doc["root"]) == 64


def test_events_table_json_and_csv(run) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run("events", "--type", "ADMIN_CHANGE", "--all")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["INDEX", "TIME", "TYPE"]
    assert all(" ADMIN_CHANGE " in line for line in lines[1:])
    assert len(lines) > 3
    code, out, _ = run("events", "--org", "muni-miraflores", "--json", "--all")
    docs = [json.loads(line) for line in out.strip().splitlines()]
    assert docs
    assert all(d["entry"]["caller"]["org"] == "muni-miraflores" for d in docs)
    code, out, _ = run("events", "--purpose", "stolen-vehicle", "--csv", "--all")
    rows = out.strip().splitlines()
    assert rows[0] == "index,time,type,org,site,purpose,outcome,rules,decision"
    assert len(rows) > 1
    assert all(",STOLEN_VEHICLE," in r for r in rows[1:])


def test_events_paging_by_token(run) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run("events", "--type", "ADMIN_CHANGE", "--page-size", "2")
    assert code == 0
    token = out.strip().splitlines()[-1].split("--page-token ")[1]
    first = [line.split()[0] for line in out.strip().splitlines()[1:-1]]
    code, out, _ = run(
        "events", "--type", "ADMIN_CHANGE", "--page-size", "2", "--page-token", token
    )
    second = [line.split()[0] for line in out.strip().splitlines()[1:] if line[0].isdigit()]
    assert len(first) == 2
    assert second
    assert int(second[0]) > int(first[-1])


def test_stats(run) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run("stats", "--json")
    doc = json.loads(out)
    assert code == 0
    assert doc["total_events"] > 10
    assert doc["by_municipality"]["muni-miraflores"] >= 3
    code, out, _ = run("stats", "--since", "1h")
    assert code == 0
    assert "match requests by site:" in out


def test_prove_verifies_locally(run, world: World, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key = str(trusted_key(world, tmp_path))
    code, out, _ = run("prove", "--index", "3", "--trusted-key", key)
    assert code == 0
    assert out.startswith("OK: entry 3 ")
    code, out, _ = run("prove", "--index", "2", "--size", "5", "--trusted-key", key, "--json")
    doc = json.loads(out)
    assert doc["verified"]
    assert doc["tree_size"] == 5
    assert doc["checkpoint_size"] >= 5


def test_prove_refuses_a_checkpoint_signed_by_another_key(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from centinela.audit.checkpoint import Signer

    other = tmp_path / "other.pub"
    other.write_text(Signer("centinela.local/audit", Ed25519PrivateKey.generate()).verifier_key())
    code, _, err = run("prove", "--index", "1", "--trusted-key", str(other))
    assert code == 1
    assert "SignatureError" in err


def test_tail_follows_new_events_and_hides_its_own_reads(run, world: World) -> None:  # type: ignore[no-untyped-def]
    start = dt.datetime.now(dt.UTC).isoformat()
    made: list[str] = []

    def other_officer() -> None:
        ch = world.server.channel("compliance")
        stub = agrpc.AuditServiceStub(ch)
        for _ in range(2):
            time.sleep(0.4)
            r = rid()
            made.append(r)
            stub.GetStats(apb.GetStatsRequest(), timeout=30, metadata=(("x-request-id", r),))
        ch.close()

    t = threading.Thread(target=other_officer)
    t.start()
    code, out, _ = run(
        "tail",
        "--type",
        "AUDIT_READ",
        "--since",
        start,
        "--interval",
        "0.2",
        "--duration",
        "2.5",
        "--json",
    )
    t.join()
    assert code == 0
    seen = [json.loads(line)["entry"]["request_id"] for line in out.strip().splitlines()]
    assert seen == made


def test_non_compliance_identity_is_refused(run) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run("events", identity="muni-miraflores")
    assert code == 3
    assert "R16" in err


# ---- export through the service ------------------------------------------------------------


def test_export_through_the_service_verifies_offline(run, world: World, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key = trusted_key(world, tmp_path)
    code, out, _ = run("export", "--out", str(tmp_path / "full"))
    assert code == 0
    assert "verified offline" in out
    assert verify(tmp_path / "full", key, "--state", str(tmp_path / "st.json")) == 0
    code, out, _ = run("export", "--out", str(tmp_path / "part"), "--from", "5", "--to", "11")
    assert code == 0
    assert (tmp_path / "part" / "range.json").exists()
    assert verify(tmp_path / "part", key) == 0
    # A later incremental export, tied to the kept state by --since.
    size = json.loads((tmp_path / "st.json").read_text())["size"]
    code, _, _ = run(
        "export", "--out", str(tmp_path / "inc"), "--from", str(size + 1), "--since", str(size)
    )
    assert code == 0
    assert verify(tmp_path / "inc", key, "--state", str(tmp_path / "st.json")) == 0


def test_altered_online_export_fails_verification(run, world: World, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key = trusted_key(world, tmp_path)
    assert run("export", "--out", str(tmp_path / "e"))[0] == 0
    entries = tmp_path / "e" / "entries.jsonl"
    lines = entries.read_bytes().splitlines(keepends=True)
    lines[4] = lines[4].replace(b'"outcome":"', b'"outcome":"X', 1)
    entries.write_bytes(b"".join(lines))
    assert verify(tmp_path / "e", key) == 1


def test_export_refuses_a_non_empty_directory(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("")
    code, _, err = run("export", "--out", str(tmp_path / "x"))
    assert code == 2
    assert "not empty" in err


# ---- evidence package ----------------------------------------------------------------------


def decision_of_a_change(world: World) -> tuple[str, int]:
    resp = world.admin().RegisterSite(
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


@pytest.fixture
def evidence(run, world: World, tmp_path: Path) -> tuple[Path, str, int]:  # type: ignore[no-untyped-def]
    decision_id, index = decision_of_a_change(world)
    decision_of_a_change(world)
    # Let a checkpoint cover later entries too, so the package needs a consistency proof.
    ch = world.server.channel("compliance")
    agrpc.AuditServiceStub(ch).GetInclusionProof(
        apb.GetInclusionProofRequest(index=world.server.app.components.audit.size - 1), timeout=30
    )
    ch.close()
    out = tmp_path / "evidence"
    code, text, _ = run(
        "evidence", "--decision", decision_id, "--out", str(out), "--reference", "FISCALIA-2026-77"
    )
    assert code == 0, text
    assert f"(audit entry {index})" in text
    return out, decision_id, index


def test_evidence_package_verifies_offline(evidence, world: World, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out, decision_id, index = evidence
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint",
        "entries.jsonl",
        "evidence.json",
        "inclusion-proof.json",
        "leaf-hashes.bin",
        "log.pub",
        "range.json",
    ]
    assert verify(out, trusted_key(world, tmp_path)) == 0
    # Any RFC 9162 implementation: the inclusion proof against the signed root.
    from centinela.audit.checkpoint import Verifier, open_checkpoint

    key = world.server.app.components.audit.verifier_key()
    cp = open_checkpoint(
        (out / "checkpoint").read_text(), [Verifier(key)], origin=key.split("+")[0]
    )
    proof = json.loads((out / "inclusion-proof.json").read_text())
    entry = (out / "entries.jsonl").read_bytes().rstrip(b"\n")
    import hashlib

    leaf = hashlib.sha256(b"\x00" + entry).digest()
    assert base64.b64decode(proof["leaf_hash"]) == leaf
    verify_inclusion(
        index, cp.size, leaf, [base64.b64decode(h) for h in proof["hashes"]], cp.root_hash
    )
    assert json.loads(entry)["decision_id"] == decision_id


def test_evidence_creation_is_audited(evidence, world: World) -> None:  # type: ignore[no-untyped-def]
    _, decision_id, _ = evidence
    log = world.server.app.components.audit
    docs = [json.loads(e) for e in log.entries(0, log.size)]
    exports = [
        d for d in docs if d["type"] == "EVIDENCE_EXPORT" and d["refs"]["target"] == decision_id
    ]
    assert len(exports) == 1
    assert exports[0]["refs"]["reference"] == "FISCALIA-2026-77"
    assert exports[0]["caller"]["org"] == "compliance"


@pytest.mark.parametrize("what", ["entry", "checkpoint", "prefix", "consistency", "key"])
def test_altered_evidence_package_fails(evidence, world: World, tmp_path: Path, what: str) -> None:  # type: ignore[no-untyped-def]
    out, _, _ = evidence
    if what == "entry":
        path = out / "entries.jsonl"
        path.write_bytes(path.read_bytes().replace(b'"outcome":"CHANGED"', b'"outcome":"READ"'))
    elif what == "checkpoint":
        lines = (out / "checkpoint").read_text().split("\n")
        lines[1] = str(int(lines[1]) + 1)
        (out / "checkpoint").write_text("\n".join(lines))
    elif what in ("prefix", "consistency"):
        doc = json.loads((out / "range.json").read_text())
        if not doc[what]:
            pytest.skip(f"this entry's package has no {what} hashes")
        doc[what][0] = base64.b64encode(b"\x00" * 32).decode()
        (out / "range.json").write_text(json.dumps(doc))
    else:
        # A forger re-signs with their own key and ships it as log.pub: the officer's trusted
        # key is not fooled, because log.pub is never trusted.
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from centinela.audit.checkpoint import Signer

        signer = Signer("centinela.local/audit", Ed25519PrivateKey.generate())
        body = (out / "checkpoint").read_text().split("\n\n")[0] + "\n"
        (out / "checkpoint").write_text(signer.sign(body))
        (out / "log.pub").write_text(signer.verifier_key() + "\n")
    assert verify(out, trusted_key(world, tmp_path)) == 1


def test_evidence_refuses_an_unknown_decision(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(
        "evidence",
        "--decision",
        "dec_" + "f" * 24,
        "--out",
        str(tmp_path / "o"),
        "--reference",
        "CASE-000001",
    )
    assert code == 3
    assert "decision" in err


def test_offline_commands_still_route_offline(world: World, tmp_path: Path) -> None:
    """``export`` without --server/--identity is the offline exporter on the data directory."""
    code = audit_main(["export", "--help"])
    assert code == 0
    assert audit_main(["nonsense"]) == 2
