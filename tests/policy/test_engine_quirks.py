"""Known defects of rego-cpp 1.5.2 (regopy) that the bundles and engine work around.

Each test asserts the *correct* (OPA) behaviour and is a strict xfail: when a regopy release
fixes the defect the test passes, the suite fails, and the workaround it names can go.
Queries go through ``rego_native``, which never renders an error output (that crashes).
"""

from __future__ import annotations

import pytest

from centinela.policy import rego_native


def _q(text: str, module: str | None = None) -> object:
    interp = rego_native.Interpreter()
    if module:
        interp.add_module("m.rego", module)
    return rego_native.query(interp, text)


@pytest.mark.xfail(
    strict=True,
    reason="min/max/sort order numbers as text; obligations.rego uses greater()/lesser()",
)
def test_min_of_numbers() -> None:
    assert _q("min({5, 10})") == 5


@pytest.mark.xfail(
    strict=True, reason="'Z' offset not parsed; request.rego ts_ns() rewrites it to +00:00"
)
def test_parse_rfc3339_with_z() -> None:
    assert _q('time.parse_rfc3339_ns("2026-03-01T10:00:01Z")') == 1772359201000000000


@pytest.mark.xfail(strict=True, reason="object.union is not recursive; tests use patch()")
def test_object_union_merges_nested_objects() -> None:
    assert _q('object.union({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}})') == {"a": {"b": 3, "c": 2}}


@pytest.mark.xfail(
    strict=True,
    raises=rego_native.RegoFailure,
    reason=(
        "whole-input `with` does not compile when the target depends on other rules; "
        "the embedded test runner evaluates cases instead"
    ),
)
def test_with_whole_input_on_dependent_rule() -> None:
    module = 'package p\ns := 5\ny := [s, input.z]\nt := r if { r := y with input as {"z": 2} }\n'
    assert _q("data.p.t", module) == [5, 2]


@pytest.mark.xfail(
    strict=True,
    reason=(
        "input floats are read to 6 decimals (0.4999999 compares equal to 0.5); the server "
        "rounds a probe's quality down to 0.05 before the policy, and the decision cache "
        "reuses a decision only across those steps"
    ),
)
def test_input_floats_keep_their_precision() -> None:
    module = "package p\nbelow if input.q < 0.5\n"
    interp = rego_native.Interpreter()
    interp.add_module("m.rego", module)
    rego_native.set_input(interp, {"q": 0.4999999})
    assert rego_native.query(interp, "data.p.below") is True


def test_workarounds_hold() -> None:
    """The spelled-out forms the bundles use give the right answers on rego-cpp."""
    assert _q('time.parse_rfc3339_ns("2026-03-01T10:00:01+00:00")') == 1772359201000000000
    module = "package p\ngreater(a, b) := a if { a >= b } else := b\nx := greater(5, 10)\n"
    assert _q("data.p.x", module) == 10
