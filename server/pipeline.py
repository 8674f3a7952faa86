"""The decision path every Centinela RPC shares: policy input → decision → durable audit.

Invariants (DESIGN.md §2, LEGAL_RULES R1–R16):

* Every RPC of the four services is decided by the policy (default deny), admin and audit
  reads included. A policy engine failure is a deny (``ENGINE_UNAVAILABLE``), never an allow.
* Every decision, allow or deny, is appended to the audit log and is durable **before** the
  caller hears of it. If the append fails, the caller gets UNAVAILABLE and no result.
* Denials become typed errors carrying the rule ids and the decision id; the status code
  follows the rule: R12 → FAILED_PRECONDITION, R13 → INVALID_ARGUMENT, R14 →
  RESOURCE_EXHAUSTED, anything else → PERMISSION_DENIED.
* Audit entries hold pseudonymous references and keyed digests only (R11).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

from google.protobuf.message import Message as _ProtoMessage

from centinela.audit.entry import AuditEvent, Digester, EventType, is_opaque_id
from centinela.audit.entry import Caller as AuditCaller
from centinela.audit.log import AppendReceipt, AuditLog
from centinela.audit.store import Companion, Companions
from centinela.errors import (
    AuditUnavailable,
    CentinelaError,
    FacialMatchingDisabled,
    InvalidArgument,
    PolicyDenied,
    ResourceExhausted,
)
from centinela.logs import get_logger
from centinela.policy import ENGINE_UNAVAILABLE, Decision, PolicyService, ShadowedDecision
from centinela.server.alerts import AlertStore
from centinela.server.context import CallState
from centinela.server.decision_cache import DecisionCache, quality_step
from centinela.server.idempotency import IdempotencyStore, current_key
from centinela.server.identity import Caller
from centinela.server.ratelimit import RateCounters
from centinela.server.records import ordered_id
from centinela.v1 import common_pb2

log = get_logger("server.pipeline")

Message = TypeVar("Message", bound=_ProtoMessage)


def artifact(digest: str) -> str:
    """A bundle digest in the audit's ``sha256:<hex>`` form."""
    return digest if digest.startswith("sha256:") else "sha256:" + digest


def _to_second(stamp: str) -> str:
    """An RFC 3339 time floored to the whole second, in UTC: the one form the decision cache
    reuses a decision across (see server/decision_cache.py)."""
    when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return when.replace(microsecond=0).astimezone(dt.UTC).isoformat()


def _over_ceiling(rate: Mapping[str, int], decision: Decision) -> bool:
    ceiling = decision.obligations.rate_ceiling
    return (
        int(rate.get("caller_per_minute", 0)) > ceiling.caller_per_minute
        or int(rate.get("site_per_minute", 0)) > ceiling.site_per_minute > 0
    )


def new_decision_id() -> str:
    """An unguessable decision id in creation order, e.g. ``dec_01a23f…`` (32 hex digits:
    the time, then 80 random bits; see :func:`~centinela.server.records.ordered_id`)."""
    return ordered_id("dec")


def error_for_denial(decision: Decision, decision_id: str) -> CentinelaError:
    """The typed error a denial becomes (status code by rule, rule ids attached)."""
    reasons = tuple(decision.reasons) or ("DEFAULT_DENY",)
    if "R12" in reasons:
        return FacialMatchingDisabled(
            "facial matching is not enabled by the legal framework in force (R12); "
            "plate matching is unaffected",
            rule_ids=reasons,
            decision_id=decision_id,
        )
    if "R13" in reasons:
        return InvalidArgument(
            "probe below the quality floor (R13)",
            field="probe.quality",
            rule_ids=reasons,
            decision_id=decision_id,
        )
    if "R14" in reasons:
        return ResourceExhausted(
            "request rate ceiling reached for this caller or site (R14); retry later",
            rule_ids=reasons,
            decision_id=decision_id,
        )
    if "INPUT_MALFORMED" in reasons:
        fields = ", ".join(decision.details) or "unknown"
        return InvalidArgument(
            f"the request is incomplete for the policy (INPUT_MALFORMED: {fields})",
            field=decision.details[0] if decision.details else None,
            rule_ids=reasons,
            decision_id=decision_id,
        )
    return PolicyDenied(reasons, decision_id=decision_id)


def reference_ref(reference: str) -> dict[str, str]:
    """The cited reference as an audit ref, when it is an opaque id the schema accepts (a
    reference shaped like a DNI or plate is left out)."""
    return {"reference": reference} if reference and is_opaque_id(reference) else {}


def decision_info(
    decision: Decision, decision_id: str, audit_index: int, bundle: str
) -> common_pb2.DecisionInfo:
    """The DecisionInfo a caller may cite."""
    return common_pb2.DecisionInfo(
        decision_id=decision_id,
        policy_bundle=bundle,
        policy_bundle_digest=decision.bundle_digest.removeprefix("sha256:"),
        rule_ids=list(decision.reasons),
        audit_index=audit_index,
    )


#: A policy decision that takes longer is a deny (ENGINE_UNAVAILABLE). A decision costs ~3 ms
#: of CPU (docs/policy.md); this leaves room for a loaded machine and a queue of them.
POLICY_TIMEOUT_S = 1.0


class Pipeline:
    """Policy decisions and their audit, shared by every servicer."""

    def __init__(
        self,
        policy: PolicyService,
        audit: AuditLog,
        digester: Digester,
        *,
        bundle_name: str,
        rates: RateCounters | None = None,
        executor: Executor | None = None,
        policy_timeout_s: float = POLICY_TIMEOUT_S,
    ) -> None:
        self.policy = policy
        self.policy_timeout_s = policy_timeout_s
        self.audit = audit
        self.digester = digester
        self.bundle_name = bundle_name
        self.rates = rates or RateCounters()
        self.cache = DecisionCache(policy)
        self.executor = executor

    # ---- policy ------------------------------------------------------------------------

    def policy_input(
        self,
        rpc: str,
        caller: Caller,
        context: Mapping[str, Any],
        **extra: Any,
    ) -> dict[str, Any]:
        """The policy input document for one request."""
        ctx = dict(context)
        for key in ("now", "capture_time"):
            if ctx.get(key):
                ctx[key] = _to_second(str(ctx[key]))
        probe = extra.get("probe")
        if isinstance(probe, dict) and "quality" in probe:
            # Rounded down: never more permissive than the real value (R13).
            extra["probe"] = {**probe, "quality": quality_step(probe["quality"])}
        doc: dict[str, Any] = {
            "caller": caller.to_policy(str(ctx.get("operator_id", ""))),
            "rpc": rpc,
            "context": ctx,
        }
        if "purpose" in ctx:
            doc["purpose"] = ctx["purpose"]
        doc.update({k: v for k, v in extra.items() if v is not None})
        return doc

    async def decide(self, policy_input: Mapping[str, Any]) -> tuple[Decision, Decision | None]:
        """Active decision (fails closed) and the shadow bundle's, if one is configured.

        The engine blocks for milliseconds: it runs in the executor, never on the event loop;
        a decision already in the cache is taken on the loop, without that round trip.
        """
        key = self.cache.key(policy_input)
        result = self.cache.cached(key)
        if result is None:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(self.executor, self.cache.decide, policy_input, key)
            try:
                result = await asyncio.wait_for(pending, self.policy_timeout_s)
            except TimeoutError:
                # rego-cpp cannot be interrupted: the evaluation runs on and holds its slot,
                # so a hung engine makes every later decision time out too (fail closed).
                engine = self.policy.active
                log.error("policy.timeout", engine=engine.name, timeout_s=self.policy_timeout_s)
                deny = Decision.deny(ENGINE_UNAVAILABLE, engine.bundle_digest, engine.name)
                result = ShadowedDecision(deny, None)
        self.policy.tally(result)  # each request, whether its decision was reused or not
        return result.active, result.shadow

    # ---- audit ---------------------------------------------------------------------------

    @staticmethod
    def audit_caller(caller: Caller, context: Mapping[str, Any]) -> AuditCaller:
        operator = str(context.get("operator_id") or "") or None
        return AuditCaller(org=caller.org, kind=caller.kind, operator_id=operator)

    async def append(
        self, *events: AuditEvent, companion: Companion | None = None
    ) -> list[AppendReceipt]:
        """Append events durably (group commit); fail closed.

        ``companion`` rides with the last event's transaction (see :meth:`commit`).

        Raises:
            AuditUnavailable: any event could not be made durable.
        """
        last = len(events) - 1
        try:
            if last == 0:  # the usual case: no task and gathering future for one entry
                return [await self.audit.append(events[0], companion=companion)]
            return list(
                await asyncio.gather(
                    *(
                        self.audit.append(e, companion=companion if i == last else None)
                        for i, e in enumerate(events)
                    )
                )
            )
        except AuditUnavailable:
            raise
        except CentinelaError as exc:
            if isinstance(exc, InvalidArgument):
                # An entry the schema refuses is a bug of ours, never the caller's fault:
                # say so in the log by field, and fail closed.
                log.error("audit.entry_refused", field=exc.field)
            raise AuditUnavailable("the audit log could not record this decision") from exc

    async def commit(
        self,
        event: AuditEvent,
        respond: Callable[[int], Message],
        *,
        alerts: list[dict[str, Any]] | None = None,
        extra: Companion | None = None,
    ) -> Message:
        """Append the decision's entry durably, with its companions, and build the answer.

        In the entry's own transaction go the alerts it raised and, for an idempotent
        request, the stored answer: after a crash either all of them exist or none does.

        Raises:
            AuditUnavailable: the entry could not be made durable (no answer is given).
        """
        parts: list[Companion] = []
        alert_rows = AlertStore.companion(alerts or [])
        if alert_rows is not None:
            parts.append(alert_rows)
        if extra is not None:
            parts.append(extra)
        key = current_key()
        built: list[Message] = []
        if key is not None:

            def stored(index: int) -> bytes:
                # Built once, in the writer's transaction: the caller gets this very message.
                built.append(respond(index))
                return bytes(built[-1].SerializeToString())

            parts.append(IdempotencyStore.companion(key, stored))

        companion = Companions(tuple(parts)) if parts else None
        (receipt,) = await self.append(event, companion=companion)
        return built[-1] if built else respond(receipt.index)

    def event(
        self,
        event_type: EventType,
        *,
        call: CallState,
        caller: Caller,
        context: Mapping[str, Any],
        decision: Decision,
        decision_id: str,
        outcome: str,
        refs: Mapping[str, Any] | None = None,
        digests: Mapping[str, str] | None = None,
        metrics: Mapping[str, float | int] | None = None,
        rule_ids: Sequence[str] | None = None,
    ) -> AuditEvent:
        """An audit event for a decision of the current call."""
        return AuditEvent(
            event_type=event_type,
            request_id=call.request_id,
            decision_id=decision_id,
            caller=self.audit_caller(caller, context),
            purpose=context.get("purpose") or None,
            site_id=context.get("site_id") or None,
            policy_bundle_digest=artifact(decision.bundle_digest),
            rule_ids=tuple(decision.reasons if rule_ids is None else rule_ids),
            outcome=outcome,
            refs=dict(refs or {}),
            digests=dict(digests or {}),
            metrics=dict(metrics or {}),
        )

    async def authorise(
        self,
        rpc: str,
        *,
        call: CallState,
        caller: Caller,
        context: Mapping[str, Any],
        refs: Mapping[str, Any] | None = None,
        digests: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> tuple[Decision, str]:
        """Decide; on deny, audit the denial and raise; on allow return (decision, id).

        The allow itself is audited by the caller together with what it did (one entry per
        decision), except for reads, which call :meth:`record` at once.

        Raises:
            PolicyDenied, FacialMatchingDisabled, InvalidArgument, ResourceExhausted: denied.
            AuditUnavailable: the denial could not be audited.
        """
        decision_id = new_decision_id()
        call.decision_id = decision_id
        rate = extra.pop("rate", None)
        doc = self.policy_input(rpc, caller, context, **extra)
        active, shadow = await self.decide(doc)
        if active.allow and rate is not None and _over_ceiling(rate, active):
            # R14 as an obligation: the policy sets the ceiling, the server counts.
            active = dataclasses.replace(
                active, allow=False, reasons=("R14",), obligations=type(active.obligations)()
            )
        events: list[AuditEvent] = []
        if shadow is not None and (shadow.allow != active.allow):
            events.append(
                self.event(
                    EventType.SHADOW_DISAGREEMENT,
                    call=call,
                    caller=caller,
                    context=context,
                    decision=shadow,
                    decision_id=decision_id,
                    outcome="SHADOW_ALLOW" if shadow.allow else "SHADOW_DENY",
                )
            )
        if not active.allow:
            events.append(
                self.event(
                    EventType.DENIAL,
                    call=call,
                    caller=caller,
                    context=context,
                    decision=active,
                    decision_id=decision_id,
                    outcome="DENIED",
                    refs=refs,
                    digests=digests,
                )
            )
            await self.append(*events)
            raise error_for_denial(active, decision_id)
        if events:
            await self.append(*events)
        return active, decision_id
