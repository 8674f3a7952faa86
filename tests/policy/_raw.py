"""A raw engine result that keeps the decision contract: the base the parsing tests of
``instants`` and ``reads`` change one field of."""

from __future__ import annotations

from typing import Any

#: A deny (R1) with every field the contract requires.
DENIED: dict[str, Any] = {
    "allow": False,
    "reasons": ["R1"],
    "obligations": {
        "galleries": [],
        "min_score": {},
        "max_results": 0,
        "mode": "READ",
        "visible_fields": [],
        "human_review": True,
        "two_person_confirmation": False,
        "rate_ceiling": {"caller_per_minute": 0, "site_per_minute": 0},
        "active_only": True,
        "exclude_objectors": False,
        "objection_exempt_subjects": [],
        "alert_scope": None,
    },
    "details": [],
}
