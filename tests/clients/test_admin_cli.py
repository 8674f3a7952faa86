"""``centinela admin`` run in-process (its ``main(argv)``) against a real server over mTLS.

The server is the real one (SQLite, hnswlib, Rego, audit log); the face model id is set to the
one the policy bundle calibrated, so that probes pass R13.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from centinela.clients import admin_cli
from centinela.config import Settings
from centinela.matcher.service import WATCHLIST
from centinela.matcher.synth import genuine_probes, identities
from centinela.policy.bundle import Bundle
from centinela.server.testing import ServerThread
from centinela.v1 import common_pb2, match_service_pb2_grpc
from centinela.v1 import match_service_pb2 as mpb

_SERVER_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")
SITE = "mira-cam-07"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("admin-cli")
    settings = Settings(
        data_dir=tmp / "data",
        listen="127.0.0.1:0",
        shutdown_grace_s=1.0,
        face_model_id=Bundle.load("interim").config["galleries"][WATCHLIST]["model_id"],
    )
    with ServerThread(settings) as server:
        yield server


def own(text: str) -> str:
    """The tool's output without the in-process server's log lines (same stdout)."""
    return "".join(line for line in text.splitlines(True) if not _SERVER_LOG.match(line))


def conn(srv: ServerThread, identity: str = "pnp-admin") -> list[str]:
    return [
        "--server",
        srv.target,
        "--data-dir",
        str(srv.settings.data_dir),
        "--identity",
        identity,
    ]


def run(
    capsys: pytest.CaptureFixture[str],
    srv: ServerThread,
    argv: Sequence[str],
    identity: str = "pnp-admin",
) -> tuple[int, str, str]:
    code = admin_cli.main([*argv, *conn(srv, identity)])
    out, err = capsys.readouterr()
    return code, own(out), own(err)


def json_of(capsys: pytest.CaptureFixture[str], srv: ServerThread, argv: Sequence[str]) -> Any:
    code, out, err = run(capsys, srv, [*argv, "--json"])
    assert code == 0, err + out
    return json.loads(out)


def day(offset: int) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=offset)).date().isoformat()


def ensure_site(capsys: pytest.CaptureFixture[str], srv: ServerThread) -> None:
    sites = json_of(capsys, srv, ["site", "list", "--all"])["sites"]
    if SITE not in {s["site_id"] for s in sites}:
        code, _, err = run(
            capsys,
            srv,
            [
                "site",
                "add",
                "--id",
                SITE,
                "--municipality",
                "muni-miraflores",
                "--region",
                "lima",
                "--kind",
                "camera",
                "--description",
                "Av. Larco / Benavides",
                "--reference",
                "RM-2026-001",
            ],
        )
        assert code == 0, err


def match(srv: ServerThread, probe: np.ndarray) -> mpb.MatchFaceResponse:
    from centinela.server import certs
    from centinela.server.testing import secure_channel

    channel = secure_channel(srv.target, certs.client_files(srv.certs_dir, "muni-miraflores"))
    ctx = common_pb2.RequestContext(
        purpose=common_pb2.PURPOSE_WANTED_PERSON, site_id=SITE, operator_id="op-serenazgo-3"
    )
    ctx.capture_time.FromDatetime(dt.datetime.now(dt.UTC))
    return match_service_pb2_grpc.MatchServiceStub(channel).MatchFace(
        mpb.MatchFaceRequest(
            context=ctx,
            probe=common_pb2.FaceProbe(
                model_id=str(srv.app.components.face_model_id), vector=probe.tolist(), quality=0.95
            ),
        ),
        timeout=30,
    )


def templates_file(path: Path, srv: ServerThread, vec: np.ndarray) -> Path:
    item = {"model_id": str(srv.app.components.face_model_id), "vector": vec.tolist()}
    path.write_text(json.dumps([item]))
    return path


# ---- sites, vehicles, authorisations --------------------------------------------------------


def test_site_add_list_deactivate(srv: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        srv,
        [
            "site",
            "add",
            "--id",
            "lv-portico-01",
            "--municipality",
            "muni-la-victoria",
            "--region",
            "lima",
            "--kind",
            "portico",
            "--reference",
            "RM-2026-002",
        ],
    )
    assert code == 0
    assert out.startswith("site lv-portico-01 registered to muni-la-victoria (lima), portico")
    code, out, _ = run(capsys, srv, ["site", "list", "--municipality", "muni-la-victoria"])
    assert code == 0
    assert re.search(r"^lv-portico-01\s+active\s+portico\s+muni-la-victoria", out, re.M)
    code, out, _ = run(capsys, srv, ["site", "deactivate", "lv-portico-01", "--reference", "RM-3"])
    assert code == 0
    sites = json_of(capsys, srv, ["site", "list", "--municipality", "muni-la-victoria"])["sites"]
    assert [s["active"] for s in sites] == [False]


def test_vehicle_report_list_recover(srv: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    doc = json_of(
        capsys,
        srv,
        [
            "vehicle",
            "report",
            "--plate",
            "ABC-123",
            "--police-report",
            "DEN-2026-4471",
            "--category",
            "ROBO",
        ],
    )
    vehicle = doc["vehicle"]
    assert vehicle["plate_masked"].endswith("23")
    assert "ABC" not in json.dumps(doc)  # the plate is never echoed
    assert doc["decision"]["decision_id"].startswith("dec_")
    code, out, _ = run(capsys, srv, ["vehicle", "list", "--state", "stolen"])
    assert vehicle["vehicle_id"] in out
    assert "ABC" not in out
    code, out, _ = run(
        capsys, srv, ["vehicle", "recover", vehicle["vehicle_id"], "--reference", "DEN-2026-4471-R"]
    )
    assert code == 0
    assert "no longer matches (R6)" in out
    listed = json_of(capsys, srv, ["vehicle", "list", "--state", "recovered"])["vehicles"]
    assert vehicle["vehicle_id"] in {v["vehicle_id"] for v in listed}


def test_authorisation_add_list_revoke(
    srv: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys,
        srv,
        [
            "authorisation",
            "add",
            "--id",
            "AUT-2026-0077",
            "--court",
            "Juzgado Penal Lima 4",
            "--site",
            SITE,
            "--offence",
            "ROBO_AGRAVADO",
            "--not-before",
            day(-1),
            "--not-after",
            day(30),
            "--named-dni",
            "46000000",
        ],
    )
    assert code == 0
    assert out.startswith("authorisation AUT-2026-0077 registered: Juzgado Penal Lima 4")
    assert "1 named subject(s)" in out
    assert "46000000" not in out
    listed = json_of(capsys, srv, ["authorisation", "list"])["authorisations"]
    assert "AUT-2026-0077" in {a["authorisation_id"] for a in listed}
    code, out, _ = run(
        capsys, srv, ["authorisation", "revoke", "AUT-2026-0077", "--reference", "RJ-2026-77R"]
    )
    assert code == 0
    listed = json_of(capsys, srv, ["authorisation", "list"])["authorisations"]
    assert "AUT-2026-0077" not in {a["authorisation_id"] for a in listed}
    listed = json_of(capsys, srv, ["authorisation", "list", "--include-revoked"])["authorisations"]
    assert [a["revoked"] for a in listed if a["authorisation_id"] == "AUT-2026-0077"] == [True]


# ---- requisitorias: lifecycle ---------------------------------------------------------------


def test_requisition_lifecycle_create_match_lift_no_match(
    srv: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ensure_site(capsys, srv)
    vec = identities(1, seed=50)[0]
    probe = genuine_probes(vec[None, :], seed=51, cosine=(0.8, 0.85))[0]
    tfile = templates_file(tmp_path / "t.json", srv, vec)
    doc = json_of(
        capsys,
        srv,
        [
            "requisition",
            "add",
            "--warrant",
            "OC-2026-1234",
            "--court",
            "Juzgado Penal Lima 1",
            "--offence",
            "ROBO_AGRAVADO",
            "--issued",
            day(-2),
            "--expires",
            day(60),
            "--dni",
            "47000000",
            "--templates",
            str(tfile),
        ],
    )
    req = doc["requisition"]
    assert req["state"] == "REQUISITION_STATE_ACTIVE"
    assert req["template_count"] == 1
    srv.app.components.matcher.catch_up()
    hit = match(srv, probe)
    assert hit.alert
    assert hit.candidates[0].reference == req["requisition_id"]
    code, out, _ = run(
        capsys,
        srv,
        [
            "requisition",
            "update",
            req["requisition_id"],
            "--expires",
            day(90),
            "--reference",
            "OC-2026-1234-A",
        ],
    )
    assert code == 0
    assert "updated: ACTIVE" in out
    code, out, _ = run(
        capsys,
        srv,
        [
            "requisition",
            "lift",
            req["requisition_id"],
            "--reason",
            "captured",
            "--reference",
            "OL-2026-1234",
        ],
    )
    assert code == 0
    assert "lifted: LIFTED" in out
    assert not match(srv, probe).alert  # no restart, no wait: R6
    code, out, _ = run(capsys, srv, ["requisition", "list", "--state", "lifted"])
    assert re.search(
        rf"^{req['requisition_id']}\s+LIFTED\s+OC-2026-1234\s+ROBO_AGRAVADO", out, re.M
    )
    assert "47000000" not in out


def test_requisition_from_registry_dni(
    srv: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    c = srv.app.components
    vec = identities(1, seed=52)[0]
    from centinela.matcher.service import REGISTRY
    from centinela.matcher.store import TemplateRecord

    c.matcher.store.add_templates(
        "reniec", REGISTRY, c.face_model_id, [TemplateRecord(vec, dni="48000000")]
    )
    c.matcher.catch_up()
    doc = json_of(
        capsys,
        srv,
        [
            "requisition",
            "add",
            "--warrant",
            "OC-2026-9",
            "--court",
            "Juzgado Penal Lima 1",
            "--offence",
            "HOMICIDIO",
            "--issued",
            day(-1),
            "--expires",
            day(10),
            "--dni",
            "48000000",
        ],
    )
    assert doc["requisition"]["from_registry"] is True


def test_requisition_from_templates_only(
    srv: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tfile = templates_file(tmp_path / "t.json", srv, identities(1, seed=53)[0])
    doc = json_of(
        capsys,
        srv,
        [
            "requisition",
            "add",
            "--warrant",
            "OC-2026-10",
            "--court",
            "Juzgado Penal Lima 1",
            "--offence",
            "HOMICIDIO",
            "--issued",
            day(-1),
            "--expires",
            day(10),
            "--templates",
            str(tfile),
        ],
    )
    assert doc["requisition"]["from_registry"] is False


# ---- permissions and errors -----------------------------------------------------------------


def test_municipality_cannot_administer(
    srv: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys,
        srv,
        [
            "site",
            "add",
            "--id",
            "rogue-cam-01",
            "--municipality",
            "muni-miraflores",
            "--region",
            "lima",
            "--kind",
            "camera",
            "--reference",
            "RM-9",
        ],
        identity="muni-miraflores",
    )
    assert code == 3
    assert "PERMISSION_DENIED" in err
    assert "what to do:" in err
    code, out, _ = run(capsys, srv, ["requisition", "list", "--json"], identity="muni-miraflores")
    assert code == 3
    assert json.loads(out)["error"]["code"] == "PERMISSION_DENIED"


def test_reniec_cannot_create_requisitorias(
    srv: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tfile = templates_file(tmp_path / "t.json", srv, identities(1, seed=54)[0])
    code, _, err = run(
        capsys,
        srv,
        [
            "requisition",
            "add",
            "--warrant",
            "OC-2026-11",
            "--court",
            "Juzgado Penal Lima 1",
            "--offence",
            "HOMICIDIO",
            "--issued",
            day(-1),
            "--expires",
            day(10),
            "--dni",
            "49000000",
            "--templates",
            str(tfile),
        ],
        identity="reniec",
    )
    assert code == 3
    assert "PERMISSION_DENIED" in err
    assert "R15" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["requisition", "lift", "req_x"], "--reference"),
        (["requisition", "update", "req_x", "--reference", "R-1"], "--court"),
        (["requisition", "list", "--page-size", "900"], "--page-size"),
        (
            [
                "requisition",
                "add",
                "--warrant",
                "W-1",
                "--court",
                "C",
                "--offence",
                "X",
                "--issued",
                "yesterday",
                "--expires",
                "2030-01-01",
            ],
            "ISO 8601",
        ),
        (["vehicle", "frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(
    srv: ServerThread, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code, _, err = run(capsys, srv, argv)
    assert code == 2
    assert needle in err


def test_server_refusal_names_the_field(
    srv: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys,
        srv,
        [
            "requisition",
            "add",
            "--warrant",
            "OC-2026-12",
            "--court",
            "Juzgado",
            "--offence",
            "robo agravado",
            "--issued",
            day(-1),
            "--expires",
            day(10),
            "--dni",
            "49000001",
        ],
    )
    assert code == 3
    assert "INVALID_ARGUMENT: offence_category" in err


def test_default_identity_is_pnp_admin() -> None:
    assert admin_cli.DEFAULT_IDENTITY == "pnp-admin"
    args = admin_cli.build_parser().parse_args(["site", "list"])
    assert args.identity is None


@pytest.mark.edge
def test_requisition_from_a_photo_is_found_in_a_crowd_and_its_sighting_listed(
    srv: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    """`requisition add --image`: the photo is encoded here; only the embedding is sent."""
    import cv2

    from centinela.clients.encoder import FaceEncoder
    from centinela.models import packaged_model_dir

    photos = packaged_model_dir()
    assert photos is not None
    ensure_site(capsys, srv)
    code, out, err = run(
        capsys,
        srv,
        [
            "requisition",
            "add",
            "--warrant",
            "W-PHOTO-000001",
            "--court",
            "Juzgado Penal 3",
            "--offence",
            "ROBO_AGRAVADO",
            "--issued",
            day(-1),
            "--expires",
            day(30),
            "--image",
            str(photos / "yaoming.jpg"),
            "--reference",
            "ORD-PHOTO-000001",
            "--operator",
            "op-pnp-admin-0001",
        ],
    )
    assert code == 0, err
    match = re.search(r"req_[0-9a-f]+", out)
    assert match is not None
    req_id = match.group(0)
    image = cv2.imread(str(photos / "players.jpg"))
    assert image is not None
    faces = FaceEncoder(threads=1).encode(np.asarray(image, dtype=np.uint8))
    ch = srv.channel("muni-miraflores")
    stub = match_service_pb2_grpc.MatchServiceStub(ch)
    now = dt.datetime.now(dt.UTC)
    hits = []
    for i, face in enumerate(faces):
        req = mpb.MatchFaceRequest(
            context=common_pb2.RequestContext(
                purpose=common_pb2.PURPOSE_WANTED_PERSON,
                site_id=SITE,
                client_request_id=f"photo-test-{i:04d}x",
            ),
            probe=common_pb2.FaceProbe(
                model_id=face.model_id, quality=face.quality, vector=[float(x) for x in face.vector]
            ),
        )
        req.context.capture_time.FromDatetime(now)
        resp = stub.MatchFace(req, timeout=30)
        hits += [c.reference for c in resp.candidates]
    ch.close()
    assert hits == [req_id]  # Yao Ming, and nobody else in the team photo
    code, out, err = run(capsys, srv, ["sightings", req_id, "--json"], "pnp-investigator")
    assert code == 0, err
    assert [s["site_id"] for s in json.loads(out)["sightings"]] == [SITE]
