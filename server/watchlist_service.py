"""WatchlistService: PNP administration of requisitorias, vehicles, authorisations and sites.

Invariants (LEGAL_RULES R6, R15; DESIGN.md §3–4):

* Every call is decided by the policy (only PNP administrators may change anything) and
  audited; every change cites a reference (``context.reference``: warrant, police report or
  court order id) — the policy denies a change without one.
* A change and its audit entry commit in one transaction, or neither does: the change is
  checked and planned first (validation, "does it exist", "is the transition allowed",
  encryption), then written as a companion of the entry (``Pipeline.commit(extra=...)``),
  all under the process's write lock so the checks still hold at the commit. If the audit
  cannot be written the caller gets UNAVAILABLE and nothing changed.
* A lift or a recovery takes effect for matching before the answer is sent: after the
  commit, the matcher's index is caught up synchronously and the watchlist view refreshed
  (R6). An expiry needs no action: it is a timestamp checked at every search.
* DNIs and plates are handed to the encrypted store only; records keep pseudonymous refs and
  a masked plate. Audit entries hold refs and keyed digests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any, cast

import numpy as np

from centinela.audit.entry import EventType, external_id
from centinela.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from centinela.matcher.plates import normalise_plate
from centinela.matcher.store import TemplateRecord
from centinela.matcher.writes import Write
from centinela.server.alerts import in_scope
from centinela.server.components import Components
from centinela.server.context import CallState, current_call, current_caller
from centinela.server.identity import Caller
from centinela.server.pipeline import decision_info
from centinela.server.records import (
    AuthorisationRecord,
    RequisitionRecord,
    SiteRecord,
    VehicleRecord,
    mask_plate,
    new_id,
    page,
    page_of,
    serialised,
)
from centinela.server.unimplemented import UnimplementedWatchlist
from centinela.server.validation import (
    check_category,
    check_context,
    check_dni,
    check_id,
    check_site_id,
    check_text,
    check_vector,
    timestamp,
)
from centinela.v1 import watchlist_service_pb2 as pb

WATCHLIST = "pnp_watchlist"
REGISTRY = "reniec_registry"
_REQ_STATE = {
    "ACTIVE": pb.REQUISITION_STATE_ACTIVE,
    "LIFTED": pb.REQUISITION_STATE_LIFTED,
    "EXPIRED": pb.REQUISITION_STATE_EXPIRED,
}
_REQ_FILTER = {v: k for k, v in _REQ_STATE.items()}
_VEH_FILTER = {pb.VEHICLE_STATE_STOLEN: "STOLEN", pb.VEHICLE_STATE_RECOVERED: "RECOVERED"}
MAX_TEMPLATES = 16


def _ts(when: dt.datetime | None) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    if when is not None:
        t.FromDatetime(when)
    return t


def requisition_pb(r: RequisitionRecord, now: dt.datetime) -> pb.Requisition:
    msg = pb.Requisition(
        requisition_id=r.requisition_id,
        subject_ref=r.subject_ref,
        warrant_id=r.warrant_id,
        issuing_court=r.issuing_court,
        offence_category=r.offence_category,
        issued_at=_ts(r.issued_at),
        expires_at=_ts(r.expires_at),
        state=_REQ_STATE[r.state(now)],
        template_count=len(r.template_ids),
        from_registry=r.from_registry,
    )
    if r.lifted_at is not None:
        msg.lifted_at.CopyFrom(_ts(r.lifted_at))
    return msg


def vehicle_pb(v: VehicleRecord) -> pb.StolenVehicle:
    msg = pb.StolenVehicle(
        vehicle_id=v.vehicle_id,
        police_report_id=v.police_report_id,
        plate_masked=v.plate_masked,
        report_category=v.report_category,
        reported_at=_ts(v.reported_at),
        state=pb.VEHICLE_STATE_STOLEN if v.stolen else pb.VEHICLE_STATE_RECOVERED,
    )
    if v.recovered_at is not None:
        msg.recovered_at.CopyFrom(_ts(v.recovered_at))
    return msg


def authorisation_pb(a: AuthorisationRecord) -> pb.JudicialAuthorisation:
    return pb.JudicialAuthorisation(
        authorisation_id=a.authorisation_id,
        court=a.court,
        site_ids=list(a.site_ids),
        not_before=_ts(a.not_before),
        not_after=_ts(a.not_after),
        offence_categories=list(a.offence_categories),
        subject_refs=list(a.subject_refs),
        revoked=a.revoked,
    )


def site_pb(s: SiteRecord) -> pb.Site:
    return pb.Site(
        site_id=s.site_id,
        municipality=s.municipality,
        region=s.region,
        kind=cast(Any, s.kind),
        description=s.description,
        active=s.active,
    )


@dataclasses.dataclass
class Change:
    """What one administrative call does: its answer, what its audit entry names, and the
    planned writes that commit with that entry."""

    response: Any
    refs: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics: dict[str, int] = dataclasses.field(default_factory=dict)
    digests: dict[str, str] = dataclasses.field(default_factory=dict)
    write: Write = dataclasses.field(default_factory=Write)


Work = Callable[[Caller, CallState, dict[str, Any]], Awaitable[Change]]


class WatchlistServicer(UnimplementedWatchlist):  # type: ignore[misc]
    """The WatchlistService implementation."""

    def __init__(self, components: Components) -> None:
        self.c = components

    async def _run(self, fn: Any, *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.c.executor, lambda: fn(*args, **kw))

    async def _change(
        self,
        rpc: str,
        request: Any,
        cls: Any,
        work: Work,
        *,
        reference_required: bool = True,
        digests: dict[str, str] | None = None,
    ) -> Any:
        """Authorise an administrative call, plan ``work``, commit it with its audit entry,
        make it effective, answer (idempotently).

        A list (``reference_required`` False) only reads: no lock, no write.
        """
        caller, call = current_caller(), current_call()
        reads_only = not reference_required

        async def commit(
            ctx: dict[str, Any], decision: Any, decision_id: str
        ) -> tuple[Any, Change]:
            change = await work(caller, call, ctx)
            changed = "CHANGED" if change.write.changed else "UNCHANGED"
            event = self.c.pipeline.event(
                EventType.ADMIN_CHANGE,
                call=call,
                caller=caller,
                context=ctx,
                decision=decision,
                decision_id=decision_id,
                outcome="READ" if reads_only else changed,
                refs=change.refs,
                digests={**(digests or {}), **change.digests},
                metrics=change.metrics,
            )

            def respond(index: int) -> Any:
                response = change.response
                if "decision" in response.DESCRIPTOR.fields_by_name:
                    response.decision.CopyFrom(
                        decision_info(decision, decision_id, index, self.c.bundle_name)
                    )
                return response

            extra = change.write if change.write.changed else None
            return await self.c.pipeline.commit(event, respond, extra=extra), change

        async def compute() -> bytes:
            ctx = check_context(
                request.context, purpose_required=False, reference_required=reference_required
            )
            decision, decision_id = await self.c.pipeline.authorise(
                rpc,
                call=call,
                caller=caller,
                context=ctx,
                digests=digests,
                mode="ADMIN",
            )
            if reads_only:
                answer, _ = await commit(ctx, decision, decision_id)
            else:
                # Checks, plan and commit under one lock: nothing of this process lands
                # between them (the checks still hold when the change is written).
                answer, change = await serialised(
                    self.c.extra, lambda: commit(ctx, decision, decision_id)
                )
                if change.write.changed:
                    await self._after_change()
            return bytes(answer.SerializeToString())

        data, _ = await self.c.idempotency.run(
            caller.name,
            request.context.client_request_id,
            rpc,
            compute,
            request=request.SerializeToString(deterministic=True),
        )
        return cls.FromString(data)

    async def _after_change(self) -> None:
        """Make a committed change effective for matching before answering (R6): the
        watchlist and plate indexes catch up (never waiting for a registry bulk load), the
        policy data and the watchlist view are reloaded."""
        await self._run(self.c.matcher.catch_up, [WATCHLIST])
        await self._run(self.c.refresh_policy_data)

    # ---- requisitorias -----------------------------------------------------------------

    async def CreateRequisition(
        self, request: pb.CreateRequisitionRequest, context: Any
    ) -> pb.CreateRequisitionResponse:
        now = dt.datetime.now(dt.UTC)
        warrant = check_id(request.warrant_id, "warrant_id")
        court = check_text(request.issuing_court, "issuing_court", max_len=256, required=True)
        offence = check_category(request.offence_category, "offence_category")
        if not request.HasField("expires_at"):
            raise InvalidArgument("is required", field="expires_at")
        expires = timestamp(request.expires_at, "expires_at")
        issued = timestamp(request.issued_at, "issued_at") if request.HasField("issued_at") else now
        if expires <= now:
            raise InvalidArgument("must lie in the future", field="expires_at")
        if expires <= issued:
            raise InvalidArgument("must lie after issued_at", field="expires_at")
        dni = check_dni(request.dni) if request.dni else ""
        supplied = list(request.templates.templates)
        if not dni and not supplied:
            raise InvalidArgument("give a DNI, templates, or both", field="dni")
        if len(supplied) > MAX_TEMPLATES:
            raise InvalidArgument(f"at most {MAX_TEMPLATES} templates", field="templates.templates")
        vectors = []
        for i, t in enumerate(supplied):
            f = f"templates.templates[{i}]"
            if t.model_id != self.c.face_model_id:
                from centinela.errors import ModelMismatch

                raise ModelMismatch(
                    "comes from another model than the watchlist's (R13)", field=f"{f}.model_id"
                )
            vectors.append(check_vector(t.vector, dimension=self._dim(), field=f"{f}.vector"))
        digests = {"dni": self.c.digester.digest("dni", dni)} if dni else None

        async def work(caller: Caller, call: CallState, ctx: dict[str, Any]) -> Change:
            if await self._run(self.c.records.warrant_in_use, warrant):
                raise AlreadyExists("a requisitoria cites that warrant already", field="warrant_id")
            from_registry = not vectors
            vecs = vectors or await self._run(self._registry_vectors, dni)
            records = [
                TemplateRecord(
                    vector=np.asarray(v, dtype=np.float32),
                    dni=dni or None,
                    active=True,
                    expires_at=expires,
                )
                for v in vecs
            ]
            store = self.c.matcher.store
            # Supplied templates without a DNI all go to one new pseudonymous subject.
            planned = await self._run(
                lambda: store.plan_templates(
                    "pnp", WATCHLIST, self.c.face_model_id, records, unnamed_subject=True
                )
            )
            result = planned.result
            write: Write = planned
            if result.unchanged:
                # Templates stored for an earlier requisitoria (perhaps lifted): live again,
                # with this one's expiry.
                write = write.then(
                    store.template_state_write(result.template_ids, active=True, expires_at=expires)
                )
            rec = RequisitionRecord(
                requisition_id=new_id("req"),
                subject_ref=result.subject_refs[0],
                warrant_id=warrant,
                issuing_court=court,
                offence_category=offence,
                issued_at=issued,
                expires_at=expires,
                lifted_at=None,
                lift_reason="",
                from_registry=from_registry,
                template_ids=tuple(result.template_ids),
            )
            return Change(
                pb.CreateRequisitionResponse(requisition=requisition_pb(rec, now)),
                refs={"requisition": rec.requisition_id},
                metrics={"templates": len(result.template_ids)},
                write=write.then(self.c.records.requisition_insert(rec)),
            )

        result: pb.CreateRequisitionResponse = await self._change(
            "CreateRequisition", request, pb.CreateRequisitionResponse, work, digests=digests
        )
        return result

    def _dim(self) -> int:
        return int(self.c.matcher.specs[WATCHLIST].dim)

    def _registry_vectors(self, dni: str) -> list[np.ndarray]:
        store = self.c.matcher.store
        subject = store.find_subject("reniec", dni)
        if subject is None:
            raise NotFound(
                "no registry template for that DNI; supply templates instead", field="dni"
            )
        vecs = self.c.matcher.gallery(REGISTRY).vectors_of(subject)
        if not vecs:
            raise FailedPrecondition(
                "the registry templates of that DNI are not searchable yet (index catching up)",
                field="dni",
            )
        return list(vecs)

    async def UpdateRequisition(
        self, request: pb.UpdateRequisitionRequest, context: Any
    ) -> pb.UpdateRequisitionResponse:
        req_id = check_id(request.requisition_id, "requisition_id")
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgument("name the fields to change", field="update_mask")
        values: dict[str, Any] = {}
        for p in paths:
            if p == "issuing_court":
                values[p] = check_text(
                    request.requisition.issuing_court,
                    "requisition.issuing_court",
                    max_len=256,
                    required=True,
                )
            elif p == "offence_category":
                values[p] = check_category(
                    request.requisition.offence_category, "requisition.offence_category"
                )
            elif p == "expires_at":
                when = timestamp(request.requisition.expires_at, "requisition.expires_at")
                if when <= dt.datetime.now(dt.UTC):
                    raise InvalidArgument("must lie in the future", field="requisition.expires_at")
                values[p] = when
            else:
                raise InvalidArgument(f"cannot update {p!r}", field="update_mask")

        async def work(caller: Caller, call: CallState, ctx: dict[str, Any]) -> Change:
            current = await self._run(self.c.records.get_requisition, req_id)
            if current.lifted_at is not None:
                raise FailedPrecondition(
                    "a lifted requisitoria cannot be changed", field="requisition_id"
                )
            rec = dataclasses.replace(current, **values)
            write = self.c.records.requisition_update(req_id, **values)
            if "expires_at" in values:
                write = write.then(
                    self.c.matcher.store.template_state_write(
                        rec.template_ids, active=True, expires_at=rec.expires_at
                    )
                )
            return Change(
                pb.UpdateRequisitionResponse(
                    requisition=requisition_pb(rec, dt.datetime.now(dt.UTC))
                ),
                refs={"requisition": req_id},
                write=write,
            )

        result: pb.UpdateRequisitionResponse = await self._change(
            "UpdateRequisition", request, pb.UpdateRequisitionResponse, work
        )
        return result

    async def LiftRequisition(
        self, request: pb.LiftRequisitionRequest, context: Any
    ) -> pb.LiftRequisitionResponse:
        req_id = check_id(request.requisition_id, "requisition_id")
        reason = check_text(request.reason, "reason", max_len=256, required=True)

        async def work(caller: Caller, call: CallState, ctx: dict[str, Any]) -> Change:
            current = await self._run(self.c.records.get_requisition, req_id)
            now = dt.datetime.now(dt.UTC)
            if current.lifted_at is not None:  # lifted already: nothing to change
                return Change(
                    pb.LiftRequisitionResponse(requisition=requisition_pb(current, now)),
                    refs={"requisition": req_id},
                )
            rec = dataclasses.replace(current, lifted_at=now, lift_reason=reason)
            write = self.c.matcher.store.template_state_write(
                current.template_ids, active=False, expires_at=current.expires_at
            ).then(self.c.records.requisition_update(req_id, lifted_at=now, lift_reason=reason))
            return Change(
                pb.LiftRequisitionResponse(requisition=requisition_pb(rec, now)),
                refs={"requisition": req_id},
                write=write,
            )

        result: pb.LiftRequisitionResponse = await self._change(
            "LiftRequisition", request, pb.LiftRequisitionResponse, work
        )
        return result

    async def ListRequisitions(
        self, request: pb.ListRequisitionsRequest, context: Any
    ) -> pb.ListRequisitionsResponse:
        if request.state != pb.REQUISITION_STATE_UNSPECIFIED and request.state not in _REQ_FILTER:
            raise InvalidArgument("unknown state", field="state")
        state = _REQ_FILTER.get(request.state, "")

        async def work(caller: Caller, call: CallState, ctx: dict[str, Any]) -> Change:
            now = dt.datetime.now(dt.UTC)
            chunk, nxt = await self._run(
                page_of,
                lambda offset, limit: self.c.records.list_requisitions(
                    state=state, now=now, offset=offset, limit=limit
                ),
                request.page_token,
                request.page_size,
            )
            return Change(
                pb.ListRequisitionsResponse(
                    requisitions=[requisition_pb(r, now) for r in chunk], next_page_token=nxt
                ),
                metrics={"results": len(chunk)},
            )

        result: pb.ListRequisitionsResponse = await self._change(
            "ListRequisitions", request, pb.ListRequisitionsResponse, work, reference_required=False
        )
        return result

    # ---- vehicles ----------------------------------------------------------------------

    async def ReportStolenVehicle(
        self, request: pb.ReportStolenVehicleRequest, context: Any
    ) -> pb.ReportStolenVehicleResponse:
        plate = normalise_plate(request.plate, field="plate")
        report_id = check_id(request.police_report_id, "police_report_id")
        category = check_category(request.report_category, "report_category")
        when = (
            timestamp(request.reported_at, "reported_at")
            if request.HasField("reported_at")
            else dt.datetime.now(dt.UTC)
        )
        digests = {"plate": self.c.digester.digest("plate", plate)}

        async def work(caller: Caller, call: CallState, ctx: dict[str, Any]) -> Change:
            if await self._run(self.c.records.report_in_use, report_id):
                raise AlreadyExists(
                    "a vehicle report cites that police report already", field="police_report_id"
                )
            planned = await self._run(self.c.matcher.store.plan_plate, plate)
            if not planned.created:
                raise FailedPrecondition("that plate is already reported stolen", field="plate")
            rec = VehicleRecord(
                planned.plate_ref, report_id, mask_plate(plate), category, when, None
            )
            return Change(
                pb.ReportStolenVehicleResponse(vehicle=vehicle_pb(rec)),
                refs={"report": planned.plate_ref},
                write=planned.then(self.c.records.vehicle_insert(rec)),
            )

        result: pb.ReportStolenVehicleResponse = await self._change(
            "ReportStolenVehicle", request, pb.ReportStolenVehicleResponse, work, digests=digests
        )
        return result

    async def RecoverVehicle(
        self, request: pb.RecoverVehicleRequest, context: Any
    ) -> pb.RecoverVehicleResponse:
        vehicle_id = check_id(request.vehicle_id, "vehicle_id")

        async def work(caller: Caller, call: CallState, ctx: dict[str, Any]) -> Change:
            current = await self._run(self.c.records.get_vehicle, vehicle_id)
            if not current.stolen:  # recovered already: nothing to change
                return Change(
                    pb.RecoverVehicleResponse(vehicle=vehicle_pb(current)),
                    refs={"report": vehicle_id},
                )
            now = dt.datetime.now(dt.UTC)
            rec = dataclasses.replace(current, recovered_at=now)
            write = self.c.matcher.store.plate_active_write(vehicle_id, False).then(
                self.c.records.vehicle_recover(vehicle_id, now)
            )
            return Change(
                pb.RecoverVehicleResponse(vehicle=vehicle_pb(rec)),
                refs={"report": vehicle_id},
                write=write,
            )

        result: pb.RecoverVehicleResponse = await self._change(
            "RecoverVehicle", request, pb.RecoverVehicleResponse, work
        )
        return result

    async def ListStolenVehicles(
        self, request: pb.ListStolenVehiclesRequest, context: Any
    ) -> pb.ListStolenVehiclesResponse:
        state = _VEH_FILTER.get(request.state, "")

        async def work(caller: Caller, call: CallState, ctx: dict[str, Any]) -> Change:
            chunk, nxt = await self._run(
                page_of,
                lambda offset, limit: self.c.records.list_vehicles(
                    state=state, offset=offset, limit=limit
                ),
                request.page_token,
                request.page_size,
            )
            return Change(
                pb.ListStolenVehiclesResponse(
                    vehicles=[vehicle_pb(v) for v in chunk], next_page_token=nxt
                ),
                metrics={"results": len(chunk)},
            )

        result: pb.ListStolenVehiclesResponse = await self._change(
            "ListStolenVehicles",
            request,
            pb.ListStolenVehiclesResponse,
            work,
            reference_required=False,
        )
        return result

    # ---- judicial authorisations ---------------------------------------------------------

    async def RegisterAuthorisation(
        self, request: pb.RegisterAuthorisationRequest, context: Any
    ) -> pb.RegisterAuthorisationResponse:
        a = request.authorisation
        auth_id = check_id(a.authorisation_id, "authorisation.authorisation_id")
        court = check_text(a.court, "authorisation.court", max_len=256, required=True)
        sites = [check_site_id(s, f"authorisation.site_ids[{i}]") for i, s in enumerate(a.site_ids)]
        offences = [
            check_category(o, f"authorisation.offence_categories[{i}]")
            for i, o in enumerate(a.offence_categories)
        ]
        if not a.HasField("not_before") or not a.HasField("not_after"):
            raise InvalidArgument(
                "not_before and not_after are required", field="authorisation.not_after"
            )
        dnis = [check_dni(d, f"named_dnis[{i}]") for i, d in enumerate(request.named_dnis)]

        async def work(caller: Caller, call: CallState, ctx: dict[str, Any]) -> Change:
            if await self._run(self.c.records.authorisation_exists, auth_id):
                raise AlreadyExists(
                    "an authorisation with that id exists", field="authorisation.authorisation_id"
                )
            # Named people are Reniec subjects (created, pseudonymous, if not imported yet).
            named = await self._run(self.c.matcher.store.plan_subjects, "reniec", dnis)
            rec = AuthorisationRecord(
                auth_id,
                court,
                tuple(sites),
                timestamp(a.not_before),
                timestamp(a.not_after),
                tuple(offences),
                tuple(named.refs),
                False,
            )
            refs, digests = external_id("authorization", auth_id, self.c.digester)
            return Change(
                pb.RegisterAuthorisationResponse(authorisation=authorisation_pb(rec)),
                refs=refs,
                digests=digests,
                metrics={"named_subjects": len(named.refs)},
                write=named.then(self.c.records.authorisation_insert(rec)),
            )

        result: pb.RegisterAuthorisationResponse = await self._change(
            "RegisterAuthorisation", request, pb.RegisterAuthorisationResponse, work
        )
        return result

    async def RevokeAuthorisation(
        self, request: pb.RevokeAuthorisationRequest, context: Any
    ) -> pb.RevokeAuthorisationResponse:
        auth_id = check_id(request.authorisation_id, "authorisation_id")

        async def work(caller: Caller, call: CallState, ctx: dict[str, Any]) -> Change:
            current = await self._run(self.c.records.get_authorisation, auth_id)
            refs, digests = external_id("authorization", auth_id, self.c.digester)
            return Change(
                pb.RevokeAuthorisationResponse(
                    authorisation=authorisation_pb(dataclasses.replace(current, revoked=True))
                ),
                refs=refs,
                digests=digests,
                write=Write() if current.revoked else self.c.records.authorisation_revoke(auth_id),
            )

        result: pb.RevokeAuthorisationResponse = await self._change(
            "RevokeAuthorisation", request, pb.RevokeAuthorisationResponse, work
        )
        return result

    async def ListAuthorisations(
        self, request: pb.ListAuthorisationsRequest, context: Any
    ) -> pb.ListAuthorisationsResponse:
        async def work(caller: Caller, call: CallState, ctx: dict[str, Any]) -> Change:
            chunk, nxt = await self._run(
                page_of,
                lambda offset, limit: self.c.records.list_authorisations(
                    include_revoked=request.include_revoked, offset=offset, limit=limit
                ),
                request.page_token,
                request.page_size,
            )
            return Change(
                pb.ListAuthorisationsResponse(
                    authorisations=[authorisation_pb(a) for a in chunk], next_page_token=nxt
                ),
                metrics={"results": len(chunk)},
            )

        result: pb.ListAuthorisationsResponse = await self._change(
            "ListAuthorisations",
            request,
            pb.ListAuthorisationsResponse,
            work,
            reference_required=False,
        )
        return result

    # ---- sites -------------------------------------------------------------------------

    async def RegisterSite(
        self, request: pb.RegisterSiteRequest, context: Any
    ) -> pb.RegisterSiteResponse:
        s = request.site
        site_id = check_site_id(s.site_id, "site.site_id")
        if not site_id[0].isalpha():
            raise InvalidArgument("must start with a letter", field="site.site_id")
        municipality = check_id(s.municipality, "site.municipality")
        region = check_id(s.region, "site.region")
        if s.kind not in (pb.SITE_KIND_CAMERA, pb.SITE_KIND_PORTICO):
            raise InvalidArgument("must be CAMERA or PORTICO", field="site.kind")
        description = check_text(s.description, "site.description", max_len=256)

        async def work(caller: Caller, call: CallState, ctx: dict[str, Any]) -> Change:
            if await self._run(self.c.records.site_exists, site_id):
                raise AlreadyExists("a site with that id exists", field="site.site_id")
            rec = SiteRecord(site_id, municipality, region, int(s.kind), description, True)
            return Change(
                pb.RegisterSiteResponse(site=site_pb(rec)), write=self.c.records.site_insert(rec)
            )

        result: pb.RegisterSiteResponse = await self._change(
            "RegisterSite", request, pb.RegisterSiteResponse, work
        )
        return result

    async def DeactivateSite(
        self, request: pb.DeactivateSiteRequest, context: Any
    ) -> pb.DeactivateSiteResponse:
        site_id = check_site_id(request.site_id, "site_id")

        async def work(caller: Caller, call: CallState, ctx: dict[str, Any]) -> Change:
            current = await self._run(self.c.records.get_site, site_id)
            write = self.c.records.site_active(site_id, False) if current.active else Write()
            return Change(
                pb.DeactivateSiteResponse(site=site_pb(dataclasses.replace(current, active=False))),
                write=write,
            )

        result: pb.DeactivateSiteResponse = await self._change(
            "DeactivateSite", request, pb.DeactivateSiteResponse, work
        )
        return result

    async def ListSites(self, request: pb.ListSitesRequest, context: Any) -> pb.ListSitesResponse:
        municipality = check_id(request.municipality, "municipality", required=False)

        async def work(caller: Caller, call: CallState, ctx: dict[str, Any]) -> Change:
            chunk, nxt = await self._run(
                page_of,
                lambda offset, limit: self.c.records.list_sites(
                    municipality, offset=offset, limit=limit
                ),
                request.page_token,
                request.page_size,
            )
            return Change(
                pb.ListSitesResponse(sites=[site_pb(s) for s in chunk], next_page_token=nxt),
                metrics={"results": len(chunk)},
            )

        result: pb.ListSitesResponse = await self._change(
            "ListSites", request, pb.ListSitesResponse, work, reference_required=False
        )
        return result

    # ---- sightings (rastreo) ------------------------------------------------------------

    async def ListSightings(
        self, request: pb.ListSightingsRequest, context: Any
    ) -> pb.ListSightingsResponse:
        caller, call = current_caller(), current_call()
        ctx = check_context(request.context, purpose_required=False)
        reference = check_id(request.reference, "reference")
        now = dt.datetime.now(dt.UTC)
        if reference.startswith("req_"):
            rec = await self._run(self.c.records.get_requisition, reference)
            gallery, active = WATCHLIST, rec.state(now) == "ACTIVE"
        elif reference.startswith("veh_"):
            vehicle = self.c.view.stolen_vehicle(reference)
            gallery, active = "stolen_vehicles", vehicle is not None
        else:
            raise InvalidArgument(
                "must be a requisition_id (req_…) or vehicle_id (veh_…)", field="reference"
            )
        if not active:
            raise FailedPrecondition(
                "sightings are kept for active requisitorias and stolen vehicles only",
                field="reference",
            )
        decision, decision_id = await self.c.pipeline.authorise(
            "ListSightings",
            call=call,
            caller=caller,
            context=ctx,
            mode="READ",
            refs={"requisition": reference} if gallery == WATCHLIST else {"report": reference},
        )
        days = self.c.sighting_retention_days().get(gallery, 0.0)
        items = await self._run(
            self.c.alerts.by_reference, reference, not_before=now - dt.timedelta(days=days)
        )
        scope = decision.obligations.alert_scope
        visible = [a for a in items if in_scope(scope, a)]
        chunk, nxt = page(visible, request.page_token, request.page_size)
        event = self.c.pipeline.event(
            EventType.SIGHTING_READ,
            call=call,
            caller=caller,
            context=ctx,
            decision=decision,
            decision_id=decision_id,
            outcome="READ",
            refs={"requisition": reference} if gallery == WATCHLIST else {"report": reference},
            metrics={"results": len(chunk)},
        )
        await self.c.pipeline.append(event)
        return pb.ListSightingsResponse(
            sightings=[
                pb.Sighting(
                    alert_id=a.alert_id,
                    decision_id=a.decision_id,
                    site_id=a.site_id,
                    capture_time=_ts(a.capture_time),
                    confirmation_state=a.state,
                )
                for a in chunk
            ],
            next_page_token=nxt,
        )
