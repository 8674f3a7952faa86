"""Reading Reniec template files: formats, stable batches, local rejects without content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from centinela.clients.registry_file import (
    count_rows,
    detect_format,
    parse_vector,
    read_batches,
)
from centinela.errors import InvalidArgument
from centinela.v1 import common_pb2

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@given(st.lists(finite, min_size=1, max_size=64))
def test_vector_forms_agree(values: list[float]) -> None:
    """A JSON list, its string, and space-separated text give the same vector."""
    as_json = parse_vector(json.dumps(values))
    as_text = parse_vector(" ".join(repr(v) for v in values))
    assert parse_vector(values) == as_json == as_text == [float(v) for v in values]


@pytest.mark.parametrize(
    "bad", ["", "[]", "[1, 2, x]", "1 2 x", "[NaN]", "1 inf", [1, None], {"a": 1}]
)
def test_bad_vectors_are_refused_without_echo(bad: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_vector(bad)
    assert info.value.field == "vector"
    assert "x" not in info.value.message.replace("exactly", "")


def test_format_from_name_or_option(tmp_path: Path) -> None:
    assert detect_format(tmp_path / "a.CSV", None) == "csv"
    assert detect_format(tmp_path / "a.ndjson", None) == "jsonl"
    assert detect_format(tmp_path / "a.txt", "jsonl") == "jsonl"
    with pytest.raises(InvalidArgument):
        detect_format(tmp_path / "a.txt", None)


def _csv(path: Path, rows: int) -> Path:
    lines = ["vector,dni,extra,model_id"]  # any column order; extra columns ignored
    for i in range(rows):
        lines.append(f'"[{i}.0, 1.0]",{10_000_000 + i},x,m1')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batches_are_cut_by_row_and_resume_is_stable(tmp_path: Path) -> None:
    path = _csv(tmp_path / "r.csv", 25)
    all_batches = list(read_batches(path, "csv", size=10))
    assert [b.number for b in all_batches] == [0, 1, 2]
    assert [len(b.message.records) for b in all_batches] == [10, 10, 5]
    assert all_batches[1].lines[0] == 12  # header is line 1
    resumed = list(read_batches(path, "csv", size=10, start_batch=1))
    assert [b.message for b in resumed] == [b.message for b in all_batches[1:]]
    assert count_rows(path, "csv") == 25


def test_unparseable_rows_keep_their_place(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    rows = [
        json.dumps({"dni": "10000000", "model_id": "m1", "vector": [1.0, 0.0]}),
        "{not json",
        json.dumps({"dni": "10000002", "vector": "0.0 1.0"}),
        json.dumps(["a", "list"]),
        json.dumps({"dni": "10000004", "model_id": "m1"}),
    ]
    path.write_text("\n".join(rows) + "\n")
    ctx = common_pb2.RequestContext(reference="RES-1")
    (batch,) = read_batches(path, "jsonl", default_model="m2", size=10, context=ctx)
    assert [r.dni for r in batch.message.records] == ["10000000", "10000002"]
    assert [r.model_id for r in batch.message.records] == ["m1", "m2"]
    assert batch.lines == [1, 3]
    assert [(r.line, r.field) for r in batch.local_rejects] == [
        (2, "record"),
        (4, "record"),
        (5, "vector"),
    ]
    assert batch.rows == 5
    assert batch.message.context.reference == "RES-1"
    text = " ".join(r.reason for r in batch.local_rejects)
    assert "1000000" not in text


def test_csv_without_the_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("id,embedding\n1,2\n")
    with pytest.raises(InvalidArgument) as info:
        list(read_batches(path, "csv"))
    assert "dni" in info.value.message


def test_batch_size_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        list(read_batches(_csv(tmp_path / "r.csv", 1), "csv", size=1001))
