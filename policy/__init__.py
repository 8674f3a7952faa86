"""Policy as code: Rego bundles for the legal rules R1–R16 and the engines that run them.

The server calls :class:`PolicyService` (active engine, optional shadow) or a
:class:`PolicyEngine` directly; see docs/policy.md for the decision contract.
"""

from centinela.policy.bundle import Bundle, TestResult, bundle_names
from centinela.policy.decision import (
    DEFAULT_DENY,
    DYNAMIC_SECTIONS,
    ENGINE_UNAVAILABLE,
    INPUT_MALFORMED,
    INSTANT_FIELDS,
    Decision,
    Obligations,
    RateCeiling,
    Reads,
    holds,
    parse_decision,
    span,
)
from centinela.policy.engine import EmbeddedEngine, PolicyEngine
from centinela.policy.opa import OpaServerEngine
from centinela.policy.service import PolicyService, ReloadResult, ShadowedDecision

__all__ = [
    "DEFAULT_DENY",
    "DYNAMIC_SECTIONS",
    "ENGINE_UNAVAILABLE",
    "INPUT_MALFORMED",
    "INSTANT_FIELDS",
    "Bundle",
    "Decision",
    "EmbeddedEngine",
    "Obligations",
    "OpaServerEngine",
    "PolicyEngine",
    "PolicyService",
    "RateCeiling",
    "Reads",
    "ReloadResult",
    "ShadowedDecision",
    "TestResult",
    "bundle_names",
    "holds",
    "parse_decision",
    "span",
]
