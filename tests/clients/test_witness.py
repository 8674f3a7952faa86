"""``centinela audit witness`` against attackers who hold the server's database (and its key).

Each attack is what an operator with access to the data directory can really do: the
append-only triggers are only SQL, so they drop them, rewrite or truncate history, remove the
signed checkpoints that would stop the server from starting, and restart it, so that the
server signs the new history itself. With the signing key stolen too, they sign a conflicting
checkpoint of the very size the witness kept. The witness, kept on another host, catches every
one of them, and exits non-zero without updating its state.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from centinela.audit.checkpoint import Checkpoint, Signer, sign_checkpoint
from centinela.audit.cli import main as audit_main
from centinela.audit.keys import load_signing_key
from centinela.audit.merkle import MerkleTree
from centinela.config import Settings
from centinela.errors import InconsistentCheckpointError
from centinela.server.demo import admin_context, rid
from centinela.server.testing import ServerThread
from centinela.v1 import watchlist_service_pb2 as wpb
from centinela.v1 import watchlist_service_pb2_grpc as wgrpc

ORIGIN = "centinela.local/audit"
_SERVER_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


def settings_for(data_dir: Path) -> Settings:
    """Checkpoints are cut on demand only (the tests say when, instead of a timer)."""
    return Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        shutdown_grace_s=1.0,
        checkpoint_every_entries=10_000,
        checkpoint_every_seconds=3600.0,
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def server(data_dir: Path) -> Iterator[ServerThread]:
    srv = ServerThread(settings_for(data_dir)).start()
    yield srv
    srv.stop()


def activity(srv: ServerThread, n: int) -> None:
    """Administrative changes: each one is an audit entry."""
    with srv.channel("pnp-admin") as ch:
        stub = wgrpc.WatchlistServiceStub(ch)
        for _ in range(n):
            stub.RegisterSite(
                wpb.RegisterSiteRequest(
                    context=admin_context(),
                    site=wpb.Site(
                        site_id="sjl-cam-" + rid()[:8],
                        municipality="muni-sjl",
                        region="lima",
                        kind=wpb.SITE_KIND_CAMERA,
                    ),
                ),
                timeout=30,
            )


def witness(
    srv: ServerThread, state: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str]:
    code = audit_main(
        [
            "witness",
            "--state",
            str(state),
            "--server",
            srv.target,
            "--data-dir",
            str(srv.settings.data_dir),
            *extra,
        ]
    )
    out, err = capsys.readouterr()
    text = "".join(line for line in (out + err).splitlines(True) if not _SERVER_LOG.match(line))
    return code, text


def tamper(data_dir: Path, sql: list[str], params: list[tuple[object, ...]] | None = None) -> None:
    """Run SQL on the stopped server's database, append-only triggers dropped first."""
    db = sqlite3.connect(data_dir / "centinela.db")
    try:
        for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'audit_%'"
        ).fetchall():
            db.execute(f'DROP TRIGGER "{name}"')
        for i, stmt in enumerate(sql):
            db.execute(stmt, (params or [])[i] if params and i < len(params) else ())
        db.commit()
    finally:
        db.close()


def rewrite_leaf(data_dir: Path, index: int) -> None:
    """Change one entry and give it a matching leaf hash (a careful attacker)."""
    db = sqlite3.connect(data_dir / "centinela.db")
    (entry,) = db.execute("SELECT entry FROM audit_leaves WHERE idx = ?", (index,)).fetchone()
    db.close()
    forged = bytes(entry).replace(b'"outcome":"', b'"outcome":"X', 1)
    assert forged != bytes(entry)
    tamper(
        data_dir,
        ["UPDATE audit_leaves SET entry = ?, leaf_hash = ? WHERE idx = ?"],
        [(forged, hashlib.sha256(b"\x00" + forged).digest(), index)],
    )


def kept(state: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads(state.read_text())
    return doc


def test_witness_follows_an_honest_log(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "witness.json"
    code, out = witness(server, state, capsys)
    assert code == 0
    assert "first checkpoint kept" in out
    assert "warning: trusting" in out
    first = kept(state)["size"]
    activity(server, 3)
    server.app.components.audit.checkpoint()  # what the server's checkpoint timer does
    code, out = witness(server, state, capsys)
    assert code == 0
    assert f"OK: size {first} -> " in out
    assert "consistent" in out
    code, out = witness(server, state, capsys)
    assert code == 0
    assert "OK" in out


def test_fork_by_rewriting_history_in_the_database_is_caught(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = ServerThread(settings_for(data_dir)).start()
    activity(srv, 4)
    state = tmp_path / "witness.json"
    assert witness(srv, state, capsys)[0] == 0
    before = state.read_text()
    srv.stop()

    # A rewritten leaf alone: the server refuses to open over it (its last checkpoint).
    rewrite_leaf(data_dir, 2)
    blocked = ServerThread(settings_for(data_dir))
    with pytest.raises(InconsistentCheckpointError):
        blocked.start()
    blocked.stop()
    # So the attacker also deletes the signed checkpoints and restarts: the server re-signs.
    tamper(data_dir, ["DELETE FROM audit_checkpoints"])
    srv = ServerThread(settings_for(data_dir)).start()
    try:
        activity(srv, 1)
        code, out = witness(srv, state, capsys)
    finally:
        srv.stop()
    assert code == 1
    assert "fork" in out
    assert "does not extend the kept tree" in out
    assert state.read_text() == before  # the witness keeps the history it trusted


def test_rollback_by_truncating_the_log_is_caught(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = ServerThread(settings_for(data_dir)).start()
    activity(srv, 5)
    state = tmp_path / "witness.json"
    assert witness(srv, state, capsys)[0] == 0
    srv.stop()
    tamper(data_dir, ["DELETE FROM audit_leaves WHERE idx >= 2", "DELETE FROM audit_checkpoints"])
    srv = ServerThread(settings_for(data_dir)).start()
    try:
        code, out = witness(srv, state, capsys)
    finally:
        srv.stop()
    assert code == 1
    assert "rollback" in out


def test_split_view_signed_with_the_stolen_key_is_caught(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The restarted server serves the forged checkpoint as its latest.
    srv = ServerThread(settings_for(data_dir)).start()
    activity(srv, 4)
    state = tmp_path / "witness.json"
    assert witness(srv, state, capsys)[0] == 0
    size = int(str(kept(state)["size"]))
    srv.stop()

    rewrite_leaf(data_dir, 1)
    db = sqlite3.connect(data_dir / "centinela.db")
    hashes = [bytes(h) for (h,) in db.execute("SELECT leaf_hash FROM audit_leaves ORDER BY idx")]
    db.close()
    key = load_signing_key(data_dir / "keys" / "audit-log.ed25519")
    forged = sign_checkpoint(
        Signer(ORIGIN, key), Checkpoint(ORIGIN, size, MerkleTree(hashes[:size]).root())
    )
    tamper(
        data_dir,
        [
            "DELETE FROM audit_checkpoints",
            "INSERT INTO audit_checkpoints (seq, tree_size, root_hash, note, created_at) "
            "VALUES (0, ?, ?, ?, '2026-11-21T00:00:00Z')",
        ],
        [(), (size, forged.root_hash, forged.note)],
    )
    srv = ServerThread(settings_for(data_dir)).start()
    try:
        code, out = witness(srv, state, capsys)
    finally:
        srv.stop()
    assert code == 1
    assert "split view" in out


def test_a_new_signing_key_is_refused(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = ServerThread(settings_for(data_dir)).start()
    activity(srv, 2)
    state = tmp_path / "witness.json"
    assert witness(srv, state, capsys)[0] == 0
    srv.stop()
    # The attacker without the key starts over with a new one (and drops the old checkpoints).
    (data_dir / "keys" / "audit-log.ed25519").unlink()
    tamper(data_dir, ["DELETE FROM audit_checkpoints"])
    srv = ServerThread(settings_for(data_dir)).start()
    try:
        code, out = witness(srv, state, capsys)
        pinned = tmp_path / "pinned.pub"
        pinned.write_text(str(kept(state)["verifier_key"]) + "\n")
        code2, _ = witness(srv, tmp_path / "fresh.json", capsys, "--trusted-key", str(pinned))
    finally:
        srv.stop()
    assert code == 1
    assert "SignatureError" in out
    assert code2 == 1
