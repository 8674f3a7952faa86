"""RegistryService: Reniec loads and maintains the registry templates and the objections.

Invariants (DESIGN.md §3–4; LEGAL_RULES R7, R13, R15):

* Every RPC is decided by the policy before any work (only Reniec's data-owner role is
  granted; everyone else is denied and the denial is audited), and every change is audited
  with pseudonymous references, keyed digests and counts — never a DNI or a vector.
* Every change commits in one transaction with its audit entry, or neither does: the change
  is checked, looked up and encrypted first, then written as a companion of the entry
  (``AuditLog.append(companion=...)``), under the process's write lock so what was looked up
  still holds at the commit. If the audit cannot be written, nothing is stored and the
  caller gets UNAVAILABLE.
* An import stream message (a batch of at most 1,000 records) is one such change: its
  templates and its ``IMPORTED`` entry (counts, the batch number, and a keyed digest of the
  batch's valid records) are one transaction, in message order. An import is acknowledged
  only when every batch is; a broken stream leaves its committed batches durable and
  audited, and nothing else. Re-sending a batch changes nothing (its records count as
  ``unchanged``), so an interrupted import resumes by re-sending from any batch. The search
  index catches up in the background (``Matcher.notify``); searches never see a
  half-inserted template (the matcher's rule).
* An objection (R7) is set on the Reniec subject in the store (durable, replayed by every
  index rebuild) and applied to the live registry index before the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from centinela.audit.entry import METRIC_KINDS, EventType, is_opaque_id
from centinela.errors import CentinelaError, InvalidArgument, NotFound
from centinela.logs import get_logger
from centinela.matcher.service import REGISTRY
from centinela.matcher.store import PreparedTemplates
from centinela.matcher.writes import Write
from centinela.policy import Decision
from centinela.server.components import Components
from centinela.server.context import CallState, current_call, current_caller
from centinela.server.identity import Caller
from centinela.server.pipeline import decision_info, reference_ref
from centinela.server.records import serialised
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


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a batch task's failure as seen (the stream reports the first one)."""
    if not task.cancelled():
        task.exception()


@dataclasses.dataclass
class _ImportState:
    """What one import stream decided and did so far."""

    caller: Caller
    call: CallState
    ctx: dict[str, Any]
    refs: dict[str, str]
    decision: Decision
    decision_id: str
    tally: ImportTally
    audit_index: int = -1


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
        """Store the stream's batches durably, each with its audit entry, then answer.

        The decision is taken on the first message (its context is the import's); later
        messages' contexts are ignored. Each batch is one transaction holding its templates
        and its entry (counts, batch number, keyed digest of its valid records): a
        million-template import is one administrative act citing one Reniec resolution and
        one decision, whose entries say exactly which batches became durable.

        Raises:
            InvalidArgument: the stream is empty or the first context is malformed.
            PolicyDenied: the caller may not import (R15).
            StorageError, AuditUnavailable: the store or the audit log failed (UNAVAILABLE);
                the batches answered before stay durable and audited, the failed one is not.
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
        state = _ImportState(caller, call, ctx, refs, decision, decision_id, ImportTally())
        try:
            await self._ingest(first, iterator, state)
        except BaseException as exc:
            log.warning(
                "registry.import_stopped",
                decision_id=decision_id,
                error=type(exc).__name__,
                batches=state.tally.batches,
                accepted=state.tally.accepted,
            )
            raise
        answer = state.tally.to_proto()
        answer.decision.CopyFrom(self._info(decision, decision_id, state.audit_index))
        return answer

    async def _ingest(
        self,
        first: pb.ImportTemplatesRequest,
        rest: AsyncIterator[pb.ImportTemplatesRequest],
        state: _ImportState,
    ) -> None:
        """Check and commit each message in order, two in flight: one is checked (in a worker
        thread) while the one before it is committed, and the next message is received only
        once the one before the last is committed (flow control)."""
        model_id, dim = self.c.face_model_id, self._dimension()
        flight: list[asyncio.Future[None]] = []
        message: pb.ImportTemplatesRequest | None = first
        try:
            while message is not None:
                prev = flight[-1] if flight else None
                task = asyncio.ensure_future(self._one_batch(message, prev, model_id, dim, state))
                task.add_done_callback(_retrieve)
                flight.append(task)
                while len(flight) >= 2:
                    await asyncio.shield(flight.pop(0))
                try:
                    message = await rest.__anext__()
                except StopAsyncIteration:
                    message = None
            while flight:
                await asyncio.shield(flight.pop(0))
        finally:
            # A broken stream: batches still waiting never start; the one committing ends.
            for waiting in flight:
                waiting.cancel()

    async def _one_batch(
        self,
        message: pb.ImportTemplatesRequest,
        prev: asyncio.Future[None] | None,
        model_id: str,
        dim: int,
        state: _ImportState,
    ) -> None:
        checked, digest, prepared = await self._in_executor(self._check, message, model_id, dim)
        if prev is not None:
            await asyncio.shield(prev)  # in order; nothing after a failed batch is stored
        await self._store_batch(checked, digest, prepared, state)

    def _check(
        self, message: pb.ImportTemplatesRequest, model_id: str, dim: int
    ) -> tuple[CheckedBatch, str, PreparedTemplates]:
        """Validate one message; the keyed digest of its valid records for the audit; their
        digests and encryption for the store (everything that needs no database and no
        lock)."""
        checked = check_batch(message, model_id=model_id, dimension=dim)
        digest = self.c.digester.digest("template", checked.content()) if len(checked) else ""
        prepared = self.c.matcher.store.prepare_templates(
            OWNER, REGISTRY, model_id, checked.columns()
        )
        return checked, digest, prepared

    async def _store_batch(
        self,
        checked: CheckedBatch,
        digest: str,
        prepared: PreparedTemplates,
        state: _ImportState,
    ) -> None:
        """Plan the batch (look-ups), then commit its templates with its entry.

        Runs to its end under the write lock even if the stream is cancelled meanwhile, so
        the tally and the lock never disagree with what was committed.
        """

        async def commit() -> None:
            store = self.c.matcher.store
            planned = await self._in_executor(
                store.plan_templates,
                OWNER,
                REGISTRY,
                self.c.face_model_id,
                prepared,
                replace_existing=True,
            )
            result = planned.result
            event = self.c.pipeline.event(
                EventType.REGISTRY_CHANGE,
                call=state.call,
                caller=state.caller,
                context=state.ctx,
                decision=state.decision,
                decision_id=state.decision_id,
                outcome="IMPORTED",
                refs=state.refs,
                digests={"template": digest} if digest else {},
                metrics=known_metrics(
                    {
                        "batch": checked.batch_number,
                        "received": checked.received,
                        "entries": result.inserted,
                        "accepted": result.inserted,
                        "unchanged": result.unchanged,
                        "replaced": result.replaced,
                        "rejected": len(checked.rejects),
                    }
                ),
            )
            (receipt,) = await self.c.pipeline.append(
                event, companion=planned if planned.changed else None
            )
            tally = state.tally
            tally.batches += 1
            tally.received += checked.received
            tally.accepted += result.inserted
            tally.unchanged += result.unchanged
            tally.replaced += result.replaced
            tally.add_rejects(checked.rejects)
            state.audit_index = receipt.index
            if planned.changed:
                self.c.matcher.notify(bulk=True)

        await serialised(self.c.extra, commit)

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
        store = self.c.matcher.store

        async def commit() -> tuple[pb.RemoveSubjectResponse, list[str]]:
            subject_ref = await self._in_executor(store.find_subject, OWNER, dni)
            ids: list[str] = []
            write = Write()
            entry_refs = dict(refs)
            if subject_ref is not None:
                ids = await self._in_executor(store.templates_of, subject_ref)
                write = store.remove_subject_write(subject_ref)
                entry_refs["target"] = subject_ref
            removed = len(ids)
            event = self.c.pipeline.event(
                EventType.REGISTRY_CHANGE,
                call=call,
                caller=caller,
                context=ctx,
                decision=decision,
                decision_id=decision_id,
                outcome="REMOVED" if removed else "NOT_PRESENT",
                refs=entry_refs,
                digests=digests,
                metrics=known_metrics({"entries": removed, "removed": removed}),
            )
            answer: pb.RemoveSubjectResponse = await self.c.pipeline.commit(
                event,
                lambda index: pb.RemoveSubjectResponse(
                    templates_removed=removed, decision=self._info(decision, decision_id, index)
                ),
                extra=write if write.changed else None,
            )
            return answer, ids

        answer, ids = await serialised(self.c.extra, commit)
        if ids:
            # Durable and audited; out of the live index at once rather than at the next
            # catch-up.
            await self._in_executor(self.c.matcher.gallery(REGISTRY).remove_many, ids)
            self.c.matcher.notify()
        return answer

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
            filed_at = timestamp(request.filed_at, "filed_at")
        else:
            filed_at = now
        if filed_at > now + MAX_CLOCK_SKEW:
            raise InvalidArgument("lies in the future", field="filed_at")
        digests = {"dni": self.c.digester.digest("dni", dni)}
        refs = {**self._gallery_refs(), **reference_ref(ctx["reference"])}
        if ctx["reference"] and is_opaque_id(ctx["reference"]):
            refs["objection"] = ctx["reference"]
        decision, decision_id = await self.c.pipeline.authorise(
            rpc, call=call, caller=caller, context=ctx, refs=refs, digests=digests, mode="ADMIN"
        )
        cls = pb.RecordObjectionResponse if objector else pb.WithdrawObjectionResponse

        async def commit() -> tuple[Any, str]:
            subject_ref, changed, write = await self._in_executor(
                self._plan_objection, dni, objector
            )
            event = self.c.pipeline.event(
                EventType.REGISTRY_CHANGE,
                call=call,
                caller=caller,
                context=ctx,
                decision=decision,
                decision_id=decision_id,
                outcome="OBJECTION_RECORDED" if objector else "OBJECTION_WITHDRAWN",
                refs={**refs, "target": subject_ref},
                digests=digests,
                metrics=known_metrics({"entries": changed}),
            )
            answer = await self.c.pipeline.commit(
                event,
                lambda index: cls(
                    subject_ref=subject_ref, decision=self._info(decision, decision_id, index)
                ),
                extra=write,
            )
            return answer, subject_ref

        answer, subject_ref = await serialised(self.c.extra, commit)
        # Durable and audited (replayed by the catch-up too); effective now, before the answer.
        await self._in_executor(
            self.c.matcher.gallery(REGISTRY).set_objector, subject_ref, objector
        )
        self.c.matcher.notify()
        return answer

    def _plan_objection(self, dni: str, objector: bool) -> tuple[str, int, Write]:
        """The Reniec subject, how many templates it has, and the planned flag change.

        Recording an objection for a DNI not (yet) in the registry creates its pseudonymous
        subject, so a later import of that person is excluded from the start.

        Raises:
            NotFound: withdrawing an objection of a DNI the registry does not know.
        """
        store = self.c.matcher.store
        if objector:
            planned = store.plan_subjects(OWNER, [dni])
            subject_ref = planned.refs[0]
            write = planned.then(store.objector_write(subject_ref, True))
            fresh = bool(planned.created)
        else:
            found = store.find_subject(OWNER, dni)
            if found is None:
                raise NotFound("no objection is on record for this DNI", field="dni")
            subject_ref, fresh = found, False
            write = store.objector_write(subject_ref, False)
        changed = 0 if fresh else len(store.templates_of(subject_ref))
        return subject_ref, changed, write

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
