"""``centinela edge`` end to end: a real server over mutual TLS, the default models, real photos.

The watchlist entry is enrolled the way the PNP administrator does it: a template encoded
from Yao Ming's portrait with the same encoder, sent with CreateRequisition over the API.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from centinela.cli import main as centinela_main
from centinela.clients import builders
from centinela.clients.client import CentinelaClient
from centinela.clients.edge_cli import main
from centinela.clients.encoder import FaceEncoder, encode_single_face, load_image
from centinela.config import Settings
from centinela.server.testing import ServerThread
from centinela.v1 import match_service_pb2 as mpb

#: The module's server is populated with a template encoded by the default models.
pytestmark = pytest.mark.edge

SITE = "mira-cam-07"
OTHER_MUNICIPALITY_SITE = "lav-cam-01"


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, enrol: Callable[[ServerThread], dict[str, str]]
) -> Iterator[dict[str, str]]:
    """A running server with two sites, Yao Ming wanted, and one stolen vehicle."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("edge-world") / "data",
        listen="127.0.0.1:0",
        shutdown_grace_s=1.0,
    )
    with ServerThread(settings) as server:
        facts = enrol(server)
        yield facts


def _json_out(out: str) -> dict[str, Any]:
    """The command's JSON document (the in-process server logs to the same stdout)."""
    lines = [line for line in out.splitlines() if line.startswith("{")]
    doc: dict[str, Any] = json.loads(lines[-1])
    return doc


def _conn(world: dict[str, str], identity: str = "muni-miraflores") -> list[str]:
    return ["--server", world["target"], "--data-dir", world["data_dir"], "--identity", identity]


# ---- match-face ---------------------------------------------------------------------------------


def test_match_face_finds_the_wanted_person_in_the_crowd(
    world: dict[str, str],
    photos: dict[str, Path],
    yao_region: tuple[float, float, float, float],
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["match-face", str(photos["players"]), str(photos["gdp"]), "--site", SITE, "--json"]
    code = main([*args, *_conn(world), "--threads", "1"])
    doc = _json_out(capsys.readouterr().out)
    assert code == 10
    assert doc["exit_code"] == 10
    assert doc["alerts"] == 1
    players, gdp = doc["images"]
    hits = [f for f in players["faces"] if f["result"]["alert"]]
    assert len(hits) == 1
    x1, y1, x2, y2 = hits[0]["box"]
    assert yao_region[0] <= (x1 + x2) / 2 <= yao_region[2]
    assert yao_region[1] <= (y1 + y2) / 2 <= yao_region[3]
    (candidate,) = hits[0]["result"]["candidates"]
    assert candidate["reference"] == world["requisition"]
    assert candidate["offence_category"] == "ROBO_AGRAVADO"
    assert candidate["requires_human_review"] is True
    assert candidate["subject_ref"] == ""  # R10: a municipality sees no subject reference
    assert players["held_back"]  # tiny crowd faces never left the machine
    assert not any(f["result"]["alert"] for f in gdp["faces"])
    for face in players["faces"] + gdp["faces"]:
        assert face["result"]["decision"]["decision_id"].startswith("dec_")


def test_match_face_human_output(
    world: dict[str, str], photos: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["match-face", str(photos["yaoming"]), "--site", SITE, *_conn(world)])
    out = capsys.readouterr().out
    assert code == 10
    assert "1 face(s) detected, 1 sent, 0 held back" in out
    assert f"ALERT {world['requisition']} ROBO_AGRAVADO" in out
    assert "human review required" in out


def test_no_alert_exits_zero(
    world: dict[str, str], astronaut: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["match-face", str(astronaut), "--site", SITE, *_conn(world)])
    assert code == 0
    assert "no match (decision dec_" in capsys.readouterr().out


def test_municipality_cannot_match_from_another_municipalitys_site(
    world: dict[str, str], photos: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """R5: the refusal says which rule and what to do, with exit code 3."""
    code = main(
        ["match-face", str(photos["yaoming"]), "--site", OTHER_MUNICIPALITY_SITE, *_conn(world)]
    )
    err = capsys.readouterr().err
    assert code == 3
    assert "PERMISSION_DENIED" in err
    assert "R5" in err
    assert "what to do:" in err


def test_unreadable_images_are_a_usage_error(
    world: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "frame.jpg"
    bad.write_bytes(b"\x00" * 100)
    code = main(["match-face", str(bad), "--site", SITE, *_conn(world)])
    assert code == 2
    assert "cannot use this file" in capsys.readouterr().out


# ---- match-plate --------------------------------------------------------------------------------


def test_match_plate_alerts_on_a_lookalike_read(
    world: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    read = ["A8C-123", "--confidences", "0.9", "0.4", "0.9", "0.9", "0.9", "0.9"]
    code = main(["match-plate", *read, "--site", SITE, *_conn(world)])
    out = capsys.readouterr().out
    assert code == 10
    assert f"plate: ALERT {world['vehicle']} police report DEN-2026-000777 ROBO" in out


def test_match_plate_json_no_match(
    world: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["match-plate", "XYZ-987", "--site", SITE, "--json", *_conn(world)])
    doc = _json_out(capsys.readouterr().out)
    assert code == 0
    assert doc["result"]["alert"] is False
    assert doc["result"]["decision"]["decision_id"].startswith("dec_")


# ---- failures without a server or certificates --------------------------------------------------


def test_server_down_exits_4_with_a_hint(
    world: dict[str, str], free_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["match-plate", "ABC-123", "--site", SITE, *_conn(world)]
    args[args.index("--server") + 1] = f"127.0.0.1:{free_port}"
    code = main([*args, "--timeout", "3"])
    err = capsys.readouterr().err
    assert code == 4
    assert "UNAVAILABLE" in err
    assert "centinela serve" in err


def test_missing_identity_exits_2_and_says_how_to_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["match-plate", "ABC-123", "--site", SITE, "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "centinela certs init" in err


def test_unknown_purpose_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["match-face", "x.jpg", "--site", SITE, "--purpose", "curiosity"])
    assert code == 2
    assert "unknown purpose" in capsys.readouterr().err


def test_edge_is_a_centinela_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        centinela_main(["edge", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for action in ("match-face", "match-plate", "watch"):
        assert action in out
    assert "exit codes" in out


def test_missing_site_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["match-plate", "ABC-123"])
    assert exc.value.code == 2
    assert "--site" in capsys.readouterr().err


def test_certificate_files_instead_of_an_identity(
    world: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    certs_dir = Path(world["data_dir"]) / "certs"
    files = [
        *("--cert", str(certs_dir / "muni-miraflores.crt")),
        *("--key", str(certs_dir / "muni-miraflores.key")),
        *("--ca", str(certs_dir / "ca.crt")),
    ]
    code = main(["match-plate", "ABC-123", "--site", SITE, "--server", world["target"], *files])
    assert code == 10
    assert "plate: ALERT" in capsys.readouterr().out
    code = main(["match-plate", "ABC-123", "--site", SITE, "--cert", files[1]])
    assert code == 2
    assert "--key" in capsys.readouterr().err


def test_an_edge_alert_is_confirmed_by_the_control_center(
    world: dict[str, str], photos: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """R9: the alert the edge raised is confirmed by a person through ConfirmAlert."""
    code = main(["match-face", str(photos["yaoming"]), "--site", SITE, "--json", *_conn(world)])
    assert code == 10
    face = _json_out(capsys.readouterr().out)["images"][0]["faces"][0]
    alert_id = face["result"]["candidates"][0]["alert_id"]
    with CentinelaClient.from_data_dir(
        Path(world["data_dir"]),
        "muni-miraflores",
        server=world["target"],
        operator_id="op-serenazgo-0001",
    ) as center:
        answer = center.confirm_alert(
            mpb.ConfirmAlertRequest(
                context=builders.request_context(),
                alert_id=alert_id,
                verdict=mpb.ALERT_VERDICT_CONFIRMED,
            )
        )
    assert answer.confirmations == 1
    assert answer.actionable == (answer.confirmations >= answer.confirmations_required)
    assert answer.decision.decision_id.startswith("dec_")


def test_verify_face_one_to_one_against_a_claimed_dni(
    world: dict[str, str], photos: dict[str, Path], encoder: FaceEncoder
) -> None:
    """R4: Reniec imports a template for a DNI; a PNP officer verifies a face encoded at the
    edge from another photo against that DNI and gets match / no match and a score."""
    from centinela.v1 import registry_service_pb2 as rpb

    registry_vector, model_id = encode_single_face(photos["yaoming"], encoder)
    target = Path(world["data_dir"])
    with CentinelaClient.from_data_dir(
        target, "reniec", server=world["target"], operator_id="op-reniec-000001"
    ) as reniec:
        reniec.import_templates(
            [
                rpb.ImportTemplatesRequest(
                    context=builders.request_context(reference="RJ-2026-000002"),
                    records=[
                        rpb.RegistryRecord(
                            dni="45678901", model_id=model_id, vector=registry_vector.tolist()
                        )
                    ],
                )
            ]
        )
    crowd = encoder.encode(load_image(photos["players"]))
    yao = max(crowd, key=lambda f: float(np.dot(f.vector, registry_vector)))
    stranger = min(crowd, key=lambda f: float(np.dot(f.vector, registry_vector)))
    with CentinelaClient.from_data_dir(
        target, "pnp-officer", server=world["target"], operator_id="op-pnp-officer-01"
    ) as officer:

        def verify(vector: Any, quality: float) -> mpb.VerifyFaceResponse:
            return officer.verify_face(
                mpb.VerifyFaceRequest(
                    context=builders.request_context(purpose="identity-verification"),
                    probe=builders.face_probe(vector, model_id, quality),
                    dni="45678901",
                )
            )

        deadline = time.monotonic() + 60  # the index catches up with the import in the background
        same = verify(yao.vector, yao.quality)
        while not same.match and time.monotonic() < deadline:
            time.sleep(0.2)
            same = verify(yao.vector, yao.quality)
        other = verify(stranger.vector, stranger.quality)
    assert same.match
    assert 0.5 <= same.score < 1.0
    assert not other.match
    assert other.score < 0.5
