"""Run a bundle's Rego tests through the embedded engine (rego-cpp), reported by test name.

The bundle tests are table-driven (see a bundle's ``fixtures_test.rego``): every
``test_<name>`` rule is ``check("<name>")`` and ``cases.<name>`` holds the input, optional
``dynamic`` / ``config`` overrides and the expectation. OPA runs the rules themselves, using
``with input as …`` (``check_test.rego``). rego-cpp 1.5.2 cannot compile that ``with`` on this
policy (a compile error for whole-input ``with``; seconds and gigabytes for per-key ``with``),
so this runner evaluates the *same* cases instead:

1. compile the test modules with ``check_test.rego`` replaced by a stub, read ``cases``;
2. for each test rule, decide its case through :class:`EmbeddedEngine` (the compiled entry
   point, with the case's data), then evaluate ``embedded_check`` on (decision, expectation).

3. when the case passes and its decision declares ``instants``, decide it again just inside
   the span each number's instants leave around the case's value, and at the declared
   instants within it: the decision must be the same there (the server reuses it across
   that span, server/decision_cache.py). A rule that compares a time or the quality with a
   value it does not declare fails the case whose number lies next to that value.

4. when the case passes and its decision declares ``reads``, decide it again on two
   variants of its ``data.dynamic``: every entry ``reads`` does not name removed; and
   every such entry changed, with an entry added under every string of any case's input.
   The decision must be the same, its ``instants`` and ``reads`` included (the server
   keeps it while such entries change). A rule that looks up an entry it does not
   declare, or reads a whole section, fails the cases it decides. Each variant is a
   compile (~70 ms), so cases are checked in groups that share data and ``reads``.

Invariant: a test rule without a case, a case without a test rule, or an engine error is a
failure, never a skip.
"""

from __future__ import annotations

import calendar
import dataclasses
import json
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

from centinela.errors import ConfigError
from centinela.policy import rego_native
from centinela.policy.bundle import (
    CHECK_STUB,
    CONFIG_KEY,
    OPA_ONLY_TEST_MODULE,
    Bundle,
    TestResult,
    deep_merge,
)
from centinela.policy.decision import (
    DYNAMIC_SECTIONS,
    INSTANT_FIELDS,
    Decision,
    Number,
    holds,
    is_number,
    span,
)
from centinela.policy.engine import EmbeddedEngine

TEST_PACKAGE = "centinela_test"
CHECK_ENTRYPOINT = "centinela_test/embedded_check"


def _test_modules(bundle: Bundle) -> dict[str, str]:
    mods = dict(bundle.test_modules)
    if OPA_ONLY_TEST_MODULE in mods:
        mods[OPA_ONLY_TEST_MODULE] = CHECK_STUB
    return mods


def load_cases(bundle: Bundle) -> tuple[dict[str, Any], dict[str, Any]]:
    """The bundle's test cases (name -> case) and the fixture ``data.dynamic``.

    Raises:
        RegoFailure: the test modules do not compile.
    """
    modules = {**bundle.policy_modules, **_test_modules(bundle)}
    interp, _ = rego_native.compile_bundle(modules, [bundle.data], [CHECK_ENTRYPOINT])
    cases = rego_native.query(interp, f"data.{TEST_PACKAGE}.cases")
    dynamic = rego_native.query(interp, f"data.{TEST_PACKAGE}.dynamic")
    return (cases if isinstance(cases, dict) else {}), (
        dynamic if isinstance(dynamic, dict) else {}
    )


def run_bundle_tests(bundle: Bundle) -> list[TestResult]:
    """Run every test rule of ``bundle``; one result per rule (plus orphan cases)."""
    names = bundle.test_names()
    modules = {**bundle.policy_modules, **_test_modules(bundle)}
    try:
        interp, checker = rego_native.compile_bundle(modules, [bundle.data], [CHECK_ENTRYPOINT])
        cases = rego_native.query(interp, f"data.{TEST_PACKAGE}.cases")
        fixture_dynamic = rego_native.query(interp, f"data.{TEST_PACKAGE}.dynamic")
    except rego_native.RegoFailure as exc:
        msg = f"test modules do not compile: {exc}"
        return [TestResult(t, p, False, msg) for p, t in names] or [
            TestResult("compile", TEST_PACKAGE, False, msg)
        ]
    if not isinstance(cases, dict):
        cases = {}
    engines: dict[str, EmbeddedEngine] = {}
    runner = rego_native.Interpreter()
    unread = Unread(cases, fixture_dynamic)
    results: list[TestResult] = []
    passed: list[tuple[int, dict[str, Any], Any]] = []
    seen: set[str] = set()
    for pkg, test in names:
        key = test.removeprefix("test_")
        seen.add(key)
        case = cases.get(key)
        if pkg != TEST_PACKAGE or not isinstance(case, dict):
            results.append(TestResult(test, pkg, False, f"no case {key!r} in {TEST_PACKAGE}.cases"))
            continue
        result, decision = _run_case(bundle, test, case, fixture_dynamic, engines, runner, checker)
        if result.passed:
            passed.append((len(results), case, decision))
        results.append(result)
    for i, why in unread.check(bundle, passed, fixture_dynamic):
        results[i] = TestResult(results[i].name, TEST_PACKAGE, False, why)
    for key in sorted(set(cases) - seen):
        results.append(TestResult(f"test_{key}", TEST_PACKAGE, False, "case has no test rule"))
    return results


def _engine_for(
    bundle: Bundle, case: dict[str, Any], fixture: Any, engines: dict[str, EmbeddedEngine]
) -> EmbeddedEngine:
    config_patch = case.get("config", {})
    dynamic = _dynamic_of(case, fixture)
    cache_key = json.dumps([config_patch, dynamic], sort_keys=True)
    engine = engines.get(cache_key)
    if engine is None:
        variant = bundle
        if config_patch:
            data = dict(bundle.data)
            data[CONFIG_KEY] = deep_merge(bundle.config, config_patch)
            variant = Bundle(bundle.name, bundle.path, bundle.files, data, bundle.digest)
        engine = EmbeddedEngine(variant, dynamic)
        engines[cache_key] = engine
    return engine


def _run_case(
    bundle: Bundle,
    test: str,
    case: dict[str, Any],
    fixture: Any,
    engines: dict[str, EmbeddedEngine],
    runner: rego_native.Interpreter,
    checker: rego_native.Bundle,
) -> tuple[TestResult, Any]:
    """Steps 1-3 for one case: its result, and its decision."""
    try:
        engine = _engine_for(bundle, case, fixture, engines)
        decision = engine.evaluate_raw(case.get("input"))
        if decision is None:
            return TestResult(test, TEST_PACKAGE, False, "decision undefined"), None
        rego_native.set_input(runner, {"decision": decision, "expect": case.get("expect", {})})
        ok = rego_native.query_entrypoint(runner, checker, CHECK_ENTRYPOINT)
    except (rego_native.RegoFailure, ConfigError, ValueError) as exc:
        return TestResult(test, TEST_PACKAGE, False, f"engine error: {exc}"), None
    if ok is True:
        try:
            moved = instants_differ(engine, case.get("input"), decision)
        except (rego_native.RegoFailure, ValueError) as exc:
            return TestResult(test, TEST_PACKAGE, False, f"engine error: {exc}"), decision
        if moved:
            return TestResult(test, TEST_PACKAGE, False, moved), decision
        return TestResult(test, TEST_PACKAGE, True), decision
    got = {k: decision.get(k) for k in ("allow", "reasons", "details")}
    return TestResult(
        test, TEST_PACKAGE, False, f"expected {case.get('expect')}, got {json.dumps(got)}"
    ), decision


_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:[Zz]|([+-])(\d\d):(\d\d))"
)


def rfc3339_ns(value: Any) -> int | None:
    """Nanoseconds since the epoch of an RFC 3339 time, or ``None`` if it is not one."""
    m = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        return None
    y, mo, d, h, mi, sec = (int(g) for g in m.groups()[:6])
    ns = calendar.timegm((y, mo, d, h, mi, sec)) * 1_000_000_000
    ns += int((m.group(7) or "").ljust(9, "0"))
    if m.group(8):
        offset = (int(m.group(9)) * 60 + int(m.group(10))) * 60 * 1_000_000_000
        ns -= offset if m.group(8) == "+" else -offset
    return ns


def format_ns(ns: int) -> str:
    """``ns`` since the epoch as RFC 3339 in UTC, with nanoseconds when it has any."""
    seconds, frac = divmod(ns, 1_000_000_000)
    y, mo, d, h, mi, sec = time.gmtime(seconds)[:6]
    stamp = f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{sec:02d}"
    return stamp + (f".{frac:09d}Z" if frac else "Z")


def _strings(doc: Any) -> Iterator[str]:
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, dict):
        for k, v in doc.items():
            yield k
            yield from _strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _strings(v)


def perturbed(value: Any) -> Any:
    """``value`` with every leaf changed: a bool negated, a number plus one, a string
    extended, an empty list given one element, a non-empty list emptied."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "~"
    if isinstance(value, list):
        return [] if value else ["~"]
    if isinstance(value, dict):
        return {k: perturbed(v) for k, v in value.items()}
    return "~"


def _normal(raw: Any) -> Any:
    """The whole decision, its instants sorted (rego-cpp lists a set in no fixed order)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("instants"), dict):
        return raw
    instants = {k: sorted(v) if isinstance(v, list) else v for k, v in raw["instants"].items()}
    return {**raw, "instants": instants}


class Unread:
    """Variants of a case's ``data.dynamic`` that differ only where its decision's ``reads``
    say it did not look (step 4 of the module's docstring)."""

    def __init__(self, cases: Mapping[str, Any], fixture: Any) -> None:
        inputs = [c.get("input") for c in cases.values() if isinstance(c, dict)]
        #: Keys to add: every string of every case's input, so a lookup of an entry the
        #: case's data does not hold (an unknown site) finds one.
        self.keys = sorted({s for inp in inputs for s in _strings(inp)})
        #: An entry of each section to copy: the first of the fixture or of any case's data.
        self.samples: dict[str, Any] = {"models": "model~"}
        docs = [fixture, *(c.get("dynamic") for c in cases.values() if isinstance(c, dict))]
        for section in DYNAMIC_SECTIONS:
            for doc in docs:
                part = doc.get(section) if isinstance(doc, dict) else None
                if isinstance(part, dict) and part:
                    self.samples[section] = part[min(part)]
                    break

    def variants(
        self, dynamic: Mapping[str, Any], reads: Mapping[str, Any]
    ) -> list[tuple[str, dict[str, Any]]]:
        """``(what, doc)`` for the two variants of ``dynamic`` around ``reads``."""
        removed: dict[str, Any] = dict(dynamic)
        changed: dict[str, Any] = dict(dynamic)
        for section in DYNAMIC_SECTIONS:
            part = dynamic.get(section)
            part = part if isinstance(part, dict) else {}
            named = reads.get(section, [])
            listed = set(named) if isinstance(named, list) else set()
            sample = self.samples.get(section, {})
            added = [k for k in self.keys if k not in part and k not in listed]
            removed[section] = {k: v for k, v in part.items() if k in listed}
            changed[section] = {k: v if k in listed else perturbed(v) for k, v in part.items()}
            changed[section].update((k, sample) for k in added)
        return [("removed", removed), ("changed, and entries added", changed)]

    def check(
        self, bundle: Bundle, passed: list[tuple[int, dict[str, Any], Any]], fixture: Any
    ) -> Iterator[tuple[int, str]]:
        """``(index, why)`` for each passed case whose decision is not the same where only
        entries its ``reads`` do not name differ (a decision without ``reads`` is not
        checked: the server keeps it across no change of data)."""
        groups: dict[str, list[tuple[int, dict[str, Any], Any]]] = {}
        for i, case, raw in passed:
            reads = raw.get("reads") if isinstance(raw, dict) else None
            if isinstance(reads, dict):
                key = [case.get("config", {}), _dynamic_of(case, fixture), reads]
                groups.setdefault(json.dumps(key, sort_keys=True), []).append((i, case, raw))
        for _, members in sorted(groups.items()):
            first, reads = members[0][1], members[0][2]["reads"]
            engines: dict[str, EmbeddedEngine] = {}  # this group's variants only
            try:
                variants = [
                    (what, _engine_for(bundle, {**first, "dynamic": doc}, fixture, engines))
                    for what, doc in self.variants(_dynamic_of(first, fixture), reads)
                ]
            except ConfigError as exc:
                for i, _, _ in members:
                    yield i, f"engine error: {exc}"
                continue
            for i, case, raw in members:
                why = _first_difference(variants, case.get("input"), raw)
                if why is not None:
                    yield i, why


def _dynamic_of(case: Mapping[str, Any], fixture: Any) -> Any:
    """The ``data.dynamic`` a case is decided on: its own, else the fixture's."""
    return case.get("dynamic", fixture if isinstance(fixture, dict) else {})


def _first_difference(variants: list[tuple[str, EmbeddedEngine]], inp: Any, raw: Any) -> str | None:
    """Why the decision on ``inp`` under the first variant that changes it is not ``raw``."""
    for what, engine in variants:
        try:
            got = engine.evaluate_raw(inp)
        except (rego_native.RegoFailure, ValueError) as exc:
            return f"engine error: {exc}"
        if _normal(got) != _normal(raw):
            return (
                f"the decision differs with the entries of data.dynamic its reads do not "
                f"name {what}: a rule reads an entry not in its reads"
            )
    return None


def _essence(raw: Any) -> Any:
    if not isinstance(raw, dict):
        return raw
    return {k: raw.get(k) for k in ("allow", "reasons", "obligations", "details")}


class Undeclared:
    """An engine whose decisions do not declare ``instants`` and, with ``reads=True``, not
    ``reads`` either: a policy written before them (an older bundle, another OPA policy).
    The decision cache reuses such a decision only at the very times and quality it was
    taken at, as before session 21, and, without ``reads``, keeps it across no change of
    data, as before session 22."""

    def __init__(self, engine: EmbeddedEngine, *, instants: bool = True, reads: bool = False):
        self.engine = engine
        self.name, self.bundle_digest = engine.name, engine.bundle_digest
        self.strip_instants, self.strip_reads = instants, reads

    def decide(self, inp: Mapping[str, Any]) -> Decision:
        d = self.engine.decide(inp)
        return dataclasses.replace(
            d,
            instants={} if self.strip_instants else d.instants,
            reads=None if self.strip_reads else d.reads,
        )

    def set_dynamic_data(self, doc: Mapping[str, Any]) -> None:
        self.engine.set_dynamic_data(doc)


def read_number(inp: Any, name: str) -> Number | None:
    """The input's number at ``name`` (a path of INSTANT_FIELDS) as the policy compares it:
    a time as ns since the epoch; ``None`` when absent or not a number."""
    section, field = name.split(".", 1)
    part = inp.get(section) if isinstance(inp, dict) else None
    value = part.get(field) if isinstance(part, dict) else None
    if INSTANT_FIELDS.get(name):
        return rfc3339_ns(value)
    return value if is_number(value) else None


def shown(name: str, value: Number) -> Any:
    """``value`` as the input holds the number at ``name``: a time as RFC 3339."""
    return format_ns(int(value)) if INSTANT_FIELDS.get(name) else value


def with_number(inp: dict[str, Any], name: str, value: Number) -> dict[str, Any]:
    """``inp`` with its number at ``name`` set to ``value``."""
    section, field = name.split(".", 1)
    return {**inp, section: {**inp[section], field: shown(name, value)}}


#: The finest step of a non-time number the embedded engine tells apart: rego-cpp 1.5.2 reads
#: input floats to 6 decimals (tests/policy/test_engine_quirks.py).
FLOAT_STEP = 1e-6


def neighbours(x: Number, integer: bool) -> tuple[Number, Number]:
    """The values next to ``x``: one nanosecond, or one engine step, either side."""
    if integer:
        return (int(x) - 1, int(x) + 1)
    return (round(x - FLOAT_STEP, 6), round(x + FLOAT_STEP, 6))


def instants_differ(engine: EmbeddedEngine, inp: Any, raw: Any) -> str | None:
    """Why the decision ``raw`` on ``inp`` does not hold somewhere its ``instants`` say it
    does, or ``None`` when it holds at every value checked (or declares nothing).

    Checked for each declared number: the values just inside its span, and every instant
    declared for a number of its kind (times, or the quality) with its neighbours, where
    they lie in the span. What no instant of the decision points to is left to tests/policy
    (data-driven, at every number of the case's data).
    """
    instants = raw.get("instants") if isinstance(raw, dict) else None
    if not isinstance(instants, dict) or not isinstance(inp, dict):
        return None
    base = _essence(raw)
    for name, declared in sorted(instants.items()):
        integer = INSTANT_FIELDS.get(name)
        value = read_number(inp, name)
        if integer is None or value is None or not isinstance(declared, list):
            continue
        where = span(sorted(declared), value)
        if where is None:
            continue
        # The span's edges are instants of this number, so their neighbours inside are
        # among these; and a number whose rule is missing from `instants` is usually
        # compared with what another number of its kind is compared with.
        kin = [x for n, xs in instants.items() if INSTANT_FIELDS.get(n) is integer for x in xs]
        near = {y for x in kin for y in (x, *neighbours(x, integer))}
        for x in sorted(near):
            if x == value or not holds(where, value, x):
                continue
            if _essence(engine.evaluate_raw(with_number(inp, name, x))) != base:
                return (
                    f"the decision at {name}={shown(name, x)} differs from the one the case "
                    f"has: a rule compares {name} with a value that is not in its instants"
                )
    return None
