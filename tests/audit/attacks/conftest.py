"""An exported, verifiable log for the attack tests to tamper with."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from centinela.audit.cli import verify_main
from centinela.audit.export import export_log
from centinela.audit.log import AuditLog

from ..conftest import sample_entry


@dataclasses.dataclass
class Exported:
    log: AuditLog
    dir: Path
    trusted: Path
    tmp: Path

    def verify(self, *extra: str, target: Path | None = None) -> int:
        return verify_main([str(target or self.dir), "--trusted-key", str(self.trusted), *extra])

    def lines(self) -> list[bytes]:
        return (self.dir / "entries.jsonl").read_bytes().split(b"\n")[:-1]

    def write_lines(self, lines: list[bytes]) -> None:
        (self.dir / "entries.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))


@pytest.fixture
def exported(audit_log: AuditLog, tmp_path: Path) -> Exported:
    for i in range(50):
        audit_log.append_blocking(sample_entry(i))
    out = tmp_path / "export"
    export_log(audit_log, out)
    trusted = tmp_path / "trusted.pub"
    trusted.write_text(audit_log.verifier_key() + "\n")
    ex = Exported(audit_log, out, trusted, tmp_path)
    assert ex.verify() == 0
    return ex
