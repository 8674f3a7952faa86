"""AuditService: compliance officers read the tamper-evident audit log (LEGAL_RULES R16).

Invariants (DESIGN.md §3, §6; RFC 9162 §2.1.3-2.1.4; c2sp.org/tlog-checkpoint):

* Every RPC is decided by the policy (only the compliance kind's roles are granted the audit
  RPCs; a denial is audited by the pipeline) and every answered read is itself appended to the
  log — ``AUDIT_READ``, or ``EVIDENCE_EXPORT`` for an evidence package — and durable *before*
  the answer leaves (for ExportEntries: before the first chunk). If that append fails the
  caller gets UNAVAILABLE and nothing of the log (fail closed).
* The read's own entry says what was disclosed (index range, count), never the content.
  Nothing here alters, deletes or re-orders a record; the servicer holds no write path to the
  leaf table other than the pipeline's append.
* Entries are returned byte for byte as hashed, with the leaf hash of the tree this process
  holds, so a client can check each one; proofs and roots come from that same tree, and every
  size a proof is asked against must be at most the current tree size.
* A proof or an export needs a signed checkpoint covering it: when the latest one does not
  cover the asked index (a fresh decision), one is cut on demand (the log checks consistency
  with its last signed checkpoint before signing).
* Blocking work (SQL, signing) runs in the components' executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

from centinela.audit.checkpoint import SignedCheckpoint
from centinela.audit.entry import AuditEvent, EventType
from centinela.audit.merkle import leaf_hash
from centinela.errors import InvalidArgument
from centinela.logs import get_logger
from centinela.server.audit_query import (
    STATS_FILE,
    STATS_FINAL_CATCH_UP,
    STATS_SAVE_EVERY_S,
    EventFilter,
    Stats,
    StatsCache,
    StatsSnapshot,
    decode_cursor,
    encode_cursor,
    find_decision,
    list_page,
)
from centinela.server.components import Components
from centinela.server.context import CallState, current_call, current_caller
from centinela.server.identity import Caller
from centinela.server.unimplemented import UnimplementedAudit
from centinela.server.validation import PURPOSES, check_context, check_id, timestamp
from centinela.v1 import audit_service_pb2 as pb

log = get_logger("server.audit")

T = TypeVar("T")

#: Entries per ExportEntries chunk (about 0.5 MB with typical entries).
EXPORT_CHUNK = 1_000
MAX_PAGE = 1_000
DEFAULT_PAGE = 100
_LABEL_FIELDS = ("caller_org", "site_id", "outcome", "rule_id", "event_type")


def _label(value: str, field: str) -> str:
    if value and not (len(value) <= 64 and value.replace("_", "a").replace("-", "a").isalnum()):
        raise InvalidArgument("must be a short label of letters, digits, _ and -", field=field)
    return value


class AuditServicer(UnimplementedAudit):  # type: ignore[misc]
    """The AuditService implementation."""

    def __init__(self, components: Components, *, scan_budget: int | None = None) -> None:
        self.c = components
        self._stats = StatsCache()
        self._scan_budget = scan_budget
        self._snapshot = StatsSnapshot(
            components.settings.data_dir / STATS_FILE, components.digester
        )
        # Whole-log statistics are kept incrementally and saved between runs; a first pass
        # over a large log takes a while (about 40 s per million entries here), so resuming
        # and catching up start now, in their own thread and throttled (StatsCache.warm),
        # off the event loop and off the matcher's executor. Application.close calls
        # finish_stats.
        self._final = threading.Event()
        self._thread = threading.Thread(
            target=self._warm_stats, name="centinela-audit-stats", daemon=True
        )
        self._thread.start()

    def _warm_stats(self, save_every_s: float = STATS_SAVE_EVERY_S) -> None:
        """Resume the saved statistics, catch up with the log, save; then every
        ``save_every_s`` catch up and save again. On :meth:`finish_stats`: count up to
        :data:`STATS_FINAL_CATCH_UP` entries more at full speed and save a last time."""
        stopping, audit = self.c.stopping, self.c.audit
        saved = -1
        try:
            resumed = self._snapshot.load(audit, self._stats)
            scanned = self._stats.warm(audit, stop=stopping)
            log.info("audit_stats.warmed", resumed_at=resumed, scanned=scanned)
            while True:
                upto, _ = self._stats.state()
                if upto != saved:
                    saved = self._snapshot.save(audit, self._stats)
                if self._final.is_set():
                    break
                if self._final.wait(save_every_s):
                    self._stats.warm(audit, share=1.0, limit=STATS_FINAL_CATCH_UP)
                elif not stopping.is_set():
                    self._stats.warm(audit, stop=stopping)
        except Exception as exc:  # the log or the disk failed under it: GetStats scans itself
            log.info("audit_stats.warm_stopped", error_type=type(exc).__name__)

    def finish_stats(self, timeout_s: float = 30.0) -> None:
        """The server stops and its last entry is written: count it and what came before,
        save, and end the statistics thread (blocking, at most ``timeout_s``). The log must
        still be open."""
        self._final.set()
        self._thread.join(timeout_s)

    # ---- helpers -----------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.c.executor, lambda: fn(*args))

    async def _authorise(
        self, rpc: str, request: Any, *, reference_required: bool = False
    ) -> tuple[Caller, CallState, dict[str, Any], Any, str]:
        caller, call = current_caller(), current_call()
        ctx = check_context(
            request.context, purpose_required=False, reference_required=reference_required
        )
        decision, decision_id = await self.c.pipeline.authorise(
            rpc, call=call, caller=caller, context=ctx, mode="READ"
        )
        return caller, call, ctx, decision, decision_id

    async def _record(
        self,
        auth: tuple[Caller, CallState, dict[str, Any], Any, str],
        *,
        event_type: EventType = EventType.AUDIT_READ,
        outcome: str = "READ",
        refs: Mapping[str, str] | None = None,
        metrics: Mapping[str, int] | None = None,
    ) -> int:
        """Append the read's own entry (durable before the answer); return its index."""
        caller, call, ctx, decision, decision_id = auth
        event = self.c.pipeline.event(
            event_type,
            call=call,
            caller=caller,
            context=ctx,
            decision=decision,
            decision_id=decision_id,
            outcome=outcome,
            refs=refs,
            metrics=metrics,
        )
        (receipt,) = await self.c.pipeline.append(event)
        return receipt.index

    def _checkpoint_covering(self, size: int) -> SignedCheckpoint:
        """The latest signed checkpoint, or a fresh one when it does not reach ``size``."""
        cp = self.c.audit.latest_checkpoint()
        if cp is None or cp.size < size or (cp.size == 0 and self.c.audit.size > 0):
            cp = self.c.audit.checkpoint()
        return cp

    def _size_or_latest(self, size: int, at_least: int = 0) -> tuple[int, SignedCheckpoint]:
        if size:
            if size > self.c.audit.size:
                raise InvalidArgument(
                    f"is beyond the log's size {self.c.audit.size}", field="tree_size"
                )
            return size, self._checkpoint_covering(0)
        cp = self._checkpoint_covering(at_least)
        return cp.size, cp

    def _event(self, index: int, entry: bytes) -> pb.AuditEvent:
        # Hashed from the entry, not looked up: the tree's leaves are in the database, and
        # this runs on the event loop. The entry came from the same table; a verifier
        # recomputes it either way.
        return pb.AuditEvent(index=index, entry=entry, leaf_hash=leaf_hash(entry))

    # ---- GetCheckpoint -----------------------------------------------------------------

    async def GetCheckpoint(
        self, request: pb.GetCheckpointRequest, context: Any
    ) -> pb.GetCheckpointResponse:
        auth = await self._authorise("GetCheckpoint", request)
        cp = await self._run(self._checkpoint_covering, 0)
        await self._record(auth, metrics={"to_index": cp.size})
        return pb.GetCheckpointResponse(
            signed_note=cp.note,
            tree_size=cp.size,
            root_hash=cp.root_hash,
            origin=cp.origin,
            verifier_key=self.c.audit.verifier_key(),
        )

    # ---- ListEvents --------------------------------------------------------------------

    def _filter(self, request: pb.ListEventsRequest) -> EventFilter:
        for name in _LABEL_FIELDS:
            _label(getattr(request, name), name)
        purpose = ""
        if request.purpose:
            purpose = PURPOSES.get(request.purpose, "")
            if not purpose:
                raise InvalidArgument("is not a known purpose", field="purpose")
        since = timestamp(request.since, "since") if request.HasField("since") else None
        until = timestamp(request.until, "until") if request.HasField("until") else None
        if since is not None and until is not None and until <= since:
            raise InvalidArgument("must lie after since", field="until")
        return EventFilter(
            since=since,
            until=until,
            caller_org=request.caller_org,
            site_id=request.site_id,
            purpose=purpose,
            outcome=request.outcome,
            rule_id=request.rule_id,
            event_type=request.event_type,
        )

    async def ListEvents(
        self, request: pb.ListEventsRequest, context: Any
    ) -> pb.ListEventsResponse:
        flt = self._filter(request)
        if request.page_size > MAX_PAGE:
            raise InvalidArgument(f"must lie in 1..{MAX_PAGE} (0 means 100)", field="page_size")
        size = request.page_size or DEFAULT_PAGE
        auth = await self._authorise("ListEvents", request)
        # State-dependent checks only after the policy: a denied caller learns nothing.
        start = decode_cursor(request.page_token, self.c.audit.size)
        kw = {} if self._scan_budget is None else {"scan_budget": self._scan_budget}
        page = await self._run(lambda: list_page(self.c.audit, flt, start, size, **kw))
        events = [self._event(i, e) for i, e in page.items]
        await self._record(
            auth,
            metrics={
                "from_index": page.scanned_from,
                "to_index": page.scanned_to,
                "results": len(events),
            },
        )
        token = encode_cursor(page.next_index) if page.next_index is not None else ""
        return pb.ListEventsResponse(events=events, next_page_token=token)

    # ---- proofs ------------------------------------------------------------------------

    async def GetInclusionProof(
        self, request: pb.GetInclusionProofRequest, context: Any
    ) -> pb.GetInclusionProofResponse:
        index = int(request.index)
        if request.tree_size and index >= request.tree_size:
            raise InvalidArgument("must be smaller than tree_size", field="index")
        auth = await self._authorise("GetInclusionProof", request)
        if index >= self.c.audit.size:
            raise InvalidArgument(f"is beyond the log's size {self.c.audit.size}", field="index")
        size, _ = await self._run(self._size_or_latest, int(request.tree_size), index + 1)

        def work() -> tuple[list[bytes], bytes, bytes]:
            (entry,) = self.c.audit.entries(index, index + 1)
            return self.c.audit.inclusion_proof(index, size), entry, self.c.audit.root(size)

        proof, entry, root = await self._run(work)
        await self._record(auth, metrics={"from_index": index, "to_index": size, "entries": 1})
        return pb.GetInclusionProofResponse(
            index=index,
            tree_size=size,
            leaf_hash=leaf_hash(entry),
            hashes=proof,
            entry=entry,
            root_hash=root,
        )

    async def GetConsistencyProof(
        self, request: pb.GetConsistencyProofRequest, context: Any
    ) -> pb.GetConsistencyProofResponse:
        first = int(request.first_size)
        if first == 0:
            raise InvalidArgument("must be at least 1", field="first_size")
        if request.second_size and first > request.second_size:
            raise InvalidArgument("must not exceed second_size", field="first_size")
        auth = await self._authorise("GetConsistencyProof", request)
        second, _ = await self._run(self._size_or_latest, int(request.second_size), first)
        if first > second:
            raise InvalidArgument(f"is beyond the checkpoint size {second}", field="first_size")

        def work() -> tuple[list[bytes], bytes, bytes]:
            log = self.c.audit
            return log.consistency_proof(first, second), log.root(first), log.root(second)

        proof, root_1, root_2 = await self._run(work)
        await self._record(auth, metrics={"from_index": first, "to_index": second})
        return pb.GetConsistencyProofResponse(
            first_size=first,
            second_size=second,
            hashes=proof,
            first_root=root_1,
            second_root=root_2,
        )

    # ---- ExportEntries -----------------------------------------------------------------

    async def ExportEntries(
        self, request: pb.ExportEntriesRequest, context: Any
    ) -> AsyncIterator[pb.ExportEntriesResponse]:
        start, end = int(request.start), int(request.end)
        if end and start > end:
            raise InvalidArgument("must not exceed end", field="start")
        auth = await self._authorise("ExportEntries", request)
        if end > self.c.audit.size:
            raise InvalidArgument(f"is beyond the log's size {self.c.audit.size}", field="end")
        # A fresh checkpoint covering every durable entry (the export is verified against it).
        cp = await self._run(self._checkpoint_covering, end or self.c.audit.size)
        end = end or cp.size
        if start > end:
            raise InvalidArgument(f"is beyond the checkpoint size {end}", field="start")
        await self._record(
            auth, metrics={"from_index": start, "to_index": end, "entries": end - start}
        )
        pos = start
        while pos < end:
            stop = min(end, pos + EXPORT_CHUNK)
            entries = await self._run(self.c.audit.entries, pos, stop)
            chunk = pb.ExportEntriesResponse(
                events=[self._event(pos + i, e) for i, e in enumerate(entries)]
            )
            pos = stop
            if pos >= end:
                chunk.signed_note = cp.note
                chunk.verifier_key = self.c.audit.verifier_key()
            yield chunk
        if start == end:
            yield pb.ExportEntriesResponse(
                signed_note=cp.note, verifier_key=self.c.audit.verifier_key()
            )

    # ---- GetStats ----------------------------------------------------------------------

    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.GetStatsResponse:
        since = timestamp(request.since, "since") if request.HasField("since") else None
        auth = await self._authorise("GetStats", request)
        size = self.c.audit.size
        stats: Stats = await self._run(self._stats.compute, self.c.audit, since)
        await self._record(auth, metrics={"to_index": size, "entries": stats.total})
        return pb.GetStatsResponse(
            by_municipality=dict(stats.by_municipality),
            by_site=dict(stats.by_site),
            by_purpose=dict(stats.by_purpose),
            by_outcome=dict(stats.by_outcome),
            denials_by_rule=dict(stats.denials_by_rule),
            alerts_confirmed=stats.alerts_confirmed,
            alerts_rejected=stats.alerts_rejected,
            shadow_disagreements_by_rule=dict(stats.shadow_by_rule),
            total_events=stats.total,
        )

    # ---- CreateEvidence ----------------------------------------------------------------

    async def CreateEvidence(
        self, request: pb.CreateEvidenceRequest, context: Any
    ) -> pb.CreateEvidenceResponse:
        decision_id = check_id(request.decision_id, "decision_id")
        reference = request.context.reference
        try:
            AuditEvent(EventType.EVIDENCE_EXPORT, refs={"reference": reference}).to_json()
        except InvalidArgument:
            raise InvalidArgument(
                "is required: the case or court request id, 6-128 characters of "
                "[A-Za-z0-9_.:@=+-], not shaped like a plate or DNI",
                field="context.reference",
            ) from None
        auth = await self._authorise("CreateEvidence", request, reference_required=True)
        index = await self._run(find_decision, self.c.audit, decision_id)

        def work() -> tuple[bytes, SignedCheckpoint, list[bytes]]:
            (entry,) = self.c.audit.entries(index, index + 1)
            cp = self._checkpoint_covering(index + 1)
            return entry, cp, self.c.audit.inclusion_proof(index, cp.size)

        entry, cp, proof = await self._run(work)
        refs = {"reference": reference, "target": decision_id}
        await self._record(
            auth,
            event_type=EventType.EVIDENCE_EXPORT,
            outcome="EXPORTED",
            refs=refs,
            metrics={"from_index": index, "to_index": cp.size, "entries": 1},
        )
        return pb.CreateEvidenceResponse(
            event=self._event(index, entry),
            inclusion_proof=proof,
            signed_note=cp.note,
            verifier_key=self.c.audit.verifier_key(),
            tree_size=cp.size,
        )
