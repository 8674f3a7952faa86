"""SIGKILL during a Reniec bulk import: nothing acknowledged is lost, nothing half-written is
visible, the index catches up with the store, and the import resumes to the exact count.

The server is the production entry point (``centinela serve``) in a subprocess, on SQLite and on
PostgreSQL (a fresh schema of the machine's; the killed process's sessions end with it). A
CSV file of templates is imported the way ``centinela registry import`` does it (the same
file reader and client call; streams of two 100-record messages), and the server is killed
with SIGKILL twice:

1. in the middle of a stream, the moment the store shows the stream's first row (its two
   messages sent, the stream still open, its transactions running);
2. after a restart, the instant a stream's acknowledgment reaches the client.

After each kill, offline on what the dead process left: the audit log verifies (``centinela
audit export`` + ``verify``); every template of every acknowledged stream is stored and
decrypts to the file's vector; every message is stored whole or not at all (one transaction
per message); no DNI has two templates; every acknowledged stream's entry is in the log with
its counts. After each restart the index catches up to exactly the stored count. Finally the
real command line resumes the import from two batches before the first gap (re-sent batches
count as unchanged) and the registry holds exactly the file.

Every stored message has its own ``IMPORTED`` entry (they commit together), so the batches
the log says were accepted are exactly the batches in the store, the killed stream's
included.
"""

from __future__ import annotations

import csv
import json
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import sqlalchemy as sa

from centinela.clients import registry_cli
from centinela.clients.client import CentinelaClient
from centinela.clients.errors import ClientError
from centinela.clients.registry_file import FileBatch, read_batches
from centinela.clients.retry import NO_RETRY
from centinela.clients.tls import TlsMaterial
from centinela.matcher.keys import FileKeyProvider
from centinela.matcher.service import REGISTRY
from centinela.matcher.store import TemplateStore
from centinela.matcher.synth import identities
from centinela.policy.bundle import Bundle
from centinela.server import certs
from centinela.storage import make_engine
from centinela.v1 import common_pb2
from centinela.v1 import registry_service_pb2 as rpb

from ._postgres import PrivatePostgres
from ._proc import sigkill, start_serve, terminate, verified_entries

RENIEC = "reniec"  # the dev identity of the Reniec data owner
ROWS = 2000
BATCH = 100
PER_STREAM = 2
REFERENCE = "RES-REN-2026-0900"
DNIS = [f"{41_000_000 + i:08d}" for i in range(ROWS)]


def _write_file(path: Path, model_id: str, vecs: npt.NDArray[np.float32]) -> None:
    with path.open("w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["dni", "model_id", "vector"])
        for d, v in zip(DNIS, vecs, strict=True):
            w.writerow([d, model_id, json.dumps([round(float(x), 7) for x in v])])


def _file_vectors(path: Path) -> dict[str, npt.NDArray[np.float32]]:
    """The vectors as the server receives them (parsed from the file, float32)."""
    with path.open(newline="") as handle:
        return {
            row["dni"]: np.asarray(json.loads(row["vector"]), dtype=np.float32)
            for row in csv.DictReader(handle)
        }


def _stored(data_dir: Path, database_url: str | None = None) -> dict[str, npt.NDArray[np.float32]]:
    """Offline: every live registry template, decrypted, by its subject's DNI in the file.

    Fails on a template whose subject is no DNI of the file, on a DNI with two live
    templates, and on a ciphertext that does not decrypt (half-written or torn).
    """
    engine = make_engine(database_url or f"sqlite:///{data_dir / 'centinela.db'}")
    try:
        store = TemplateStore(engine, FileKeyProvider(data_dir / "keys"))
        by_ref = {}
        for dni in DNIS:
            ref = store.find_subject("reniec", dni)
            if ref is not None:
                by_ref[ref] = dni
        live: dict[str, str] = {}
        for change in store.changes_since(0, gallery=REGISTRY, limit=10 * ROWS):
            if change.deleted:
                live.pop(change.template_id, None)
                continue
            assert change.subject_ref in by_ref, "a template of no subject of the file"
            live[change.template_id] = change.subject_ref
        assert len(set(live.values())) == len(live), "a DNI with two live templates"
        out: dict[str, npt.NDArray[np.float32]] = {}
        for change in store.changes_since(0, gallery=REGISTRY, limit=10 * ROWS):
            if change.template_id in live and not change.deleted:
                out[by_ref[change.subject_ref]] = store.open_template(change)
        return out
    finally:
        engine.dispose()


def _check_offline(
    data_dir: Path,
    expected: dict[str, npt.NDArray[np.float32]],
    acked: list[FileBatch],
    answers: list[rpb.ImportTemplatesResponse],
    export: Path,
    database_url: str | None = None,
) -> tuple[int, set[str]]:
    """What a killed server left: a log that verifies with every acknowledged stream's entry,
    every acknowledged template durable and intact, each message whole or absent. Returns
    the number of stored templates and the decision ids in the log."""
    entries = verified_entries(data_dir, export, database_url)
    imported = [
        e for e in entries if e.get("type") == "REGISTRY_CHANGE" and e.get("outcome") == "IMPORTED"
    ]
    for a in answers:
        mine = [e for e in imported if e["decision_id"] == a.decision.decision_id]
        assert sum(e["metrics"]["accepted"] for e in mine) == a.accepted, "acked, not audited"
    stored = _stored(data_dir, database_url)
    missing = [d for b in acked for d in _batch_dnis(b) if d not in stored]
    assert len(missing) == 0, f"{len(missing)} acknowledged templates are not durable"
    whole: set[int] = set()
    for start in range(0, ROWS, BATCH):
        here = sum(d in stored for d in DNIS[start : start + BATCH])
        assert here in (0, BATCH), f"message {start // BATCH} is stored in part ({here} rows)"
        if here:
            whole.add(start // BATCH)
    # No stored message without its entry, and no entry for a message that is not stored.
    audited = {int(e["metrics"]["batch"]) for e in imported if e["metrics"]["accepted"]}
    assert audited == whole, f"audited batches {sorted(audited)}, stored {sorted(whole)}"
    bad = [d for d, vec in stored.items() if not np.array_equal(vec, expected[d])]
    assert len(bad) == 0, f"{len(bad)} stored templates differ from the file"
    return len(stored), {str(e.get("decision_id")) for e in entries}


def _wait_for_rows(
    data_dir: Path, rows: int, database_url: str = "", timeout: float = 60.0
) -> None:
    """Poll the live server's database (read-only) until it holds ``rows`` registry rows."""
    if database_url:
        _wait_for_pg_rows(database_url, rows, timeout)
        return
    db = sqlite3.connect(f"file:{data_dir / 'centinela.db'}?mode=ro", uri=True, timeout=30)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            (count,) = db.execute(
                "SELECT count(*) FROM matcher_templates WHERE gallery = ?", (REGISTRY,)
            ).fetchone()
            if count >= rows:
                return
            time.sleep(0.001)
        raise AssertionError("the stream in flight stored nothing")
    finally:
        db.close()


def _batch_dnis(batch: FileBatch) -> list[str]:
    return [r.dni for r in batch.message.records]


def _client(data_dir: Path, port: int) -> CentinelaClient:
    tls = TlsMaterial.from_data_dir(data_dir, RENIEC)
    return CentinelaClient(f"127.0.0.1:{port}", tls=tls, timeout=60, retry=NO_RETRY)


def _cli(port: int, data_dir: Path) -> list[str]:
    return ["--server", f"127.0.0.1:{port}", "--data-dir", str(data_dir), "--identity", RENIEC]


def _caught_up(capsys: pytest.CaptureFixture[str], port: int, data_dir: Path, rows: int) -> None:
    """``centinela registry status --wait``: the index holds exactly the stored rows."""
    code = registry_cli.main(
        ["status", "--wait", "60", "--poll", "0.2", "--json", *_cli(port, data_dir)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    status = json.loads(out.strip().splitlines()[-1])
    assert status["index_lag"] == 0
    assert status["indexed"] == status["durable"] == rows


@pytest.mark.slow
@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_sigkill_during_import_then_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], db: str, request: pytest.FixtureRequest
) -> None:
    database_url = "" if db == "sqlite" else str(request.getfixturevalue("pg_url"))
    data_dir = tmp_path / "data"
    certs.init_dev_pki(data_dir / "certs")
    model_id = str(Bundle.load("interim").config["galleries"][REGISTRY]["model_id"])
    env = {"CENTINELA_FACE_MODEL_ID": model_id, "CENTINELA_POLICY_BUNDLE": "interim"}
    if database_url:
        env["CENTINELA_DATABASE_URL"] = database_url
    path = tmp_path / "reniec.csv"
    _write_file(path, model_id, identities(ROWS, seed=91))
    expected = _file_vectors(path)
    log = tmp_path / "server.log"
    batches = list(
        read_batches(
            path,
            "csv",
            default_model="",
            size=BATCH,
            context=common_pb2.RequestContext(reference=REFERENCE),
        )
    )
    assert len(batches) == ROWS // BATCH
    groups = [batches[i : i + PER_STREAM] for i in range(0, len(batches), PER_STREAM)]
    acked: list[FileBatch] = []
    answers: list[rpb.ImportTemplatesResponse] = []

    # ---- 1. five streams acknowledged, the server killed in the middle of the sixth ------
    proc, port = start_serve(data_dir, log, env)
    killed = threading.Event()

    def doomed(group: list[FileBatch]) -> Iterator[rpb.ImportTemplatesRequest]:
        yield group[0].message
        yield group[1].message
        _wait_for_rows(data_dir, len(acked) * BATCH + 1, database_url)
        killed.set()
        sigkill(proc)

    with _client(data_dir, port) as client:
        for group in groups[:5]:
            answers.append(client.import_templates([b.message for b in group], timeout=60))
            acked += group
        with pytest.raises(ClientError) as failure:
            client.import_templates(doomed(groups[5]), timeout=60)
    assert killed.wait(30), failure.value.diagnostics()
    proc.wait(30)
    assert failure.value.code.name == "UNAVAILABLE"
    assert sum(a.accepted for a in answers) == len(acked) * BATCH
    stored, _ = _check_offline(
        data_dir, expected, acked, answers, tmp_path / "export-1", database_url or None
    )
    assert len(acked) * BATCH <= stored <= (len(acked) + PER_STREAM) * BATCH

    # ---- 2. restart: caught up; one more stream, the server killed as its ack arrives ----
    proc, port = start_serve(data_dir, log, env)
    _caught_up(capsys, port, data_dir, stored)
    with _client(data_dir, port) as client:
        group = groups[6]
        answer = client.import_templates([b.message for b in group], timeout=60)
        sigkill(proc)
    answers.append(answer)
    acked += group
    stored, _ = _check_offline(
        data_dir, expected, acked, answers, tmp_path / "export-2", database_url or None
    )

    # ---- 3. restart: caught up; the command line resumes and finishes the file ----------
    proc, port = start_serve(data_dir, log, env)
    try:
        _caught_up(capsys, port, data_dir, stored)
        resume_from = 8  # two batches before the first one that may be missing (10)
        code = registry_cli.main(
            [
                "import",
                str(path),
                "--reference",
                REFERENCE,
                "--batch-size",
                str(BATCH),
                "--batches-per-stream",
                str(PER_STREAM),
                "--resume-from-batch",
                str(resume_from),
                "--quiet",
                "--json",
                *_cli(port, data_dir),
            ]
        )
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert code == 0, summary
        resent = ROWS - resume_from * BATCH
        assert summary["rows"] == resent
        assert summary["rejected"] == 0
        assert summary["unchanged"] == stored - resume_from * BATCH  # re-sent: no change
        assert summary["accepted"] == ROWS - stored
        _caught_up(capsys, port, data_dir, ROWS)
    finally:
        assert terminate(proc) == 0

    # ---- offline: exactly the file, and a log that verifies -----------------------------
    final, logged = _check_offline(
        data_dir, expected, batches, answers, tmp_path / "export-3", database_url or None
    )
    assert final == ROWS
    assert set(summary["decision_ids"]) <= logged


def _wait_for_pg_rows(database_url: str, rows: int, timeout: float = 60.0) -> None:
    engine = make_engine(database_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                count = conn.execute(
                    sa.text("SELECT count(*) FROM matcher_templates WHERE gallery = :g"),
                    {"g": REGISTRY},
                ).scalar_one()
            if count >= rows:
                return
            time.sleep(0.005)
        raise AssertionError(f"the import stored fewer than {rows} rows")
    finally:
        engine.dispose()


@pytest.mark.slow
def test_postgres_stopped_during_import_then_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], own_postgres: PrivatePostgres
) -> None:
    """PostgreSQL is stopped, as the service is stopped, while ``centinela registry import``
    runs against ``centinela serve``: the command fails and says from which batch to resume;
    with PostgreSQL back, the same server (not restarted) holds every message whole or not
    at all, each with its entry in a log that verifies; the command resumed from its hint
    finishes the file, and the index catches up to exactly the file."""
    pg = own_postgres
    data_dir = tmp_path / "data"
    certs.init_dev_pki(data_dir / "certs")
    model_id = str(Bundle.load("interim").config["galleries"][REGISTRY]["model_id"])
    env = {
        "CENTINELA_FACE_MODEL_ID": model_id,
        "CENTINELA_POLICY_BUNDLE": "interim",
        "CENTINELA_DATABASE_URL": pg.url,
    }
    path = tmp_path / "reniec.csv"
    _write_file(path, model_id, identities(ROWS, seed=92))
    expected = _file_vectors(path)
    argv = [
        sys.executable, "-m", "centinela.cli", "registry", "import", str(path),
        "--reference", REFERENCE, "--batch-size", str(BATCH),
        "--batches-per-stream", str(PER_STREAM), "--quiet",
    ]  # fmt: skip
    proc, port = start_serve(data_dir, tmp_path / "server.log", env)
    try:
        cli = subprocess.Popen(
            [*argv, *_cli(port, data_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        _wait_for_pg_rows(pg.url, 5 * BATCH)
        pg.stop("fast")
        _, err = cli.communicate(timeout=180)
        pg.start()
        hint = err.decode()
        assert cli.returncode != 0, hint
        # The client is told to retry later, not that the server is broken.
        assert hint.startswith("centinela registry import: UNAVAILABLE:"), hint
        found = re.search(r"--resume-from-batch (\d+)", hint)
        assert found, hint
        resume_from = int(found.group(1))

        # What the outage left, read with the database back and the server still up.
        stored, _ = _check_offline(data_dir, expected, [], [], tmp_path / "x-1", pg.url)
        assert 5 * BATCH <= stored < ROWS
        assert resume_from * BATCH <= stored, "the hint skips a batch that is not stored"

        done = subprocess.run(
            [*argv, "--resume-from-batch", str(resume_from), "--json", *_cli(port, data_dir)],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["rejected"] == 0
        assert summary["accepted"] == ROWS - stored
        _caught_up(capsys, port, data_dir, ROWS)
    finally:
        assert terminate(proc) == 0
    final, logged = _check_offline(data_dir, expected, [], [], tmp_path / "x-2", pg.url)
    assert final == ROWS
    assert set(summary["decision_ids"]) <= logged
