"""Audit entries: what one leaf of the log says, as canonical JSON (RFC 8785).

Invariants (DESIGN.md §6, LEGAL_RULES R11 and R16):

* An entry is the RFC 8785 canonical JSON of a fixed schema: every field has a known name and a
  validated shape. There is no free-form text field. The bytes are exactly what the log hashes
  as the leaf and what an export writes on one line (canonical JSON never holds a raw newline).
* The schema has no place for a raw vector, plate, DNI or name. Personal values reach the log as
  keyed digests only, made by :class:`Digester`: HMAC-SHA256 under the audit key, with a per-kind
  domain-separation label, so a digest of a plate can neither be reversed by enumerating plates
  without the key nor be compared across kinds. ``digests`` only accepts values of that exact
  form; identifiers (``refs``, request, decision and operator ids) must be opaque system tokens
  of 6 to 128 characters from a restricted alphabet (no spaces, no accents: no names) and are
  refused when they have a plate's shape (2-3 alphanumerics, optional dash, 3-4 digits) or hold
  a run of 8 digits (a DNI) outside a hex string — a best-effort guard behind the typed schema,
  which is the real one; short labels (purpose, outcome, rule ids) come from a restricted
  charset; numbers are only allowed under ``metrics`` (scores, thresholds, counts).
* Unknown keys are refused, not dropped: a caller that tries to log something new must extend
  the schema here, in review.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hmac
import json
import math
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from hashlib import sha256
from typing import Any

import rfc8785

from centinela.errors import InvalidArgument

SCHEMA_VERSION = 1


class EventType(StrEnum):
    """What happened. New kinds are added at the end; values never change meaning."""

    MATCH_DECISION = "MATCH_DECISION"
    DENIAL = "DENIAL"
    ADMIN_CHANGE = "ADMIN_CHANGE"
    REGISTRY_CHANGE = "REGISTRY_CHANGE"
    AUDIT_READ = "AUDIT_READ"
    POLICY_LOAD = "POLICY_LOAD"
    POLICY_RELOAD = "POLICY_RELOAD"
    SHADOW_DISAGREEMENT = "SHADOW_DISAGREEMENT"
    ALERT_CONFIRMATION = "ALERT_CONFIRMATION"
    SERVICE_START = "SERVICE_START"
    SERVICE_STOP = "SERVICE_STOP"
    EVIDENCE_EXPORT = "EVIDENCE_EXPORT"
    ALERT_SUBSCRIPTION = "ALERT_SUBSCRIPTION"
    SIGHTING_READ = "SIGHTING_READ"
    CALIBRATION = "CALIBRATION"


#: Kinds of personal value the Digester accepts; each is its own HMAC domain.
DIGEST_KINDS = frozenset(
    {
        "probe",
        "plate",
        "dni",
        "template",
        "name",
        "face",
        "person",
        "vehicle",
        "subject",
        # an external identifier (a court's order id, a cited reference) the log cannot
        # hold verbatim because it is shaped like a DNI or plate; see external_id()
        "authorization",
        "reference",
    }
)
#: Names of pseudonymous references an entry may carry.
REF_KINDS = frozenset(
    {
        "requisition",
        "report",
        "authorization",
        "gallery",
        "template",
        "watchlist_entry",
        "alert",
        "candidate",
        "confirmation",
        "objection",
        "export",
        "impact_assessment",
        "session",
        "model",
        "target",
        "reference",  # a cited warrant, police-report or authorisation reference
    }
)
#: Names of numeric facts an entry may carry.
METRIC_KINDS = frozenset(
    {
        "score",
        "top_score",
        "threshold",
        "candidates",
        "hits",
        "latency_ms",
        "entries",
        "from_index",
        "to_index",
        "shadow_score",
        # administrative and registry operations (counts only)
        "templates",
        "results",
        "named_subjects",
        "confirmations",
        "received",
        "accepted",
        "unchanged",
        "rejected",
        "removed",
        "replaced",
        "batches",
        "batch",  # the number of a registry import batch (its stream message)
        # a gallery's calibration (R8): aggregates of a non-mated set, never one score
        "gallery_size",
        "target_fpir",
        "threshold_floor",
        "fpir_at_floor",
    }
)
#: Names of non-personal SHA-256 digests (of a policy bundle, a configuration, a model file).
ARTIFACT_DIGEST_KINDS = frozenset({"policy_bundle", "config", "model", "policy_data"})

_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")
_OPAQUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@=+-]{5,127}")
_KEYED = re.compile(r"hmac-sha256:[0-9a-f]{64}")
_ARTIFACT = re.compile(r"sha256:[0-9a-f]{64}")
# Shapes a Peruvian plate or DNI takes, refused as identifiers even inside the opaque alphabet.
_PLATE_LIKE = re.compile(r"[A-Za-z0-9]{2,3}[- ]?[0-9]{3,4}")
_DIGIT_RUN = re.compile(r"(?<![0-9A-Fa-f])[0-9]{8}(?![0-9A-Fa-f])")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _token(field: str, value: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise InvalidArgument("must be a short label: letter then [A-Za-z0-9_.:-]", field=field)
    return value


def _opaque_id(field: str, value: str) -> str:
    if not isinstance(value, str) or not _OPAQUE_ID.fullmatch(value):
        raise InvalidArgument(
            "must be an opaque identifier of 6-128 chars from [A-Za-z0-9_.:@=+-]", field=field
        )
    if _UUID.fullmatch(value):
        return value
    if _PLATE_LIKE.fullmatch(value) or _DIGIT_RUN.search(value):
        raise InvalidArgument("looks like a plate or DNI: log its keyed digest", field=field)
    return value


def is_label(value: str) -> bool:
    """Whether the log records ``value`` as a short label (purpose, site id, rule id)."""
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


def is_opaque_id(value: str) -> bool:
    """Whether the log records ``value`` verbatim as a pseudonymous reference."""
    try:
        _opaque_id("ref", value)
    except InvalidArgument:
        return False
    return True


def check_opaque_id(field: str, value: str) -> str:
    """Validate an identifier as the log will (callers check input before deciding).

    Raises:
        InvalidArgument: not 6-128 characters of ``[A-Za-z0-9_.:@=+-]``, or shaped like a
            plate or containing a run of eight digits (a DNI).
    """
    return _opaque_id(field, value)


def external_id(kind: str, value: str, digester: Digester) -> tuple[dict[str, str], dict[str, str]]:
    """An identifier chosen outside Centinela (a court's order id, a cited warrant) as an
    entry records it: ``(refs, digests)``.

    Verbatim as a ref when the schema accepts it as an opaque id; otherwise (too short, a
    ``/``, shaped like a plate or holding an eight-digit run) as a keyed digest of the same
    kind, so the entry still names it for anyone who can compute the digest, and never
    refuses the entry (which would fail the call closed for a caller's harmless choice).
    """
    if not value:
        return {}, {}
    if is_opaque_id(value):
        return {kind: value}, {}
    return {}, {kind: digester.digest(kind, value)}


def _keyed_digest(field: str, value: str) -> str:
    if not isinstance(value, str) or not _KEYED.fullmatch(value):
        raise InvalidArgument("must be a keyed digest made by the Digester", field=field)
    return value


def _metric(field: str, value: float | int) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument("must be a number", field=field)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument("must be finite", field=field)
    if isinstance(value, int) and abs(value) >= 2**53:
        raise InvalidArgument("integer out of the JSON-safe range", field=field)
    return value


def _keys(field: str, mapping: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for key in mapping:
        if key not in allowed:
            raise InvalidArgument("unknown key (extend the audit schema)", field=f"{field}.{key}")


class Digester:
    """Keyed digests of personal values: HMAC-SHA256(audit key, label || 0x00 || value).

    The label is ``centinela/audit/<kind>``, so the same bytes digested as a ``plate`` and as a
    ``dni`` give unrelated digests. String values are UTF-8 encoded. The key never leaves the
    object and is at least 32 bytes.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise InvalidArgument("the audit HMAC key must be at least 32 bytes", field="key")
        self._key = bytes(key)

    def digest(self, kind: str, value: bytes | str) -> str:
        """``hmac-sha256:<hex>`` of ``value`` in the domain of ``kind``.

        Raises:
            InvalidArgument: unknown kind.
        """
        if kind not in DIGEST_KINDS:
            raise InvalidArgument("unknown digest kind", field="kind")
        data = value.encode() if isinstance(value, str) else bytes(value)
        return self._mac(f"centinela/audit/{kind}", data)

    def seal(self, purpose: str, data: bytes) -> str:
        """``hmac-sha256:<hex>`` sealing ``data`` the server keeps for itself (e.g. the
        statistics it saves between runs), so that whoever can write the file or the
        database but lacks the key cannot forge it. The label ``centinela/seal/<purpose>``
        lies outside the digests' ``centinela/audit/<kind>`` domains."""
        return self._mac(f"centinela/seal/{purpose}", data)

    def _mac(self, label: str, data: bytes) -> str:
        mac = hmac.new(self._key, label.encode() + b"\x00" + data, sha256)
        return "hmac-sha256:" + mac.hexdigest()


def artifact_digest(data: bytes) -> str:
    """``sha256:<hex>`` of a non-personal artifact (a policy bundle, a configuration file)."""
    return "sha256:" + sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who asked: organisation, kind of caller, and the operator's pseudonymous id."""

    org: str
    kind: str
    operator_id: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"org": _token("caller.org", self.org), "kind": _token("caller.kind", self.kind)}
        if self.operator_id is not None:
            out["operator_id"] = _opaque_id("caller.operator_id", self.operator_id)
        return out


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def format_time(when: dt.datetime) -> str:
    """RFC 3339 UTC with microseconds and a ``Z``; naive datetimes are refused."""
    if when.tzinfo is None:
        raise InvalidArgument("time must be timezone-aware", field="time")
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclasses.dataclass(frozen=True, slots=True)
class AuditEvent:
    """One event to log. Build it, then :meth:`encode` it (validates every field).

    ``refs``: pseudonymous references (requisition, authorization, alert ids…); ``digests``:
    keyed digests from :class:`Digester` by kind; ``artifacts``: plain SHA-256 of non-personal
    artifacts (policy bundle, configuration); ``metrics``: numbers (scores, counts).
    """

    event_type: EventType
    request_id: str | None = None
    decision_id: str | None = None
    caller: Caller | None = None
    purpose: str | None = None
    site_id: str | None = None
    policy_bundle_digest: str | None = None
    rule_ids: Sequence[str] = ()
    outcome: str | None = None
    refs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    digests: Mapping[str, str] = dataclasses.field(default_factory=dict)
    artifacts: Mapping[str, str] = dataclasses.field(default_factory=dict)
    metrics: Mapping[str, float | int] = dataclasses.field(default_factory=dict)
    time: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """The validated JSON object (before canonicalisation).

        Raises:
            InvalidArgument: a field is missing, unknown or of the wrong shape (the message
                names the field, never its value).
        """
        try:
            etype = EventType(self.event_type)
        except ValueError:
            raise InvalidArgument("unknown event type", field="event_type") from None
        out: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "type": etype.value,
            "time": format_time(self.time or _utc_now()),
        }
        if self.request_id is not None:
            out["request_id"] = _opaque_id("request_id", self.request_id)
        if self.decision_id is not None:
            out["decision_id"] = _opaque_id("decision_id", self.decision_id)
        if self.caller is not None:
            out["caller"] = self.caller.to_json()
        if self.purpose is not None:
            out["purpose"] = _token("purpose", self.purpose)
        if self.site_id is not None:
            out["site_id"] = _token("site_id", self.site_id)
        if self.policy_bundle_digest is not None:
            if not _ARTIFACT.fullmatch(self.policy_bundle_digest):
                raise InvalidArgument("must be sha256:<hex>", field="policy_bundle_digest")
            out["policy_bundle_digest"] = self.policy_bundle_digest
        if self.rule_ids:
            if isinstance(self.rule_ids, str):
                raise InvalidArgument("must be a list of rule ids", field="rule_ids")
            out["rule_ids"] = [_token("rule_ids", r) for r in self.rule_ids]
        if self.outcome is not None:
            out["outcome"] = _token("outcome", self.outcome)
        if self.refs:
            _keys("refs", self.refs, REF_KINDS)
            out["refs"] = {k: _opaque_id(f"refs.{k}", v) for k, v in self.refs.items()}
        if self.digests:
            _keys("digests", self.digests, DIGEST_KINDS)
            out["digests"] = {k: _keyed_digest(f"digests.{k}", v) for k, v in self.digests.items()}
        if self.artifacts:
            _keys("artifacts", self.artifacts, ARTIFACT_DIGEST_KINDS)
            for k, v in self.artifacts.items():
                if not isinstance(v, str) or not _ARTIFACT.fullmatch(v):
                    raise InvalidArgument("must be sha256:<hex>", field=f"artifacts.{k}")
            out["artifacts"] = dict(self.artifacts)
        if self.metrics:
            _keys("metrics", self.metrics, METRIC_KINDS)
            out["metrics"] = {k: _metric(f"metrics.{k}", v) for k, v in self.metrics.items()}
        return out

    def encode(self) -> bytes:
        """RFC 8785 canonical JSON bytes: exactly what the log hashes and exports."""
        return canonical_json(self.to_json()).encode()


_SLOT = "\x00"


def canonical_json(obj: dict[str, Any]) -> str:
    """RFC 8785 text of a validated entry object, using the C JSON encoder where it agrees.

    Every key of the schema is ASCII and every string value passed a printable-ASCII pattern, so
    JSON escaping and key order (UTF-16 code units) coincide with ``json.dumps(sort_keys=True)``.
    Floats are where the two differ (ECMAScript number formatting), so the ``metrics`` object is
    written through the ``rfc8785`` package and spliced into a slot no valid string can hold.
    A property test checks the result against ``rfc8785.dumps``.
    """
    metrics = obj.get("metrics")
    if not metrics:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    head = dict(obj)
    head["metrics"] = _SLOT
    text = json.dumps(head, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    inner: bytes = rfc8785.dumps(metrics)
    return text.replace(json.dumps(_SLOT), inner.decode(), 1)


def validate_entry_bytes(entry: bytes) -> None:
    """Cheap structural checks on pre-encoded entry bytes before they are logged.

    Raises:
        InvalidArgument: not a single-line JSON object, or not UTF-8.
    """
    if not entry or entry[:1] != b"{" or entry[-1:] != b"}" or b"\n" in entry or b"\r" in entry:
        raise InvalidArgument("an entry is one line of canonical JSON", field="entry")
    try:
        entry.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument("an entry must be UTF-8", field="entry") from None
