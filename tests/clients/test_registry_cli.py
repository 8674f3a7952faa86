"""``centinela registry`` run in-process (its ``main(argv)``) against a real server over mTLS.

A Reniec certificate with roles ``admin`` and ``registry`` is issued by the dev CA for these
tests (as in ``tests/server/test_registry_service.py``).
"""

from __future__ import annotations

import csv
import io
import json
import re
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from centinela import cli
from centinela.clients import registry_cli
from centinela.config import Settings
from centinela.matcher.service import REGISTRY
from centinela.matcher.synth import identities
from centinela.policy.bundle import Bundle
from centinela.server import certs
from centinela.server.testing import ServerThread

RENIEC = "reniec-test-admin"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("registry-cli")
    bundle = "interim"
    settings = Settings(
        data_dir=tmp / "data",
        listen="127.0.0.1:0",
        shutdown_grace_s=1.0,
        policy_bundle=bundle,
        face_model_id=Bundle.load(bundle).config["galleries"][REGISTRY]["model_id"],
    )
    server = ServerThread(settings).start()
    ca = certs.TlsFiles(*(server.certs_dir / n for n in ("ca.crt", "ca.key", "ca.crt")))
    ident = certs.DevIdentity(RENIEC, "reniec", "reniec", ("admin", "registry"))
    certs.issue_client(ca, server.certs_dir, ident)
    try:
        yield server
    finally:
        server.stop()


def conn(srv: ServerThread, identity: str = RENIEC) -> list[str]:
    return [
        "--server",
        srv.target,
        "--data-dir",
        str(srv.settings.data_dir),
        "--identity",
        identity,
    ]


_SERVER_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


def own(text: str) -> str:
    """The tool's output without the in-process server's log lines (same stdout)."""
    return "".join(line for line in text.splitlines(True) if not _SERVER_LOG.match(line))


def run(capsys: pytest.CaptureFixture[str], argv: Sequence[str]) -> tuple[int, str, str]:
    code = registry_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, own(out), own(err)


def model(srv: ServerThread) -> str:
    return str(srv.app.components.face_model_id)


def write_csv(
    path: Path, dnis: Sequence[str], vecs: npt.NDArray[np.float32], model_id: str
) -> Path:
    with path.open("w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["dni", "model_id", "vector"])
        for d, v in zip(dnis, vecs, strict=True):
            w.writerow([d, model_id, json.dumps([round(float(x), 7) for x in v])])
    return path


def dnis(n: int, start: int) -> list[str]:
    return [f"{start + i:08d}" for i in range(n)]


def test_import_csv_with_rejects_and_summary(
    srv: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids, vecs = dnis(2500, 40_000_000), identities(2500, seed=40)
    path = write_csv(tmp_path / "reniec.csv", ids, vecs, model(srv))
    with path.open("a", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["4000250", model(srv), json.dumps(vecs[0].tolist())])  # 7 digits
        w.writerow(["40002501", model(srv), "[1, 2, oops]"])  # unparseable vector
        w.writerow(["40002502", "other-model:1", json.dumps(vecs[1].tolist())])
    code, out, err = run(
        capsys, ["import", str(path), "--reference", "RES-REN-2026-10", *conn(srv)]
    )
    assert code == registry_cli.EXIT_REJECTS
    assert "imported reniec.csv: 2,503 records in 3 batches" in out
    assert "accepted 2,500  unchanged 0  rejected 3" in out
    assert "line 2502 (batch 2): dni: must be exactly 8 digits" in out
    assert "line 2503 (batch 2): vector: is not a JSON list of numbers" in out
    assert "line 2504 (batch 2): model_id:" in out
    assert "rows 2,503/2,503 (100%)" in err  # the final progress line
    for d in ("4000250", "40002501", "40002502", ids[0]):
        assert d not in out + err  # never a DNI in the output


def test_reimport_and_resume_are_idempotent(
    srv: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids, vecs = dnis(300, 41_000_000), identities(300, seed=41)
    path = write_csv(tmp_path / "r.csv", ids, vecs, model(srv))
    args = ["import", str(path), "--reference", "RES-REN-2026-11", "--batch-size", "100"]
    code, out, _ = run(capsys, [*args, "--json", "--quiet", *conn(srv)])
    assert code == 0
    first = json.loads(out)
    assert (first["accepted"], first["unchanged"], first["batches"]) == (300, 0, 3)
    code, out, _ = run(capsys, [*args, "--resume-from-batch", "2", "--json", "--quiet", *conn(srv)])
    assert code == 0
    resumed = json.loads(out)
    assert (resumed["rows"], resumed["accepted"], resumed["unchanged"]) == (100, 0, 100)


def test_import_jsonl_with_space_separated_vectors(
    srv: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids, vecs = dnis(5, 42_000_000), identities(5, seed=42)
    path = tmp_path / "r.jsonl"
    with path.open("w") as handle:
        for d, v in zip(ids, vecs, strict=True):
            vec = " ".join(f"{x:.7f}" for x in v)
            handle.write(json.dumps({"dni": d, "vector": vec}) + "\n\n")
    code, out, _ = run(
        capsys,
        ["import", str(path), "--model-id", model(srv), "--reference", "RES-12", *conn(srv)],
    )
    assert code == 0, out
    assert "accepted 5" in out


def test_remove_object_withdraw_status(
    srv: ServerThread,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids, vecs = dnis(2, 43_000_000), identities(2, seed=43)
    path = write_csv(tmp_path / "r.csv", ids, vecs, model(srv))
    assert run(capsys, ["import", str(path), "--reference", "RES-13", *conn(srv)])[0] == 0
    code, out, _ = run(capsys, ["object", ids[0], "--reference", "OBJ-2026-13", *conn(srv)])
    assert code == 0
    assert out.startswith("objection recorded for subject sub_")
    code, out, _ = run(
        capsys, ["withdraw", ids[0], "--reference", "OBJ-2026-13W", "--json", *conn(srv)]
    )
    assert code == 0
    assert json.loads(out)["subject_ref"].startswith("sub_")
    monkeypatch.setattr("sys.stdin", io.StringIO(ids[1] + "\n"))  # DNI kept out of argv
    code, out, _ = run(capsys, ["remove", "-", "--reference", "RES-13R", *conn(srv)])
    assert code == 0
    assert out.startswith("removed 1 template(s) from the registry")
    code, out, _ = run(capsys, ["status", "--wait", "60", "--poll", "0.1", "--json", *conn(srv)])
    assert code == 0
    doc = json.loads(out)
    assert doc["searchable"] is True
    assert int(doc["durable"]) == int(doc["indexed"])


def test_denied_caller_exit_code_and_hint(
    srv: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(tmp_path / "r.csv", ["44000000"], identities(1, seed=44), model(srv))
    code, _, err = run(
        capsys, ["import", str(path), "--reference", "RES-14", *conn(srv, "pnp-admin")]
    )
    assert code == 3
    assert "PERMISSION_DENIED" in err
    assert "what to do:" in err
    assert "resume with" not in err  # a denial is not resumable
    code, out, _ = run(capsys, ["status", "--json", *conn(srv, "muni-miraflores")])
    assert code == 3
    assert json.loads(out)["error"]["code"] == "PERMISSION_DENIED"


def test_unavailable_server_says_how_to_resume(
    srv: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_csv(tmp_path / "r.csv", ["45000000"], identities(1, seed=45), model(srv))
    argv = ["import", str(path), "--reference", "RES-15", "--timeout", "2"]
    argv += [*conn(srv), "--server", f"127.0.0.1:{port}"]
    code, _, err = run(capsys, argv)
    assert code == 4
    assert "UNAVAILABLE" in err
    assert "--resume-from-batch 0" in err


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["import", "FILE", "--reference", "R-1", "--batch-size", "5000"], "--batch-size"),
        (["import", "FILE"], "--reference"),
        (["import", "FILE.txt", "--reference", "R-1"], "--format"),
        (["remove", "12345678"], "--reference"),
    ],
)
def test_usage_errors_exit_2(
    srv: ServerThread,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    field: str,
) -> None:
    (tmp_path / "r.csv").write_text("dni,model_id,vector\n")
    (tmp_path / "r.txt").write_text("dni,model_id,vector\n")
    argv = [
        a.replace("FILE.txt", str(tmp_path / "r.txt")).replace("FILE", str(tmp_path / "r.csv"))
        for a in argv
    ]
    code, _, err = run(capsys, [*argv, *conn(srv)])
    assert code == 2
    assert field in err


def test_missing_certificate_is_a_usage_error(
    srv: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, ["status", *conn(srv, "nobody")])
    assert code == 2
    assert "--identity" in err or "--cert" in err


def test_default_identity_is_reniec() -> None:
    args = registry_cli.build_parser().parse_args(["status"])
    assert args.identity is None
    assert registry_cli.DEFAULT_IDENTITY == "reniec"


def test_the_centinela_command_delegates(
    srv: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["registry", "status", *conn(srv)])
    out = own(capsys.readouterr().out)
    assert code == 0
    assert out.startswith("registry: durable ")
