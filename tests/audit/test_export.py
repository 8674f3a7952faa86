"""Export then offline verification: full and partial ranges, state file, CLI exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from sqlalchemy.engine import Engine

from centinela.audit.cli import export_main, verify_main
from centinela.audit.export import export_log
from centinela.audit.log import AuditLog
from centinela.audit.verify import load_trusted_keys, verify_export
from centinela.errors import InvalidArgument

from .conftest import ORIGIN, sample_entry


def _fill(log: AuditLog, n: int) -> None:
    start = log.size
    for i in range(start, start + n):
        log.append_blocking(sample_entry(i))


def _trust(log: AuditLog, tmp_path: Path) -> Path:
    path = tmp_path / "trusted.pub"
    path.write_text(log.verifier_key() + "\n")
    return path


def test_full_export_verifies(audit_log: AuditLog, tmp_path: Path) -> None:
    _fill(audit_log, 77)
    out = tmp_path / "export"
    summary = export_log(audit_log, out)
    assert summary.tree_size == 77
    assert (summary.start, summary.end) == (0, 77)
    lines = (out / "entries.jsonl").read_bytes().split(b"\n")
    assert lines[:-1] == audit_log.entries(0, 77)
    assert lines[-1] == b""
    assert (out / "log.pub").read_text().strip() == audit_log.verifier_key()
    assert not (out / "range.json").exists()
    keys = load_trusted_keys(_trust(audit_log, tmp_path))
    report = verify_export(out, keys)
    assert report.entries == 77
    assert report.root_hash == audit_log.root(77).hex()


@pytest.mark.parametrize(
    ("start", "end"), [(0, 0), (0, 1), (1, 77), (5, 40), (64, 64), (76, 77), (13, 64)]
)
def test_partial_ranges_verify(audit_log: AuditLog, tmp_path: Path, start: int, end: int) -> None:
    _fill(audit_log, 77)
    out = tmp_path / "export"
    export_log(audit_log, out, start=start, end=end)
    keys = load_trusted_keys(_trust(audit_log, tmp_path))
    report = verify_export(out, keys)
    assert (report.start, report.end, report.tree_size) == (start, end, 77)


def test_state_file_follows_the_log_forward(audit_log: AuditLog, tmp_path: Path) -> None:
    trusted = _trust(audit_log, tmp_path)
    state = tmp_path / "state.json"
    _fill(audit_log, 10)
    export_log(audit_log, tmp_path / "e1")
    assert (
        verify_main([str(tmp_path / "e1"), "--trusted-key", str(trusted), "--state", str(state)])
        == 0
    )
    assert json.loads(state.read_text())["size"] == 10
    _fill(audit_log, 30)
    export_log(audit_log, tmp_path / "e2", start=20, since=[10])
    assert (
        verify_main([str(tmp_path / "e2"), "--trusted-key", str(trusted), "--state", str(state)])
        == 0
    )
    assert json.loads(state.read_text())["size"] == 40
    _fill(audit_log, 5)
    export_log(audit_log, tmp_path / "e3", start=42)  # no proof from 40: cannot be tied
    assert (
        verify_main([str(tmp_path / "e3"), "--trusted-key", str(trusted), "--state", str(state)])
        == 2
    )
    export_log(audit_log, tmp_path / "e4", start=38)  # 38 <= 40: recomputed from the entries
    assert (
        verify_main([str(tmp_path / "e4"), "--trusted-key", str(trusted), "--state", str(state)])
        == 0
    )
    assert json.loads(state.read_text())["size"] == 45


def test_export_refuses_bad_ranges_and_non_empty_dirs(audit_log: AuditLog, tmp_path: Path) -> None:
    _fill(audit_log, 5)
    with pytest.raises(InvalidArgument):
        export_log(audit_log, tmp_path / "a", start=3, end=2)
    with pytest.raises(InvalidArgument):
        export_log(audit_log, tmp_path / "b", end=6)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("x")
    with pytest.raises(InvalidArgument):
        export_log(audit_log, tmp_path / "c")


def test_cli_export_and_verify_from_a_data_dir(
    tmp_path: Path, signing_key: Ed25519PrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    from centinela.storage import make_engine

    data = tmp_path / "data"
    (data / "keys").mkdir(parents=True, mode=0o700)
    key_file = data / "keys" / "audit-log.ed25519"
    key_file.write_bytes(
        signing_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    key_file.chmod(0o600)
    engine: Engine = make_engine(f"sqlite:///{data / 'centinela.db'}")
    log = AuditLog.open(engine, signing_key, "centinela.local/audit")
    _fill(log, 12)
    log.close()
    engine.dispose()
    out = tmp_path / "export"
    assert export_main(["--data-dir", str(data), "--out", str(out)]) == 0
    assert verify_main([str(out), "--trusted-key", str(out / "log.pub"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["verified"] is True
    assert result["tree_size"] == 12
    # usage and I/O errors are 2
    assert export_main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert verify_main([str(tmp_path / "missing"), "--trusted-key", str(out / "log.pub")]) == 2
    assert verify_main([str(out), "--trusted-key", str(tmp_path / "nokey")]) == 2
    assert verify_main([str(out)]) == 2
    assert verify_main(["--help"]) == 0
    assert "--trusted-key" in capsys.readouterr().out
    key_file.chmod(0o644)
    assert export_main(["--data-dir", str(data), "--out", str(tmp_path / "y")]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_export_of_an_empty_tail_and_an_untouched_checkpoint(
    audit_log: AuditLog, tmp_path: Path
) -> None:
    _fill(audit_log, 3)
    cp = audit_log.checkpoint()
    export_log(audit_log, tmp_path / "e", new_checkpoint=False)
    assert (tmp_path / "e" / "checkpoint").read_text() == cp.note
    assert ORIGIN in cp.note
