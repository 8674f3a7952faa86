"""Every Rego test of every packaged bundle, run through the embedded engine, one pytest
test per Rego test (named ``<bundle>::<test rule>``)."""

from __future__ import annotations

import functools
import re

import pytest

from centinela.policy import Bundle, TestResult

BUNDLES = ("interim", "draft-2026")


@functools.cache
def _results(bundle: str) -> dict[str, TestResult]:
    return {r.name: r for r in Bundle.load(bundle).run_tests()}


def _discovered() -> list[tuple[str, str]]:
    return [(b, t) for b in BUNDLES for _pkg, t in Bundle.load(b).test_names()]


@pytest.mark.parametrize(
    ("bundle", "test"), _discovered(), ids=[f"{b}::{t}" for b, t in _discovered()]
)
def test_rego(bundle: str, test: str) -> None:
    result = _results(bundle)[test]
    assert result.passed, result.message


@pytest.mark.parametrize("bundle", BUNDLES)
def test_no_orphan_cases(bundle: str) -> None:
    """A case without a test rule (or the reverse) is a failure, not a silent skip."""
    names = {t for _p, t in Bundle.load(bundle).test_names()}
    orphans = [r.name for r in _results(bundle).values() if r.name not in names]
    assert orphans == []


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_rule_has_allow_and_deny_tests(bundle: str) -> None:
    b = Bundle.load(bundle)
    names = [t for _p, t in b.test_names()]
    missing = []
    for rule in b.rules():
        n = rule[1:]
        for side in ("allow", "deny"):
            if not any(re.match(rf"test_r{n}_{side}_", t) for t in names):
                missing.append(f"{rule} {side}")
    assert missing == []
    assert len(b.rules()) >= 15


def test_draft_adds_r7_and_interim_does_not_claim_it() -> None:
    assert "R7" in Bundle.load("draft-2026").rules()
    assert "R7" not in Bundle.load("interim").rules()
