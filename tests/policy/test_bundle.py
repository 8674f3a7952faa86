"""Bundles: loading, the digest's definition, and the data.json invariants."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from centinela.errors import ConfigError
from centinela.policy import Bundle, bundle_names
from centinela.policy.bundle import deep_merge, digest_files


def test_packaged_bundles() -> None:
    assert bundle_names() == ["draft-2026", "interim"]
    b = Bundle.load("interim")
    assert b.name == "interim"
    assert "decision.rego" in b.policy_modules
    assert all(n.endswith("_test.rego") for n in b.test_modules)
    assert not any(n.endswith("_test.rego") for n in b.policy_modules)


def test_digest_is_documented_framing() -> None:
    files = {"b.rego": "package b\n", "a.json": "{}"}
    h = hashlib.sha256()
    for name in ("a.json", "b.rego"):
        body = files[name].encode()
        h.update(name.encode() + b"\0" + len(body).to_bytes(8, "big") + body)
    assert digest_files(files) == h.hexdigest()


def test_digest_changes_with_any_edit_rename_or_addition(bundle_copy: Path) -> None:
    d0 = Bundle.load(bundle_copy).digest
    (bundle_copy / "data.json").write_text((bundle_copy / "data.json").read_text() + " ")
    d1 = Bundle.load(bundle_copy).digest
    (bundle_copy / "extra.rego").write_text("package centinela\n")
    d2 = Bundle.load(bundle_copy).digest
    (bundle_copy / "extra.rego").rename(bundle_copy / "extra2.rego")
    d3 = Bundle.load(bundle_copy).digest
    assert len({d0, d1, d2, d3}) == 4
    (bundle_copy / "notes.txt").write_text("not part of the bundle")
    assert Bundle.load(bundle_copy).digest == d3


@given(st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=20), max_size=5))
def test_digest_ignores_dict_order(files: dict[str, str]) -> None:
    assert digest_files(files) == digest_files(dict(reversed(list(files.items()))))


@pytest.mark.parametrize("content", ["[]", "{", '{"other": {}}', '{"centinela_config": 3}'])
def test_bad_data_json_is_refused(bundle_copy: Path, content: str) -> None:
    (bundle_copy / "data.json").write_text(content)
    with pytest.raises(ConfigError):
        Bundle.load(bundle_copy)


def test_unknown_bundle_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="interim"):
        Bundle.load("interim-2099")


@pytest.mark.parametrize("name", ["interim", "draft-2026"])
def test_data_never_lowers_a_floor(name: str) -> None:
    """R8 invariants of the shipped data: alert thresholds >= calibrated floors, caps <= 50."""
    cfg = Bundle.load(name).config
    for spec in cfg["galleries"].values():
        assert 0 < spec["threshold_floor"] <= spec["alert_threshold"] <= 1
    assert all(1 <= v <= 50 for v in cfg["max_results"].values())
    assert cfg["probe_retention"]["non_hit_days"] == 0  # R11
    assert set(cfg["sighting_retention_days"]) == set(cfg["galleries"])


def test_deep_merge_is_object_union() -> None:
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 3}, "d": {"x": 1}}) == {
        "a": {"b": 3, "c": 2},
        "d": {"x": 1},
    }
