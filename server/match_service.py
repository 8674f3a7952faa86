"""MatchService: identity → validation → policy → match → durable audit → minimal response.

Invariants (DESIGN.md §2, LEGAL_RULES R1–R14):

* The order is fixed: the caller comes from the verified certificate (interceptor), then
  input validation, then the policy decision, then the matcher, then the durable audit
  append, and only then the response. No candidate leaves the process without its entry.
* A probe is never stored (R11): the audit keeps an HMAC of its bytes; the matcher holds it
  only for the search.
* Responses are shaped by the decision's obligations (R10): sub-threshold candidates never
  appear, registry fields never appear, subject refs only where ``visible_fields`` allow.
* StreamMatch answers each message in order with its own result or error; one bad message
  does not end the stream, and at most one probe per stream is in flight (flow control is
  the transport's: the server reads the next message only after answering the previous).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf.message import Message
from sqlalchemy.engine import Connection

from centinela import __version__
from centinela.audit.entry import EventType
from centinela.errors import CentinelaError, InvalidArgument, NotFound
from centinela.logs import get_logger
from centinela.matcher.plates import PlateRead
from centinela.matcher.rwlock import WouldBlock
from centinela.policy import Decision
from centinela.server.admission import InFlight
from centinela.server.alerts import (
    CONFIRMED,
    PARTIAL,
    PENDING,
    REJECTED,
    Alert,
    in_scope,
    score_band,
)
from centinela.server.calibration import Calibrator, calibration_state
from centinela.server.components import Components
from centinela.server.context import CallState, current_call, current_caller
from centinela.server.identity import Caller
from centinela.server.interceptors import MalformedRequest, status_code
from centinela.server.pipeline import decision_info
from centinela.server.records import ordered_id
from centinela.server.unimplemented import UnimplementedMatch
from centinela.server.validation import (
    GALLERIES,
    GALLERY_ENUM,
    check_context,
    check_dni,
    check_face_probe,
    check_id,
    check_plate_read,
    check_site_id,
    check_text,
)
from centinela.storage import unreachable
from centinela.v1 import common_pb2
from centinela.v1 import match_service_pb2 as pb

FACE_GALLERIES = ("pnp_watchlist", "reniec_registry")
INSTRUCTIONS = {
    "pnp_watchlist": "Do not intervene alone: alert the PNP center and wait for human review (R9).",
    "reniec_registry": "Investigation lead only: every candidate needs human review (R8, R9).",
    "stolen_vehicles": "Report the sighting to the PNP center; do not stop the vehicle alone.",
}
M = TypeVar("M", bound=Message)

STATE_ENUM = {
    PENDING: pb.ALERT_STATE_PENDING,
    PARTIAL: pb.ALERT_STATE_PARTIALLY_CONFIRMED,
    CONFIRMED: pb.ALERT_STATE_CONFIRMED,
    REJECTED: pb.ALERT_STATE_REJECTED,
}
_MODES = {
    common_pb2.SEARCH_MODE_UNSPECIFIED: "ALERT",
    common_pb2.SEARCH_MODE_ALERT: "ALERT",
    common_pb2.SEARCH_MODE_INVESTIGATION: "INVESTIGATION",
}

log = get_logger("server.match")


#: ``AuditLog.history_verified`` as the API reports it.
_HISTORY_CHECK = {
    None: pb.AUDIT_HISTORY_CHECK_RUNNING,
    True: pb.AUDIT_HISTORY_CHECK_PASSED,
    False: pb.AUDIT_HISTORY_CHECK_FAILED,
}


def _gallery_names(values: Any, *, allowed: tuple[str, ...], field: str) -> list[str]:
    names: list[str] = []
    for i, g in enumerate(values):
        name = GALLERIES.get(g)
        if name is None or name not in allowed:
            raise InvalidArgument("is not a gallery this RPC can search", field=f"{field}[{i}]")
        if name not in names:
            names.append(name)
    return names


def _requested(max_results: int, min_score: float) -> dict[str, Any]:
    """What the caller asked for; zero means "the policy's default" and is left out."""
    out: dict[str, Any] = {}
    if max_results:
        out["max_results"] = int(max_results)
    if min_score:
        out["min_score"] = float(min_score)
    return out


def _parse_cursor(cursor: str) -> int | None:
    """A subscription cursor (``ev-<n>``) as an outbox position; empty means "from now"."""
    if not cursor:
        return None
    if not cursor.startswith("ev-") or not cursor[3:].isdigit():
        raise InvalidArgument("is not a cursor from a previous alert", field="cursor")
    return int(cursor[3:])


def _timestamp(when: dt.datetime) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    t.FromDatetime(when)
    return t


def _check_alert_scope(scope: Any, alert: Any) -> None:
    """R10: a caller sees and confirms only the alerts of its jurisdiction.

    Raises:
        NotFound: the alert lies outside the caller's scope (as if it did not exist).
    """
    if not in_scope(scope, alert):
        raise NotFound("no such alert", field="alert_id")


def _give_back(
    admission: InFlight, caller: str, started: float
) -> Callable[[asyncio.Task[Any]], None]:
    """A done callback that returns a stream probe's in-flight unit."""

    def done(_task: asyncio.Task[Any]) -> None:
        admission.leave(time.perf_counter() - started, stream=True, caller=caller)

    return done


@functools.lru_cache(maxsize=4096)
def _alert_message(seq: int, alert: Alert) -> pb.SubscribeAlertsResponse:
    """One outbox event as sent to subscribers; built once and shared by all of them (the
    message is never mutated after this)."""
    return pb.SubscribeAlertsResponse(
        cursor=f"ev-{seq}",
        alert_id=alert.alert_id,
        decision_id=alert.decision_id,
        site_id=alert.site_id,
        capture_time=_timestamp(alert.capture_time),
        gallery=GALLERY_ENUM.get(alert.gallery, common_pb2.GALLERY_UNSPECIFIED),
        reference=alert.reference,
        category=alert.category,
        score_band=alert.score_band,
        state=STATE_ENUM.get(alert.state, pb.ALERT_STATE_UNSPECIFIED),
        confirmations=alert.confirmations,
    )


#: Probes of one StreamMatch in flight at once (answers still go out in order).
STREAM_WINDOW = 16


class SearchPlacement:
    """Where one kind of search runs: on the event loop while it is cheap, beside it after.

    The cost is a moving average of searches timed on the loop (``record``). Above
    ``max_inline_s`` searches go to the executor; one in ``probe_every`` still runs on the
    loop, so the average follows the index as it grows or shrinks. It is a safety valve for
    galleries whose search would stall every other call for milliseconds (a national
    registry), not a tuning knob: measured on 2 cores (``benchmarks/match_e2e.py`` server),
    a search costs 0.26 / 0.32 / 0.77 ms p50 at 10k / 100k / 1M templates. Sending 1M to
    the executor (a 0.5 ms threshold) gave 5-6% more MatchFace/s at c = 32 in alternating
    runs, within the 20% by which whole runs differ here, and cost ~0.5 ms a call at c = 1
    (p50 2.5 -> 3.1 ms). Hence 2 ms: no gallery measured here crosses it.
    """

    MAX_INLINE_S = 0.002
    PROBE_EVERY = 64
    WEIGHT = 0.1

    def __init__(self, max_inline_s: float = MAX_INLINE_S, probe_every: int = PROBE_EVERY):
        self.max_inline_s = max_inline_s
        self.probe_every = probe_every
        self.cost_s: float | None = None
        self._calls = 0

    def inline(self) -> bool:
        """Whether the next search should run on the loop."""
        self._calls += 1
        cost = self.cost_s
        return cost is None or cost <= self.max_inline_s or self._calls % self.probe_every == 0

    def record(self, seconds: float) -> None:
        """A search that ran on the loop took ``seconds``."""
        cost = self.cost_s
        self.cost_s = seconds if cost is None else cost + self.WEIGHT * (seconds - cost)


class MatchServicer(UnimplementedMatch):  # type: ignore[misc]
    """The MatchService implementation."""

    def __init__(self, components: Components) -> None:
        self.c = components
        self.calibrator = Calibrator(components)
        self.placement: collections.defaultdict[str, SearchPlacement] = collections.defaultdict(
            SearchPlacement
        )

    # ---- helpers -----------------------------------------------------------------------

    async def _search(self, fn: Any, *args: Any, **kw: Any) -> Any:
        """Run a matcher search on the event loop while that is cheap, else in a thread.

        A search on a free index takes ~0.3 ms at 100k templates (hnswlib, GIL released),
        while the trip to an executor thread and back cost several under load: each crossing
        waits for the GIL behind the loop. At 10,000 templates and 32 callers, inline searches
        and idempotency look-ups took MatchFace from 645 to 823 calls/s and p99 from 113 to
        63 ms (medians of three alternating runs). A search that costs more (0.8 ms at 1M)
        is better run beside the loop, which also keeps it from stalling every other call:
        :class:`SearchPlacement` decides, per search kind and gallery, from measured costs.
        When a writer holds or awaits the index (an import, a catch-up) the search waits for
        it in the executor, never on the loop.
        """
        gallery = args[0] if args and isinstance(args[0], str) else ""
        placement = self.placement[f"{fn.__name__}:{gallery}"]
        if placement.inline():
            try:
                began = time.perf_counter()
                hits = fn(*args, wait=False, **kw)
            except WouldBlock:
                pass
            else:
                placement.record(time.perf_counter() - began)
                return hits
        return await self._in_executor(fn, *args, **kw)

    async def _in_executor(self, fn: Any, *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.c.executor, lambda: fn(*args, **kw))

    async def _idempotent(
        self,
        request: Any,
        rpc: str,
        compute: Callable[[Any, Caller, CallState], Awaitable[M]],
        cls: type[M],
        *,
        call: CallState | None = None,
    ) -> M:
        """Answer ``request`` with ``compute``, once per client request id (stored answer)."""
        caller = current_caller()
        state = call or current_call()
        answered: list[M] = []

        async def run() -> bytes:
            msg = await compute(request, caller, state)
            answered.append(msg)
            return bytes(msg.SerializeToString())

        data, replayed = await self.c.idempotency.run(
            caller.name,
            request.context.client_request_id,
            rpc,
            run,
            request=request.SerializeToString(deterministic=True),
        )
        # A replay (stored, or a concurrent duplicate's) is read back from its bytes.
        return cls.FromString(data) if replayed or not answered else answered[-1]

    def _info(self, decision: Decision, decision_id: str, index: int) -> common_pb2.DecisionInfo:
        return decision_info(decision, decision_id, index, self.c.bundle_name)

    # ---- MatchFace ---------------------------------------------------------------------

    async def MatchFace(self, request: pb.MatchFaceRequest, context: Any) -> pb.MatchFaceResponse:
        return await self._idempotent(request, "MatchFace", self._match_face, pb.MatchFaceResponse)

    async def _match_face(
        self, request: pb.MatchFaceRequest, caller: Caller, call: CallState
    ) -> pb.MatchFaceResponse:
        now = dt.datetime.now(dt.UTC)
        ctx = check_context(
            request.context,
            site_required=caller.kind == "municipality",
            capture_required=True,
            now=now,
        )
        asked = _gallery_names(request.galleries, allowed=FACE_GALLERIES, field="galleries")
        if request.mode not in _MODES:
            raise InvalidArgument("unknown search mode", field="mode")
        mode = _MODES[request.mode]
        if not 0.0 <= request.min_score <= 1.0:
            raise InvalidArgument("must lie in [0, 1]", field="min_score")
        vec = check_face_probe(
            request.probe, model_id=self.c.face_model_id, dimension=self._dimension()
        )
        digests = {"probe": self.c.digester.digest("probe", vec.tobytes())}
        rate = self.c.pipeline.rates.observe(caller.name, ctx["site_id"])
        decision, decision_id = await self.c.pipeline.authorise(
            "MatchFace",
            call=call,
            caller=caller,
            context=ctx,
            digests=digests,
            galleries=asked or ["pnp_watchlist"],
            mode=mode,
            rate=rate,
            requested=_requested(request.max_results, request.min_score),
            probe={
                "kind": "face",
                "quality": float(request.probe.quality),
                "model_id": request.probe.model_id,
            },
        )
        ob = decision.obligations
        galleries = [g for g in ob.galleries if g in FACE_GALLERIES and (not asked or g in asked)]
        k = max(1, min(ob.max_results or 1, int(request.max_results) or ob.max_results or 1))
        exempt = frozenset(ob.objection_exempt_subjects)
        found: list[tuple[str, Any]] = []
        for g in galleries:
            floor = float(ob.min_score.get(g, 1.0))
            hits = await self._search(
                self.c.matcher.search_faces,
                g,
                vec,
                model_id=self.c.face_model_id,
                k=k,
                min_score=max(floor, float(request.min_score)),
                now=now,
                exclude_objectors=ob.exclude_objectors,
                exempt_subjects=exempt,
            )
            found.extend((g, h) for h in hits)
        found.sort(key=lambda gh: -gh[1].score)
        found = found[:k]
        visible = set(ob.visible_fields)
        candidates: list[pb.FaceCandidate] = []
        alert_rows: list[dict[str, Any]] = []
        refs: dict[str, str] = {}
        for g, hit in found:
            reference, category = "", ""
            if g == "pnp_watchlist":
                req = self.c.view.active_requisition(hit.subject_ref, now)
                if req is None:  # lifted or expired since the index last caught up (R6)
                    continue
                reference, category = req.requisition_id, req.offence_category
            alert_id = ordered_id("alt") if mode == "ALERT" else ""
            cand = pb.FaceCandidate(
                gallery=GALLERY_ENUM[g],
                requires_human_review=True,
                instructions=INSTRUCTIONS[g],
            )
            if "reference" in visible or "alert" in visible:
                cand.reference = reference
            if "offence_category" in visible:
                cand.offence_category = category
            if "score" in visible:
                cand.score = hit.score
            if "subject_ref" in visible:
                cand.subject_ref = hit.subject_ref
            if alert_id:
                cand.alert_id = alert_id
                alert_rows.append(
                    self._alert_row(
                        alert_id,
                        decision_id,
                        caller,
                        ctx,
                        now,
                        gallery=g,
                        reference=reference or hit.subject_ref,
                        category=category or "-",
                        band=score_band(hit.score, float(ob.min_score.get(g, 0.0))),
                        confirmations_required=2 if ob.two_person_confirmation else 1,
                    )
                )
            candidates.append(cand)
        if candidates:
            first = candidates[0]
            if first.reference:
                refs["requisition"] = first.reference
            if first.alert_id:
                refs["alert"] = first.alert_id
        outcome_name = "HIT" if candidates else "NO_HIT"
        event = self.c.pipeline.event(
            EventType.MATCH_DECISION,
            call=call,
            caller=caller,
            context=ctx,
            decision=decision,
            decision_id=decision_id,
            outcome=outcome_name,
            refs=refs,
            digests=digests,
            metrics={
                "candidates": len(candidates),
                "top_score": round(found[0][1].score, 6) if found else 0.0,
            },
        )

        def respond(index: int) -> pb.MatchFaceResponse:
            return pb.MatchFaceResponse(
                decision=self._info(decision, decision_id, index),
                alert=bool(candidates) and mode == "ALERT",
                candidates=candidates,
                requires_human_review=bool(candidates),
                confirmations_required=(
                    (2 if ob.two_person_confirmation else 1) if candidates else 0
                ),
            )

        answer = await self.c.pipeline.commit(event, respond, alerts=alert_rows)
        if alert_rows:
            self.c.bus.notify()
        return answer

    def _alert_row(
        self,
        alert_id: str,
        decision_id: str,
        caller: Caller,
        ctx: dict[str, Any],
        now: dt.datetime,
        *,
        gallery: str,
        reference: str,
        category: str,
        band: str,
        confirmations_required: int,
    ) -> dict[str, Any]:
        """An alert row for the outbox; its site decides who sees it (R10)."""
        site = self.c.view.site(ctx["site_id"]) if ctx["site_id"] else None
        return {
            "alert_id": alert_id,
            "decision_id": decision_id,
            "audit_index": -1,
            "caller_org": caller.org,
            "site_id": ctx["site_id"] or "-",
            "municipality": site.municipality if site else caller.org,
            "region": site.region if site else caller.region,
            "capture_time": dt.datetime.fromisoformat(
                ctx.get("capture_time", now.isoformat())
            ).timestamp(),
            "gallery": gallery,
            "reference": reference,
            "category": category,
            "score_band": band,
            "state": PENDING,
            "confirmations_required": confirmations_required,
            "created_at": now.timestamp(),
        }

    def _dimension(self) -> int:
        return int(self.c.matcher.specs["pnp_watchlist"].dim)

    # ---- MatchPlate --------------------------------------------------------------------

    async def MatchPlate(
        self, request: pb.MatchPlateRequest, context: Any
    ) -> pb.MatchPlateResponse:
        return await self._idempotent(
            request, "MatchPlate", self._match_plate, pb.MatchPlateResponse
        )

    async def _match_plate(
        self, request: pb.MatchPlateRequest, caller: Caller, call: CallState
    ) -> pb.MatchPlateResponse:
        now = dt.datetime.now(dt.UTC)
        ctx = check_context(
            request.context,
            site_required=caller.kind == "municipality",
            capture_required=True,
            now=now,
        )
        check_plate_read(request.read)
        digests = {"plate": self.c.digester.digest("plate", request.read.text.upper())}
        rate = self.c.pipeline.rates.observe(caller.name, ctx["site_id"])
        decision, decision_id = await self.c.pipeline.authorise(
            "MatchPlate",
            call=call,
            caller=caller,
            context=ctx,
            digests=digests,
            galleries=["stolen_vehicles"],
            mode="ALERT",
            rate=rate,
            requested={},
            probe={"kind": "plate", "quality": float(request.read.quality), "model_id": ""},
        )
        ob = decision.obligations
        candidates: list[pb.PlateCandidate] = []
        alert_rows: list[dict[str, Any]] = []
        if "stolen_vehicles" in ob.galleries:
            read = PlateRead(
                text=request.read.text,
                confidences=list(request.read.confidences) or None,
                alternatives=list(request.read.alternatives),
            )
            floor = float(ob.min_score.get("stolen_vehicles", 1.0))
            hits = await self._search(
                self.c.matcher.search_plates, read, k=max(1, ob.max_results or 1)
            )
            for hit in hits:
                if hit.score < floor:
                    continue
                vehicle = self.c.view.stolen_vehicle(hit.ref)
                if vehicle is None:  # recovered (R6)
                    continue
                alert_id = ordered_id("alt")
                candidates.append(
                    pb.PlateCandidate(
                        reference=vehicle.vehicle_id,
                        police_report_id=vehicle.police_report_id,
                        report_category=vehicle.report_category,
                        score=hit.score,
                        alert_id=alert_id,
                        instructions=INSTRUCTIONS["stolen_vehicles"],
                    )
                )
                alert_rows.append(
                    self._alert_row(
                        alert_id,
                        decision_id,
                        caller,
                        ctx,
                        now,
                        gallery="stolen_vehicles",
                        reference=vehicle.vehicle_id,
                        category=vehicle.report_category,
                        band=score_band(hit.score, floor),
                        confirmations_required=1,
                    )
                )
        refs: dict[str, str] = {}
        if candidates:
            refs = {"report": candidates[0].reference, "alert": candidates[0].alert_id}
        event = self.c.pipeline.event(
            EventType.MATCH_DECISION,
            call=call,
            caller=caller,
            context=ctx,
            decision=decision,
            decision_id=decision_id,
            outcome="HIT" if candidates else "NO_HIT",
            refs=refs,
            digests=digests,
            metrics={"candidates": len(candidates)},
        )

        def respond(index: int) -> pb.MatchPlateResponse:
            return pb.MatchPlateResponse(
                decision=self._info(decision, decision_id, index),
                alert=bool(candidates),
                candidates=candidates,
            )

        answer = await self.c.pipeline.commit(event, respond, alerts=alert_rows)
        if alert_rows:
            self.c.bus.notify()
        return answer

    # ---- StreamMatch -------------------------------------------------------------------

    async def StreamMatch(
        self, request_iterator: AsyncIterator[pb.StreamMatchRequest], context: Any
    ) -> AsyncIterator[pb.StreamMatchResponse]:
        """Many probes on one stream, answered in order, up to ``STREAM_WINDOW`` at once.

        A reader task takes probes off the stream and starts each as its own task; answers
        are yielded in arrival order. When ``STREAM_WINDOW`` answers are outstanding the
        reader stops reading, so HTTP/2 flow control holds the sender back. Probes in
        flight together share group commits, which is what makes a stream cheaper than as
        many unary calls. One bad message gets its own error answer; the stream goes on.
        """
        caller, call = current_caller(), current_call()
        pending: asyncio.Queue[asyncio.Task[pb.StreamMatchResponse] | None] = asyncio.Queue(
            maxsize=STREAM_WINDOW
        )

        admission = call.admission

        async def read() -> None:
            try:
                async for item in request_iterator:
                    if admission is not None:
                        # One unit per probe; at the limit, wait (and stop reading the stream).
                        await admission.acquire(call.share, org=call.org, stream=True)
                    task = asyncio.create_task(self._stream_one(item, caller, call))
                    if admission is not None:
                        # Given back when the probe is done, even if cancelled unstarted.
                        task.add_done_callback(
                            _give_back(admission, call.share, time.perf_counter())
                        )
                    await pending.put(task)
            finally:
                await pending.put(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader  # the stream's own failure, if any, ends the call
        finally:
            reader.cancel()
            while not pending.empty():
                left = pending.get_nowait()
                if left is not None:
                    left.cancel()

    async def _stream_one(
        self, item: Any, caller: Caller, call: CallState
    ) -> pb.StreamMatchResponse:
        msg: Any = item  # a StreamMatchRequest, or MalformedRequest for undecodable bytes
        seq = int(getattr(msg, "sequence", 0))
        sub = CallState(request_id=f"{call.request_id}.{seq}", method=call.method, caller=caller)
        try:
            if isinstance(msg, MalformedRequest):
                raise InvalidArgument("the message is not a valid StreamMatchRequest")
            which = msg.WhichOneof("probe")
            if which == "face":
                face = await self._idempotent(
                    msg.face, "MatchFace", self._match_face, pb.MatchFaceResponse, call=sub
                )
                return pb.StreamMatchResponse(sequence=msg.sequence, face=face)
            if which == "plate":
                plate = await self._idempotent(
                    msg.plate, "MatchPlate", self._match_plate, pb.MatchPlateResponse, call=sub
                )
                return pb.StreamMatchResponse(sequence=msg.sequence, plate=plate)
            raise InvalidArgument("carries neither a face nor a plate", field="probe")
        except Exception as exc:
            # A database that cannot serve now fails this probe UNAVAILABLE, not the stream.
            err = exc if isinstance(exc, CentinelaError) else unreachable(exc)
            if err is None:
                raise
            if err is not exc:
                log.warning(
                    "stream.probe_database_unavailable",
                    request_id=sub.request_id,
                    error_type=type(exc).__name__,
                )
            return pb.StreamMatchResponse(
                sequence=seq,
                error=common_pb2.ErrorStatus(
                    code=status_code(err).value[0],
                    message=err.diagnostics(),
                    field=err.field or "",
                    rule_ids=list(err.rule_ids),
                    decision_id=err.decision_id or "",
                ),
            )

    # ---- VerifyFace --------------------------------------------------------------------

    async def VerifyFace(
        self, request: pb.VerifyFaceRequest, context: Any
    ) -> pb.VerifyFaceResponse:
        return await self._idempotent(request, "VerifyFace", self._verify, pb.VerifyFaceResponse)

    async def _verify(
        self, request: pb.VerifyFaceRequest, caller: Caller, call: CallState
    ) -> pb.VerifyFaceResponse:
        ctx = check_context(request.context)
        dni = check_dni(request.dni)
        vec = check_face_probe(
            request.probe, model_id=self.c.face_model_id, dimension=self._dimension()
        )
        digests = {
            "probe": self.c.digester.digest("probe", vec.tobytes()),
            "dni": self.c.digester.digest("dni", dni),
        }
        rate = self.c.pipeline.rates.observe(caller.name, ctx["site_id"])
        decision, decision_id = await self.c.pipeline.authorise(
            "VerifyFace",
            call=call,
            caller=caller,
            context=ctx,
            digests=digests,
            galleries=["reniec_registry"],
            mode="VERIFY",
            rate=rate,
            requested={"max_results": 1},
            probe={
                "kind": "face",
                "quality": float(request.probe.quality),
                "model_id": request.probe.model_id,
            },
        )
        threshold = float(decision.obligations.min_score.get("reniec_registry", 1.0))
        try:
            score = float(
                await self._in_executor(
                    self.c.matcher.verify,
                    "reniec_registry",
                    vec,
                    model_id=self.c.face_model_id,
                    dni=dni,
                )
            )
        except NotFound:
            score = 0.0
        match = score >= threshold
        event = self.c.pipeline.event(
            EventType.MATCH_DECISION,
            call=call,
            caller=caller,
            context=ctx,
            decision=decision,
            decision_id=decision_id,
            outcome="MATCH" if match else "NO_MATCH",
            digests=digests,
            metrics={"score": round(score, 6), "threshold": threshold},
        )

        def respond(index: int) -> pb.VerifyFaceResponse:
            return pb.VerifyFaceResponse(
                decision=self._info(decision, decision_id, index), match=match, score=score
            )

        return await self.c.pipeline.commit(event, respond)

    # ---- ConfirmAlert ------------------------------------------------------------------

    async def ConfirmAlert(
        self, request: pb.ConfirmAlertRequest, context: Any
    ) -> pb.ConfirmAlertResponse:
        return await self._idempotent(
            request, "ConfirmAlert", self._confirm, pb.ConfirmAlertResponse
        )

    async def _confirm(
        self, request: pb.ConfirmAlertRequest, caller: Caller, call: CallState
    ) -> pb.ConfirmAlertResponse:
        now = dt.datetime.now(dt.UTC)
        ctx = check_context(request.context, purpose_required=False)
        if not ctx["operator_id"]:
            raise InvalidArgument(
                "is required: confirmations count distinct people (R9)",
                field="context.operator_id",
            )
        alert_id = check_id(request.alert_id, "alert_id")
        check_text(request.note, "note", max_len=512)
        verdicts = {pb.ALERT_VERDICT_CONFIRMED: CONFIRMED, pb.ALERT_VERDICT_REJECTED: REJECTED}
        if request.verdict not in verdicts:
            raise InvalidArgument("must be CONFIRMED or REJECTED", field="verdict")
        person = f"{caller.name}/{ctx['operator_id']}"
        alert = await self._in_executor(
            self.c.alerts.check_confirmable, alert_id, person, verdicts[request.verdict]
        )
        ctx["site_id"] = ctx["site_id"] or alert.site_id
        decision, decision_id = await self.c.pipeline.authorise(
            "ConfirmAlert",
            call=call,
            caller=caller,
            context=ctx,
            refs={"alert": alert_id},
            mode="ALERT",
            alert={
                "site_id": alert.site_id,
                "municipality": alert.municipality,
                "region": alert.region,
                "gallery": alert.gallery,
            },
        )
        _check_alert_scope(decision.obligations.alert_scope, alert)
        verdict = verdicts[request.verdict]
        # The entry records this person's verdict; the alert's state follows from the
        # sequence of verdicts and is updated in the entry's own transaction.
        event = self.c.pipeline.event(
            EventType.ALERT_CONFIRMATION,
            call=call,
            caller=caller,
            context=ctx,
            decision=decision,
            decision_id=decision_id,
            outcome=verdict,
            refs={"alert": alert_id},
        )
        updated: list[Alert] = []

        def apply(conn: Connection, index: int) -> None:
            updated.append(self.c.alerts.confirm_in(conn, alert_id, person, verdict, now))

        def respond(index: int) -> pb.ConfirmAlertResponse:
            a = updated[0]
            return pb.ConfirmAlertResponse(
                decision=self._info(decision, decision_id, index),
                state=STATE_ENUM[a.state],
                confirmations=a.confirmations,
                confirmations_required=a.confirmations_required,
                actionable=a.state == CONFIRMED,
            )

        answer = await self.c.pipeline.commit(event, respond, extra=apply)
        self.c.bus.notify()
        return answer

    # ---- SubscribeAlerts -----------------------------------------------------------------

    async def SubscribeAlerts(
        self, request: pb.SubscribeAlertsRequest, context: Any
    ) -> AsyncIterator[pb.SubscribeAlertsResponse]:
        caller, call = current_caller(), current_call()
        ctx = check_context(request.context, purpose_required=False)
        sites = {check_site_id(s, f"site_ids[{i}]") for i, s in enumerate(request.site_ids)}
        cursor = _parse_cursor(request.cursor)
        decision, decision_id = await self.c.pipeline.authorise(
            "SubscribeAlerts", call=call, caller=caller, context=ctx, mode="READ"
        )
        scope = decision.obligations.alert_scope
        await self.c.pipeline.append(
            self.c.pipeline.event(
                EventType.ALERT_SUBSCRIPTION,
                call=call,
                caller=caller,
                context=ctx,
                decision=decision,
                decision_id=decision_id,
                outcome="SUBSCRIBED",
            )
        )
        feed = self.c.alert_feed()
        if cursor is None:
            cursor = await feed.start_position()
        while True:
            events = await feed.after(cursor)
            for seq, alert in events:
                cursor = seq
                if not in_scope(scope, alert) or (sites and alert.site_id not in sites):
                    continue
                yield _alert_message(seq, alert)

    # ---- GetServerInfo -----------------------------------------------------------------

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Any
    ) -> pb.GetServerInfoResponse:
        caller = current_caller()
        c = self.c
        galleries = []
        for name, g in c.matcher.galleries.items():
            cal = calibration_state(c, name)
            galleries.append(
                pb.GalleryInfo(
                    gallery=GALLERY_ENUM[name],
                    model_id=g.model_id,
                    dimension=g.dim,
                    size=len(g),
                    threshold=self._floor(name),
                    calibrated_size=cal.calibrated_size,
                    expected_fpir=cal.expected_fpir,
                    target_fpir=cal.target_fpir,
                    active=cal.active,
                )
            )
        galleries.append(
            pb.GalleryInfo(
                gallery=GALLERY_ENUM["stolen_vehicles"],
                size=len(c.matcher.plates),
                threshold=self._floor("stolen_vehicles"),
            )
        )
        framework = self._framework()
        return pb.GetServerInfoResponse(
            version=__version__,
            policy_bundle=c.bundle_name,
            policy_bundle_digest=c.policy.bundle_digest.removeprefix("sha256:"),
            shadow_bundle=c.shadow_name,
            shadow_bundle_digest=(c.policy.shadow_digest or "").removeprefix("sha256:"),
            facial_matching_enabled=bool(framework.get("facial_matching_enabled", False)),
            galleries=galleries,
            audit_size=c.audit.size,
            caller_org=caller.org,
            caller_kind=caller.kind,
            caller_roles=list(caller.roles),
            audit_history_check=_HISTORY_CHECK[c.audit.history_verified],
            audit_history_checked_size=c.audit.history_checked_size,
        )

    # ---- CalibrateGallery --------------------------------------------------------------

    async def CalibrateGallery(
        self, request_iterator: AsyncIterator[pb.CalibrateGalleryRequest], context: Any
    ) -> pb.CalibrateGalleryResponse:
        return await self.calibrator.run(request_iterator)

    def _framework(self) -> dict[str, Any]:
        return dict(self.c.policy_config().get("framework", {}))

    def _floor(self, gallery: str) -> float:
        g = self.c.policy_config().get("galleries", {}).get(gallery, {})
        return float(g.get("threshold_floor", 0.0))
