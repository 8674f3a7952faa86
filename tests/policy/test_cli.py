"""``centinela policy test|eval|digest`` through ``main(argv)``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from centinela.policy import Bundle
from centinela.policy.cli import main


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    return main(argv, out), out.getvalue()


def test_test_passes_for_packaged_bundle() -> None:
    rc, text = _run(["test", "interim"])
    assert rc == 0
    assert "interim (" in text
    assert "0 failed" in text


def test_test_fails_with_exit_1(bundle_copy: Path) -> None:
    data = json.loads((bundle_copy / "data.json").read_text())
    data["centinela_config"]["quality_floor"]["face"] = 0.95
    (bundle_copy / "data.json").write_text(json.dumps(data))
    rc, text = _run(["test", str(bundle_copy)])
    assert rc == 1
    assert "FAIL test_r1_allow_declared_purpose" in text


def test_eval_prints_decision_and_rules(tmp_path: Path, cases_of: Any) -> None:
    cases, dynamic = cases_of("interim")
    (tmp_path / "in.json").write_text(json.dumps(cases["r5_deny_other_municipality_site"]["input"]))
    (tmp_path / "dyn.json").write_text(json.dumps(dynamic))
    rc, text = _run(
        [
            "eval",
            "--bundle",
            "interim",
            "--input",
            str(tmp_path / "in.json"),
            "--dynamic",
            str(tmp_path / "dyn.json"),
        ]
    )
    assert rc == 0
    assert text.startswith("DENY")
    assert "denied by: R5" in text
    rc, text = _run(["eval", "--bundle", "interim", "--input", str(tmp_path / "in.json"), "--json"])
    assert json.loads(text)["allow"] is False


def test_digest_matches_bundle() -> None:
    rc, text = _run(["digest", "draft-2026"])
    assert rc == 0
    assert text.split()[0] == Bundle.load("draft-2026").digest


def test_unknown_bundle_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = _run(["digest", "nope"])
    assert rc == 2
    assert "no policy bundle" in capsys.readouterr().err


def test_unreadable_input_exits_2(tmp_path: Path) -> None:
    rc, _ = _run(["eval", "--bundle", "interim", "--input", str(tmp_path / "missing.json")])
    assert rc == 2


def test_help_mentions_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert all(word in text for word in ("test", "eval", "digest", "interim"))
