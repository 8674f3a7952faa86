"""``centinela admin calibrate`` run in-process against a real server over mTLS.

The watchlist holds synthetic identities (``synth``); the non-mated set is synthetic
strangers, written to the files a data owner would hand the tool (.npy and JSON Lines).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from centinela.clients import admin_cli
from centinela.config import Settings
from centinela.matcher import synth
from centinela.matcher.service import WATCHLIST
from centinela.matcher.store import TemplateRecord
from centinela.policy.bundle import Bundle
from centinela.server.testing import ServerThread, bundle_variant

_SERVER_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")
MODEL = Bundle.load("interim").config["galleries"][WATCHLIST]["model_id"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("calibrate-cli")
    # The floor declares the size it was calibrated at: 1,500, and the gallery holds 2,000.
    bundle = bundle_variant(tmp, "interim", {"galleries.pnp_watchlist.calibrated_size": 1500})
    settings = Settings(
        data_dir=tmp / "data",
        listen="127.0.0.1:0",
        shutdown_grace_s=1.0,
        face_model_id=MODEL,
        policy_bundle=str(bundle),
    )
    with ServerThread(settings) as server:
        matcher = server.app.components.matcher
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
        matcher.store.add_templates(
            "pnp",
            WATCHLIST,
            MODEL,
            [
                TemplateRecord(vector=v, dni=f"6{i:07d}", expires_at=expires)
                for i, v in enumerate(synth.identities(2000, seed=31))
            ],
        )
        matcher.catch_up()
        yield server


def run(
    capsys: pytest.CaptureFixture[str],
    srv: ServerThread,
    argv: Sequence[str],
    who: str,
    command: str = "calibrate",
) -> tuple[int, str, str]:
    conn = ["--server", srv.target, "--data-dir", str(srv.settings.data_dir), "--identity", who]
    code = admin_cli.main([command, *argv, *conn])
    out, err = capsys.readouterr()

    def own(text: str) -> str:
        return "".join(line for line in text.splitlines(True) if not _SERVER_LOG.match(line))

    return code, own(out), own(err)


def test_calibrate_from_npy_reports_threshold_and_what_to_adopt(
    srv: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "strangers.npy"
    np.save(path, synth.strangers(1200, seed=5))
    code, out, err = run(
        capsys,
        srv,
        ["--templates", str(path), "--target-fpir", "0.01", "--reference", "CAL-2026-07"],
        "pnp-admin",
    )
    assert code == 0, err
    assert "searching 1,200 templates against pnp_watchlist" in err
    assert "pnp_watchlist: 1,200 non-mated templates against 2,000 active entries" in out
    assert '"calibrated_size": 2000' in out
    assert "UNRESOLVED" not in out

    code, out, err = run(
        capsys, srv, ["--templates", str(path), "--target-fpir", "0.01", "--json"], "pnp-admin"
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["templates"] == "1200"  # uint64 in proto JSON
    assert doc["resolved"] is True
    assert doc["suggested_floor"] >= doc["threshold"]
    assert doc["suggested_floor"] - doc["threshold"] < 1e-3
    assert doc["decision"]["decision_id"].startswith("dec_")


def test_a_small_jsonl_set_says_how_many_templates_it_needs(
    srv: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "few.jsonl"
    path.write_text(
        "".join(
            json.dumps({"model_id": MODEL, "vector": v.tolist()}) + "\n"
            for v in synth.strangers(1000, seed=6)
        )
    )
    code, out, err = run(capsys, srv, ["--templates", str(path)], "pnp-admin")
    assert code == 0, err
    assert "UNRESOLVED" in out
    assert "send at least 3,334" in out  # 10 / 0.003, the bundle's target
    assert "to adopt" not in out


def test_another_owners_gallery_is_refused(
    srv: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "s.npy"
    np.save(path, synth.strangers(20, seed=7))
    code, _, err = run(
        capsys, srv, ["--gallery", "registry", "--templates", str(path)], "pnp-admin"
    )
    assert code == 3
    assert "R15" in err


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--templates", "missing.npy"], "--templates"),
        (["--templates", "{npy}", "--target-fpir", "1.5"], "--target-fpir"),
    ],
)
def test_usage_errors_name_the_option(
    srv: ServerThread,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    argv: list[str],
    field: str,
) -> None:
    npy = tmp_path / "s.npy"
    np.save(npy, synth.strangers(5, seed=8))
    argv = [a.replace("{npy}", str(npy)) for a in argv]
    code, _, err = run(
        capsys, srv, [a if a != "missing.npy" else str(tmp_path / a) for a in argv], "pnp-admin"
    )
    assert code == 2
    assert field in err


def test_galleries_shows_which_floor_outgrew_its_calibration(
    srv: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, srv, [], "pnp-admin", command="galleries")
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines() if line}
    assert lines["GALLERY"].split() == [
        "GALLERY",
        "ENTRIES",
        "ACTIVE",
        "FLOOR",
        "TARGET",
        "FPIR",
        "CALIBRATED",
        "AT",
        "EXPECTED",
        "STATE",
    ]
    watch = lines["pnp_watchlist"]
    assert "2,000" in watch
    assert "1,500" in watch
    assert "0.0040" in watch  # 0.003 × 2,000 / 1,500
    assert watch.endswith("OUTGREW: recalibrate")
    assert lines["reniec_registry"].endswith("size not declared")
    assert lines["stolen_vehicles"].endswith("-")
    code, out, _ = run(capsys, srv, ["--json"], "muni-miraflores", command="galleries")
    assert code == 0
    doc = json.loads(out)
    (w,) = [g for g in doc["galleries"] if g["gallery"] == "GALLERY_PNP_WATCHLIST"]
    assert w["calibrated_size"] == "1500"
    assert w["expected_fpir"] == pytest.approx(0.004)


def test_a_large_set_streams_as_it_is_read_with_progress(
    srv: ServerThread,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from centinela.clients import calibrate_cli

    # The bound above which a set is streamed from the memory-mapped file instead of held
    # whole, lowered so a test-sized set crosses it.
    monkeypatch.setattr(calibrate_cli, "REPLAYABLE", 1000)
    path = tmp_path / "big.npy"
    np.save(path, synth.strangers(2500, seed=12))
    code, out, err = run(
        capsys, srv, ["--templates", str(path), "--target-fpir", "0.01"], "pnp-admin"
    )
    assert code == 0, err
    assert "500 / 2,500 sent" in err
    assert "2,000 / 2,500 sent" in err
    assert "2,500 non-mated templates against 2,000 active entries" in out
