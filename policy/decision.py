"""The policy decision: what an engine returned, parsed defensively.

Invariants (LEGAL_RULES.md; DESIGN.md §5):

* A :class:`Decision` is built only by :func:`parse_decision` or :meth:`Decision.deny`.
  Anything that does not match the contract exactly (wrong type, missing field, a threshold
  below the bundle's calibrated floor, more than 50 results) becomes a deny with reason
  ``ENGINE_UNAVAILABLE``: the server never acts on a half-understood answer (fail closed).
* A deny opens nothing: no galleries, no results, no visible fields.
* Reasons are rule ids (``R1``..``R16``) or ``INPUT_MALFORMED`` / ``ENGINE_UNAVAILABLE`` /
  ``DEFAULT_DENY``; details name input fields, never their values.
* ``instants`` (optional in the contract) lists, per number of the input the server may
  reuse a decision across (:data:`INSTANT_FIELDS`), the values a rule compares it with;
  the server reuses a decision between them (server/decision_cache.py). A number without
  an entry is one the decision may depend on in any way.
* ``reads`` (optional) names, per section of ``data.dynamic`` (:data:`DYNAMIC_SECTIONS`),
  the keys the decision looked up; the server keeps the decision while other entries
  change. Without it, the decision may depend on all of ``data.dynamic``.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

ENGINE_UNAVAILABLE = "ENGINE_UNAVAILABLE"
INPUT_MALFORMED = "INPUT_MALFORMED"
DEFAULT_DENY = "DEFAULT_DENY"

MODES = frozenset({"ALERT", "INVESTIGATION", "VERIFY", "ADMIN", "READ"})
#: The input numbers a policy may declare instants for (paths into the input), and whether
#: each is a time in integer nanoseconds (else any finite number).
INSTANT_FIELDS: Mapping[str, bool] = {
    "context.now": True,
    "context.capture_time": True,
    "probe.quality": False,
}
#: More instants than this for one number reads as off-contract (bounds a lookup's work).
MAX_INSTANTS = 1_000
#: The sections of ``data.dynamic`` the server pushes, each an object by key, and so the
#: sections a decision's ``reads`` may name.
DYNAMIC_SECTIONS = ("sites", "authorisations", "models")
#: More keys than this in one section of ``reads`` reads as off-contract.
MAX_READS = 1_000
#: What a decision read of ``data.dynamic``: section -> keys looked up (present or absent).
Reads = Mapping[str, frozenset[str]]

Number = int | float
#: Where a decision taken at some value holds: the open interval between the neighbouring
#: instants (``None``: no bound), or ``None`` when the value is an instant itself.
Span = tuple[Number | None, Number | None] | None
MAX_RESULTS_CAP = 50
_REASON = re.compile(r"^(R([1-9]|1[0-6])|INPUT_MALFORMED|ENGINE_UNAVAILABLE|DEFAULT_DENY)$")

#: Which rule each obligation field carries; used to attribute shadow disagreements.
OBLIGATION_RULES: Mapping[str, str] = {
    "galleries": "R2",
    "min_score": "R8",
    "max_results": "R8",
    "mode": "R10",
    "visible_fields": "R10",
    "human_review": "R9",
    "two_person_confirmation": "R9",
    "rate_ceiling": "R14",
    "active_only": "R6",
    "exclude_objectors": "R7",
    "objection_exempt_subjects": "R7",
    "alert_scope": "R10",
    "retain_non_hit_probe": "R11",
}


@dataclasses.dataclass(frozen=True)
class RateCeiling:
    """Requests per minute allowed to this caller and from this site (R14)."""

    caller_per_minute: int = 0
    site_per_minute: int = 0


@dataclasses.dataclass(frozen=True)
class Obligations:
    """What the server must do with an allowed request (see docs/policy.md)."""

    galleries: tuple[str, ...] = ()
    min_score: Mapping[str, float] = dataclasses.field(default_factory=dict)
    max_results: int = 0
    mode: str = "READ"
    visible_fields: tuple[str, ...] = ()
    human_review: bool = True
    two_person_confirmation: bool = False
    rate_ceiling: RateCeiling = dataclasses.field(default_factory=RateCeiling)
    active_only: bool = True
    exclude_objectors: bool = False
    objection_exempt_subjects: tuple[str, ...] = ()
    #: For alert RPCs: {"level": "own_sites"|"region"|"national", ...}; None otherwise.
    alert_scope: Mapping[str, str] | None = None
    retain_non_hit_probe: bool = False

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view, in the contract's shape."""
        return {
            "galleries": list(self.galleries),
            "min_score": dict(self.min_score),
            "max_results": self.max_results,
            "mode": self.mode,
            "visible_fields": list(self.visible_fields),
            "human_review": self.human_review,
            "two_person_confirmation": self.two_person_confirmation,
            "rate_ceiling": dataclasses.asdict(self.rate_ceiling),
            "active_only": self.active_only,
            "exclude_objectors": self.exclude_objectors,
            "objection_exempt_subjects": list(self.objection_exempt_subjects),
            "alert_scope": dict(self.alert_scope) if self.alert_scope is not None else None,
            "retain_non_hit_probe": self.retain_non_hit_probe,
        }


@dataclasses.dataclass(frozen=True)
class Decision:
    """A whole policy decision, tagged with the bundle digest and engine that made it."""

    allow: bool
    reasons: tuple[str, ...]
    obligations: Obligations
    bundle_digest: str
    engine: str
    #: Names of malformed input fields (only with INPUT_MALFORMED).
    details: tuple[str, ...] = ()
    #: Per input number (:data:`INSTANT_FIELDS`), the sorted values at which the decision
    #: may change with it.
    instants: Mapping[str, tuple[Number, ...]] = dataclasses.field(default_factory=dict)
    #: Per section of ``data.dynamic``, the keys the decision looked up; a section not named
    #: was not read. ``None``: the decision may depend on all of ``data.dynamic``.
    reads: Reads | None = None

    @classmethod
    def deny(
        cls, reason: str, digest: str, engine: str = "", details: tuple[str, ...] = ()
    ) -> Decision:
        """A deny that opens nothing, citing ``reason``."""
        return cls(False, (reason,), Obligations(), digest, engine, details)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (contract shape plus digest, engine and details)."""
        return {
            "allow": self.allow,
            "reasons": list(self.reasons),
            "obligations": self.obligations.as_dict(),
            "details": list(self.details),
            "bundle_digest": self.bundle_digest,
            "engine": self.engine,
            "instants": {k: list(v) for k, v in self.instants.items()},
            "reads": None if self.reads is None else {k: sorted(v) for k, v in self.reads.items()},
        }


class _Malformed(Exception):
    """The raw result does not match the contract."""


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Malformed(what)
    return tuple(value)


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _Malformed(what)
    return value


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Malformed(what)
    if isinstance(value, float) and not value.is_integer():
        raise _Malformed(what)
    number = int(value)
    if not lo <= number <= hi:
        raise _Malformed(what)
    return number


def _score(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Malformed(what)
    f = float(value)
    if not math.isfinite(f) or not 0.0 <= f <= 1.0:
        raise _Malformed(what)
    return f


def _obligations(raw: Any, allow: bool, floors: Mapping[str, float] | None) -> Obligations:
    if not isinstance(raw, dict):
        raise _Malformed("obligations")
    galleries = _str_tuple(raw.get("galleries"), "galleries")
    ms = raw.get("min_score")
    if not isinstance(ms, dict):
        raise _Malformed("min_score")
    min_score = {str(k): _score(v, "min_score") for k, v in ms.items()}
    max_results = _int(raw.get("max_results"), "max_results", 0, MAX_RESULTS_CAP)
    mode = raw.get("mode")
    if not isinstance(mode, str) or mode not in MODES:
        raise _Malformed("mode")
    rc = raw.get("rate_ceiling")
    if not isinstance(rc, dict):
        raise _Malformed("rate_ceiling")
    ceiling = RateCeiling(
        _int(rc.get("caller_per_minute"), "rate_ceiling", 0, 10**9),
        _int(rc.get("site_per_minute"), "rate_ceiling", 0, 10**9),
    )
    scope = raw.get("alert_scope")
    if scope is not None and (
        not isinstance(scope, dict) or not all(isinstance(v, str) for v in scope.values())
    ):
        raise _Malformed("alert_scope")
    active_only = _bool(raw.get("active_only"), "active_only")
    if not active_only:
        raise _Malformed("active_only")  # R6 has no off switch
    retain = _bool(raw.get("retain_non_hit_probe", False), "retain_non_hit_probe")
    if retain:
        raise _Malformed("retain_non_hit_probe")  # R11 has no off switch
    if allow:
        for g in galleries:
            if g not in min_score:
                raise _Malformed("min_score")
            if floors is not None and (g not in floors or min_score[g] < floors[g]):
                raise _Malformed("min_score below floor")
        if galleries and max_results < 1:
            raise _Malformed("max_results")
    return Obligations(
        galleries=galleries,
        min_score=min_score,
        max_results=max_results,
        mode=mode,
        visible_fields=_str_tuple(raw.get("visible_fields"), "visible_fields"),
        human_review=_bool(raw.get("human_review"), "human_review"),
        two_person_confirmation=_bool(raw.get("two_person_confirmation"), "two_person"),
        rate_ceiling=ceiling,
        active_only=active_only,
        exclude_objectors=_bool(raw.get("exclude_objectors"), "exclude_objectors"),
        objection_exempt_subjects=_str_tuple(raw.get("objection_exempt_subjects"), "exempt"),
        alert_scope=dict(scope) if scope is not None else None,
        retain_non_hit_probe=retain,
    )


def is_number(value: Any) -> bool:
    """A finite JSON number (a bool is not one)."""
    return type(value) in (int, float) and math.isfinite(value)


def _number(value: Any, integer: bool) -> bool:
    # Exact integers only for times: a float would have lost the nanoseconds of an instant.
    return type(value) is int if integer else is_number(value)


def _instants(raw: Any) -> dict[str, tuple[Number, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _Malformed("instants")
    out: dict[str, tuple[Number, ...]] = {}
    for name, instants in raw.items():
        integer = INSTANT_FIELDS.get(name)
        if integer is None or not isinstance(instants, list) or len(instants) > MAX_INSTANTS:
            raise _Malformed("instants")
        if not all(_number(v, integer) for v in instants):
            raise _Malformed("instants")
        out[name] = tuple(sorted(set(instants)))  # in no order from rego-cpp (text sort)
    return out


def _reads(raw: Any) -> Reads | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _Malformed("reads")
    out: dict[str, frozenset[str]] = {}
    for section, keys in raw.items():
        if section not in DYNAMIC_SECTIONS or not isinstance(keys, list) or len(keys) > MAX_READS:
            raise _Malformed("reads")
        out[section] = frozenset(_str_tuple(keys, "reads"))
    return out


def span(instants: Sequence[Number], value: Number) -> Span:
    """Where a decision taken at ``value`` holds, given the sorted ``instants`` the policy
    declared for that number: the open interval between the neighbouring instants, or
    ``None`` when ``value`` is one of them (the decision holds at that value alone)."""
    i = bisect.bisect_left(instants, value)
    if i < len(instants) and instants[i] == value:
        return None
    return (instants[i - 1] if i else None, instants[i] if i < len(instants) else None)


def holds(span: Span, at: Number, value: Number) -> bool:
    """Whether a decision taken at ``at``, holding over ``span``, holds at ``value``."""
    if span is None:
        return value == at
    lo, hi = span
    return (lo is None or value > lo) and (hi is None or value < hi)


def _reason_order(reason: str) -> tuple[int, str]:
    """R1 < R2 < … < R16, then the non-rule reasons."""
    return (int(reason[1:]), "") if reason[1:].isdigit() else (100, reason)


def parse_decision(
    raw: Any,
    digest: str,
    engine: str,
    floors: Mapping[str, float] | None = None,
) -> Decision:
    """Turn an engine's raw result into a :class:`Decision`; never raises.

    ``floors`` (gallery -> calibrated threshold floor) lets the engine check R8 once more on
    the way out. Anything malformed reads as a deny with ``ENGINE_UNAVAILABLE``.
    """
    try:
        if not isinstance(raw, dict):
            raise _Malformed("result")
        allow = _bool(raw.get("allow"), "allow")
        reasons = _str_tuple(raw.get("reasons"), "reasons")
        if not all(_REASON.match(r) for r in reasons):
            raise _Malformed("reasons")
        reasons = tuple(sorted(set(reasons), key=_reason_order))
        if not allow and not reasons:
            raise _Malformed("reasons")
        details = _str_tuple(raw.get("details", []), "details")
        obligations = _obligations(raw.get("obligations"), allow, floors)
        instants = _instants(raw.get("instants"))
        reads = _reads(raw.get("reads"))
        if not allow:
            obligations = dataclasses.replace(
                obligations, galleries=(), min_score={}, max_results=0, visible_fields=()
            )
    except (_Malformed, TypeError, ValueError, AttributeError, OverflowError):
        # Fail closed on anything off-contract, including shapes no check foresaw.
        return Decision.deny(ENGINE_UNAVAILABLE, digest, engine)
    return Decision(allow, reasons, obligations, digest, engine, details, instants, reads)
