"""RegistryService: Reniec loads and maintains the registry templates and the objections.

Invariants (DESIGN.md §3–4; LEGAL_RULES R7, R13, R15):

* Every RPC is decided by the policy before any work (only Reniec's data-owner role is
  granted; everyone else is denied and the denial is audited), and every change is audited
  with pseudonymous references, keyed digests and counts — never a DNI or a vector.
* An import is acknowledged only when every accepted record is durable in the encrypted
  store: one store transaction per stream message, in message order. Re-sending a message
  changes nothing (its records count as ``unchanged``), so an interrupted import resumes by
  re-sending from any batch. The search index catches up in the background
  (``Matcher.notify``); searches never see a half-inserted template (the matcher's rule).
* One audit entry per import stream, written when the stream ends — ``IMPORTED``, or
  ``ABORTED`` when the stream breaks — with the counts of what was stored, even if the caller
  is gone by then: each stored change is covered by an entry naming its decision (see
  :meth:`RegistryServicer.ImportTemplates`).
* An objection (R7) is set on the Reniec subject in the store (durable, replayed by every
  index rebuild) and applied to the live registry index before the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from centinela.audit.entry import METRIC_KINDS, REF_KINDS, AuditEvent, EventType
from centinela.errors import CentinelaError, InvalidArgument, NotFound
from centinela.logs import get_logger
from centinela.matcher.service import REGISTRY
from centinela.policy import Decision
from centinela.server.components import Components
from centinela.server.context import CallState, current_call, current_caller
from centinela.server.identity import Caller
from centinela.server.pipeline import decision_info
from centinela.server.registry_import import CheckedBatch, ImportTally, check_batch
from centinela.server.unimplemented import UnimplementedRegistry
from centinela.server.validation import MAX_CLOCK_SKEW, check_context, check_dni, timestamp
from centinela.v1 import common_pb2
from centinela.v1 import registry_service_pb2 as pb

log = get_logger("server.registry")

#: The data owner of the registry gallery.
OWNER = "reniec"
T = TypeVar("T")


def known_metrics(values: Mapping[str, int]) -> dict[str, int]:
    """The metrics the audit schema accepts (it refuses unknown names)."""
    return {k: v for k, v in values.items() if k in METRIC_KINDS}


def reference_ref(reference: str) -> dict[str, str]:
    """The cited reference as an audit ref, when the schema has a kind for it and it is an
    opaque id the schema accepts (a reference shaped like a DNI or plate is left out)."""
    if not reference or "reference" not in REF_KINDS:
        return {}
    try:
        AuditEvent(EventType.REGISTRY_CHANGE, refs={"reference": reference}).to_json()
    except InvalidArgument:
        return {}
    return {"reference": reference}


def _log_failed_append(task: asyncio.Future[Any]) -> None:
    """Say in the log when a shielded import entry could not be written (no one awaits it)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("registry.import_not_audited", error=type(task.exception()).__name__)


@dataclasses.dataclass
class _ImportState:
    """What one import stream decided and did so far."""

    caller: Caller
    call: CallState
    ctx: dict[str, Any]
    decision: Decision
    decision_id: str
    tally: ImportTally


class RegistryServicer(UnimplementedRegistry):  # type: ignore[misc]
    """The RegistryService implementation."""

    def __init__(self, components: Components) -> None:
        self.c = components

    # ---- helpers -----------------------------------------------------------------------

    async def _in_executor(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.c.executor, lambda: fn(*args, **kw))

    async def _idempotent(
        self,
        caller: Caller,
        request: Any,
        rpc: str,
        compute: Callable[[], Awaitable[Any]],
        cls: Any,
    ) -> Any:
        """Answer a retry (same client request id, same request) with the stored answer; the
        answer is stored in the audit entry's transaction (``Pipeline.commit``)."""

        async def run() -> bytes:
            msg = await compute()
            return bytes(msg.SerializeToString())

        data, _replayed = await self.c.idempotency.run(
            caller.name,
            request.context.client_request_id,
            rpc,
            run,
            request=request.SerializeToString(deterministic=True),
        )
        return cls.FromString(data)

    def _info(self, decision: Decision, decision_id: str, index: int) -> common_pb2.DecisionInfo:
        return decision_info(decision, decision_id, index, self.c.bundle_name)

    def _context(
        self, raw: common_pb2.RequestContext, caller: Caller, now: dt.datetime | None = None
    ) -> dict[str, Any]:
        """The validated context, refused up front if the audit could not record its caller
        (a change must never be made that its entry then fails to record)."""
        ctx = check_context(raw, purpose_required=False, now=now)
        try:
            self.c.pipeline.audit_caller(caller, ctx).to_json()
        except InvalidArgument:
            raise InvalidArgument(
                "must be an opaque id of 6-128 characters from [A-Za-z0-9_.:@=+-], "
                "not shaped like a DNI or plate",
                field="context.operator_id",
            ) from None
        return ctx

    def _dimension(self) -> int:
        return int(self.c.matcher.specs[REGISTRY].dim)

    def _gallery_refs(self) -> dict[str, str]:
        return {"gallery": REGISTRY}

    # ---- ImportTemplates ---------------------------------------------------------------

    async def ImportTemplates(
        self, request_iterator: AsyncIterator[pb.ImportTemplatesRequest], context: Any
    ) -> pb.ImportTemplatesResponse:
        """Store the stream's batches durably, one transaction per message, then answer.

        The decision is taken on the first message (its context is the import's); later
        messages' contexts are ignored. The entry is written once per stream (not per batch):
        a million-template import is one administrative act citing one Reniec resolution,
        and its entry carries the counts; a stream that breaks after storing records still
        gets its entry (``ABORTED``) so no stored change is left without one.

        Raises:
            InvalidArgument: the stream is empty or the first context is malformed.
            PolicyDenied: the caller may not import (R15).
            StorageError, AuditUnavailable: the store or the audit log failed (UNAVAILABLE).
        """
        caller, call = current_caller(), current_call()
        iterator = request_iterator.__aiter__()
        try:
            first = await iterator.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument("the import stream carried no message", field="context") from None
        ctx = self._context(first.context, caller)
        refs = {**self._gallery_refs(), **reference_ref(ctx["reference"])}
        decision, decision_id = await self.c.pipeline.authorise(
            "ImportTemplates", call=call, caller=caller, context=ctx, refs=refs, mode="ADMIN"
        )
        state = _ImportState(caller, call, ctx, decision, decision_id, ImportTally())
        try:
            await self._ingest(first, iterator, state)
        except BaseException as exc:
            # Every allowed decision gets its entry, the broken streams' included.
            await self._audit_import(state, refs, "ABORTED", cause=exc)
            raise
        # A cancelled stream may simply look ended to the handler: ask the call.
        cancelled = bool(getattr(context, "cancelled", lambda: False)())
        outcome = "ABORTED" if cancelled else "IMPORTED"
        receipt = await self._audit_import(state, refs, outcome)
        answer = state.tally.to_proto()
        answer.decision.CopyFrom(self._info(decision, decision_id, receipt.index))
        return answer

    async def _ingest(
        self,
        first: pb.ImportTemplatesRequest,
        rest: AsyncIterator[pb.ImportTemplatesRequest],
        state: _ImportState,
    ) -> None:
        """Validate and store each message in order, receiving the next one meanwhile."""
        model_id, dim = self.c.face_model_id, self._dimension()
        pending: asyncio.Future[None] | None = None
        message: pb.ImportTemplatesRequest | None = first
        try:
            while message is not None:
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(
                    self._in_executor(self._store_batch, message, model_id, dim, state.tally)
                )
                try:
                    message = await rest.__anext__()
                except StopAsyncIteration:
                    message = None
            if pending is not None:
                await pending
        finally:
            if pending is not None and not pending.done():
                # Let the transaction in flight finish, so the tally says what was stored.
                await asyncio.shield(asyncio.wait([pending]))
            if pending is not None and pending.done() and not pending.cancelled():
                pending.exception()  # retrieved here; the caller sees the first failure

    def _store_batch(
        self, message: pb.ImportTemplatesRequest, model_id: str, dim: int, tally: ImportTally
    ) -> None:
        """One message: validate, then one durable transaction; wakes the index catch-up."""
        checked: CheckedBatch = check_batch(message, model_id=model_id, dimension=dim)
        result = self.c.matcher.store.add_templates(
            OWNER, REGISTRY, model_id, checked.records, replace_existing=True
        )
        tally.batches += 1
        tally.received += checked.received
        tally.accepted += result.inserted
        tally.unchanged += result.unchanged
        tally.replaced += result.replaced
        tally.add_rejects(checked.rejects)
        if result.inserted or result.replaced:
            self.c.matcher.notify()

    async def _audit_import(
        self,
        state: _ImportState,
        refs: Mapping[str, str],
        outcome: str,
        cause: BaseException | None = None,
    ) -> Any:
        event = self.c.pipeline.event(
            EventType.REGISTRY_CHANGE,
            call=state.call,
            caller=state.caller,
            context=state.ctx,
            decision=state.decision,
            decision_id=state.decision_id,
            outcome=outcome,
            refs=refs,
            metrics=known_metrics(state.tally.metrics()),
        )
        if outcome == "ABORTED":
            log.warning(
                "registry.import_aborted",
                decision_id=state.decision_id,
                error=type(cause).__name__ if cause is not None else "Cancelled",
                batches=state.tally.batches,
                accepted=state.tally.accepted,
            )
        # The templates are durable whether or not the caller still listens: the entry is
        # written even if this call is cancelled meanwhile (the shielded task carries on).
        task = asyncio.ensure_future(self.c.pipeline.append(event))
        task.add_done_callback(_log_failed_append)
        (receipt,) = await asyncio.shield(task)
        return receipt

    # ---- RemoveSubject -----------------------------------------------------------------

    async def RemoveSubject(
        self, request: pb.RemoveSubjectRequest, context: Any
    ) -> pb.RemoveSubjectResponse:
        caller, call = current_caller(), current_call()
        answer: pb.RemoveSubjectResponse = await self._idempotent(
            caller,
            request,
            "RemoveSubject",
            lambda: self._remove(request, caller, call),
            pb.RemoveSubjectResponse,
        )
        return answer

    async def _remove(
        self, request: pb.RemoveSubjectRequest, caller: Caller, call: CallState
    ) -> pb.RemoveSubjectResponse:
        ctx = self._context(request.context, caller)
        dni = check_dni(request.dni)
        digests = {"dni": self.c.digester.digest("dni", dni)}
        refs = {**self._gallery_refs(), **reference_ref(ctx["reference"])}
        decision, decision_id = await self.c.pipeline.authorise(
            "RemoveSubject",
            call=call,
            caller=caller,
            context=ctx,
            refs=refs,
            digests=digests,
            mode="ADMIN",
        )
        subject_ref, removed = await self._in_executor(self._remove_now, dni)
        if subject_ref:
            refs["target"] = subject_ref
        event = self.c.pipeline.event(
            EventType.REGISTRY_CHANGE,
            call=call,
            caller=caller,
            context=ctx,
            decision=decision,
            decision_id=decision_id,
            outcome="REMOVED" if removed else "NOT_PRESENT",
            refs=refs,
            digests=digests,
            metrics=known_metrics({"entries": removed, "removed": removed}),
        )
        answer: pb.RemoveSubjectResponse = await self.c.pipeline.commit(
            event,
            lambda index: pb.RemoveSubjectResponse(
                templates_removed=removed, decision=self._info(decision, decision_id, index)
            ),
        )
        return answer

    def _remove_now(self, dni: str) -> tuple[str, int]:
        store = self.c.matcher.store
        subject_ref = store.find_subject(OWNER, dni)
        if subject_ref is None:
            return "", 0
        ids = store.templates_of(subject_ref)
        removed = store.remove_subject(subject_ref)
        # Durable first; then out of the live index at once rather than at the next catch-up.
        self.c.matcher.gallery(REGISTRY).remove_many(ids)
        self.c.matcher.notify()
        return subject_ref, removed

    # ---- objections (R7) ---------------------------------------------------------------

    async def RecordObjection(
        self, request: pb.RecordObjectionRequest, context: Any
    ) -> pb.RecordObjectionResponse:
        caller, call = current_caller(), current_call()
        answer: pb.RecordObjectionResponse = await self._idempotent(
            caller,
            request,
            "RecordObjection",
            lambda: self._objection(request, caller, call, objector=True),
            pb.RecordObjectionResponse,
        )
        return answer

    async def WithdrawObjection(
        self, request: pb.WithdrawObjectionRequest, context: Any
    ) -> pb.WithdrawObjectionResponse:
        caller, call = current_caller(), current_call()
        answer: pb.WithdrawObjectionResponse = await self._idempotent(
            caller,
            request,
            "WithdrawObjection",
            lambda: self._objection(request, caller, call, objector=False),
            pb.WithdrawObjectionResponse,
        )
        return answer

    async def _objection(
        self,
        request: pb.RecordObjectionRequest | pb.WithdrawObjectionRequest,
        caller: Caller,
        call: CallState,
        *,
        objector: bool,
    ) -> Any:
        now = dt.datetime.now(dt.UTC)
        rpc = "RecordObjection" if objector else "WithdrawObjection"
        ctx = self._context(request.context, caller, now=now)
        dni = check_dni(request.dni)
        if isinstance(request, pb.RecordObjectionRequest) and request.HasField("filed_at"):
            filed_at = timestamp(request.filed_at)
        else:
            filed_at = now
        if filed_at > now + MAX_CLOCK_SKEW:
            raise InvalidArgument("lies in the future", field="filed_at")
        digests = {"dni": self.c.digester.digest("dni", dni)}
        refs = {**self._gallery_refs(), **reference_ref(ctx["reference"])}
        objection = {"objection": ctx["reference"]} if ctx["reference"] else {}
        try:
            AuditEvent(EventType.REGISTRY_CHANGE, refs=objection).to_json()
        except InvalidArgument:
            objection = {}
        refs.update(objection)
        decision, decision_id = await self.c.pipeline.authorise(
            rpc, call=call, caller=caller, context=ctx, refs=refs, digests=digests, mode="ADMIN"
        )
        subject_ref, changed = await self._in_executor(self._set_objector, dni, objector)
        refs["target"] = subject_ref
        event = self.c.pipeline.event(
            EventType.REGISTRY_CHANGE,
            call=call,
            caller=caller,
            context=ctx,
            decision=decision,
            decision_id=decision_id,
            outcome="OBJECTION_RECORDED" if objector else "OBJECTION_WITHDRAWN",
            refs=refs,
            digests=digests,
            metrics=known_metrics({"entries": changed}),
        )
        cls = pb.RecordObjectionResponse if objector else pb.WithdrawObjectionResponse
        return await self.c.pipeline.commit(
            event,
            lambda index: cls(
                subject_ref=subject_ref, decision=self._info(decision, decision_id, index)
            ),
        )

    def _set_objector(self, dni: str, objector: bool) -> tuple[str, int]:
        """Durable flag on the Reniec subject, then the live index; returns (ref, templates).

        Recording an objection for a DNI not (yet) in the registry creates its pseudonymous
        subject, so a later import of that person is excluded from the start.

        Raises:
            NotFound: withdrawing an objection of a DNI the registry does not know.
        """
        store = self.c.matcher.store
        if objector:
            subject_ref = store.ensure_subject(OWNER, dni)
        else:
            found = store.find_subject(OWNER, dni)
            if found is None:
                raise NotFound("no objection is on record for this DNI", field="dni")
            subject_ref = found
        changed = store.set_objector(subject_ref, objector)
        # The store change is replayed by the catch-up too; this makes it effective now.
        self.c.matcher.gallery(REGISTRY).set_objector(subject_ref, objector)
        self.c.matcher.notify()
        return subject_ref, changed

    # ---- GetImportStatus ---------------------------------------------------------------

    async def GetImportStatus(
        self, request: pb.GetImportStatusRequest, context: Any
    ) -> pb.GetImportStatusResponse:
        """Searchable registry templates, and the durable changes not yet indexed.

        ``index_lag`` counts durable registry changes the index has not applied yet (0 when
        every durable template is searchable); ``durable`` is ``indexed + index_lag``, exact
        while an import runs (every pending change is a new template) and an upper bound when
        removals or objections are pending. Both come from indexes (no table scan): at a
        million templates an exact live count would read every ciphertext's pages.
        """
        caller, call = current_caller(), current_call()
        ctx = self._context(request.context, caller)
        decision, decision_id = await self.c.pipeline.authorise(
            "GetImportStatus",
            call=call,
            caller=caller,
            context=ctx,
            refs=self._gallery_refs(),
            mode="READ",
        )
        durable, indexed, lag = await self._in_executor(self._status)
        event = self.c.pipeline.event(
            EventType.REGISTRY_CHANGE,
            call=call,
            caller=caller,
            context=ctx,
            decision=decision,
            decision_id=decision_id,
            outcome="STATUS_READ",
            refs=self._gallery_refs(),
            metrics=known_metrics({"entries": durable}),
        )
        await self.c.pipeline.append(event)
        return pb.GetImportStatusResponse(durable=durable, indexed=indexed, index_lag=lag)

    def _status(self) -> tuple[int, int, int]:
        matcher = self.c.matcher
        gallery = matcher.gallery(REGISTRY)
        # Read the mark before the size: a catch-up in between makes the lag an over-estimate
        # (never an under-estimate), and the next poll corrects it.
        applied = gallery.applied_seq
        lag = matcher.store.count_changes_since(applied, gallery=REGISTRY)
        indexed = len(gallery)
        return indexed + lag, indexed, lag


__all__ = ["OWNER", "CentinelaError", "RegistryServicer"]
