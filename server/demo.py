"""A populated Centinela for end-to-end tests, benchmarks and the README tour.

Sites, requisitorias and a stolen vehicle go through the real gRPC API over mutual TLS with
the dev role certificates; registry templates, which belong to Reniec's bulk import, are
written straight into the encrypted store of the running in-process server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from centinela.config import Settings
from centinela.matcher import synth
from centinela.matcher.store import TemplateRecord
from centinela.server.testing import ServerThread
from centinela.v1 import common_pb2 as c
from centinela.v1 import match_service_pb2 as mpb
from centinela.v1 import match_service_pb2_grpc as mgrpc
from centinela.v1 import watchlist_service_pb2 as wpb
from centinela.v1 import watchlist_service_pb2_grpc as wgrpc

MIRA_SITE = "mira-portico-01"
LAV_SITE = "lav-cam-01"
PLATE = "ABC-123"
WANTED_DNI = "41234567"
LIFTED_DNI = "42345678"
REGISTRY_DNIS = [f"7{i:07d}" for i in range(20)]


def ts(when: dt.datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(when)
    return t


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def rid() -> str:
    return uuid.uuid4().hex


@dataclasses.dataclass
class World:
    """Handles to a running, populated server."""

    server: ServerThread
    model_id: str
    identities: np.ndarray
    wanted_requisition: str = ""
    lifted_requisition: str = ""
    vehicle_id: str = ""
    registry: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def stub(self, identity: str) -> mgrpc.MatchServiceStub:
        ch = self.server.channel(identity)
        self._channels.append(ch)
        return mgrpc.MatchServiceStub(ch)

    def admin(self) -> wgrpc.WatchlistServiceStub:
        ch = self.server.channel("pnp-admin")
        self._channels.append(ch)
        return wgrpc.WatchlistServiceStub(ch)

    def __post_init__(self) -> None:
        self._channels: list[grpc.Channel] = []

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    # ---- probes ------------------------------------------------------------------------

    def genuine(self, index: int, seed: int = 11) -> list[float]:
        probe = synth.genuine_probes(self.identities[index : index + 1], seed=seed)[0]
        return [float(x) for x in probe]

    def stranger(self, seed: int = 99) -> list[float]:
        return [float(x) for x in synth.strangers(1, seed=10_000 + seed)[0]]

    def face_request(
        self,
        vector: list[float],
        *,
        site: str = MIRA_SITE,
        purpose: int = c.PURPOSE_WANTED_PERSON,
        galleries: tuple[int, ...] = (),
        model_id: str | None = None,
        request_id: str | None = None,
        authorisation_id: str = "",
        mode: int = c.SEARCH_MODE_UNSPECIFIED,
        quality: float = 0.9,
    ) -> mpb.MatchFaceRequest:
        return mpb.MatchFaceRequest(
            context=c.RequestContext(
                purpose=purpose,  # type: ignore[arg-type]
                site_id=site,
                capture_time=ts(now()),
                client_request_id=request_id or rid(),
                authorisation_id=authorisation_id,
                operator_id="op-mira-0000001",
            ),
            probe=c.FaceProbe(
                model_id=self.model_id if model_id is None else model_id,
                vector=vector,
                quality=quality,
            ),
            galleries=list(galleries),  # type: ignore[arg-type]
            mode=mode,  # type: ignore[arg-type]
        )

    def plate_request(self, text: str, *, site: str = MIRA_SITE) -> mpb.MatchPlateRequest:
        return mpb.MatchPlateRequest(
            context=c.RequestContext(
                purpose=c.PURPOSE_STOLEN_VEHICLE,
                site_id=site,
                capture_time=ts(now()),
                client_request_id=rid(),
            ),
            read=c.PlateRead(text=text, quality=0.95),
        )


def admin_context(reference: str = "ORD-2026-000123") -> c.RequestContext:
    return c.RequestContext(
        reference=reference, operator_id="op-pnp-admin-0001", client_request_id=rid()
    )


def populate(server: ServerThread, *, registry: bool = True) -> World:
    """Register sites, requisitorias, a stolen vehicle and (optionally) registry templates."""
    with server.channel("pnp-admin") as ch:
        info = mgrpc.MatchServiceStub(ch).GetServerInfo(mpb.GetServerInfoRequest(), timeout=30)
    model_id = info.galleries[0].model_id
    world = World(server=server, model_id=model_id, identities=synth.identities(40, seed=5))
    admin = world.admin()
    for site, muni in ((MIRA_SITE, "muni-miraflores"), (LAV_SITE, "muni-la-victoria")):
        admin.RegisterSite(
            wpb.RegisterSiteRequest(
                context=admin_context(),
                site=wpb.Site(
                    site_id=site, municipality=muni, region="lima", kind=wpb.SITE_KIND_PORTICO
                ),
            ),
            timeout=30,
        )

    def requisition(index: int, dni: str, warrant: str) -> str:
        resp = admin.CreateRequisition(
            wpb.CreateRequisitionRequest(
                context=admin_context(),
                warrant_id=warrant,
                issuing_court="Juzgado Penal 3 de Lima",
                offence_category="ROBO_AGRAVADO",
                issued_at=ts(now() - dt.timedelta(days=2)),
                expires_at=ts(now() + dt.timedelta(days=60)),
                dni=dni,
                templates=wpb.TemplateSet(
                    templates=[
                        c.FaceTemplate(model_id=model_id, vector=world.identities[index].tolist())
                    ]
                ),
            ),
            timeout=30,
        )
        return str(resp.requisition.requisition_id)

    world.wanted_requisition = requisition(0, WANTED_DNI, "W-2026-000001")
    world.lifted_requisition = requisition(1, LIFTED_DNI, "W-2026-000002")
    admin.LiftRequisition(
        wpb.LiftRequisitionRequest(
            context=admin_context(), requisition_id=world.lifted_requisition, reason="captured"
        ),
        timeout=30,
    )
    world.vehicle_id = admin.ReportStolenVehicle(
        wpb.ReportStolenVehicleRequest(
            context=admin_context("DEN-2026-000777"),
            plate=PLATE,
            police_report_id="DEN-2026-000777",
            report_category="ROBO",
        ),
        timeout=30,
    ).vehicle.vehicle_id
    if registry:
        components: Any = server.app.components
        vecs = synth.identities(len(REGISTRY_DNIS), seed=77)
        world.registry = dict(zip(REGISTRY_DNIS, vecs, strict=True))
        components.matcher.store.add_templates(
            "reniec",
            "reniec_registry",
            model_id,
            [TemplateRecord(vector=v, dni=d) for d, v in world.registry.items()],
        )
        components.matcher.catch_up()
    return world


@contextlib.contextmanager
def serving_world(
    data_dir: Path, *, registry: bool = True, shutdown_grace_s: float = 1.0
) -> Iterator[World]:
    """A server on embedded defaults over ``data_dir`` (loopback, a free port), populated
    (:func:`populate`); its channels and the server are closed on exit."""
    settings = Settings(data_dir=data_dir, listen="127.0.0.1:0", shutdown_grace_s=shutdown_grace_s)
    with ServerThread(settings) as server:
        world = populate(server, registry=registry)
        try:
            yield world
        finally:
            world.close()
