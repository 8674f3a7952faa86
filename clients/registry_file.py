"""Reading a Reniec template file (CSV or JSON Lines) into import batches.

Formats (one template per row; the DNI is the citizen's, 8 digits):

* **CSV** with a header row naming the columns ``dni``, ``model_id`` and ``vector`` (in any
  order; other columns are ignored). ``vector`` is either a JSON list (``"[0.0123, -0.0456,
  …]"``, quoted as CSV requires) or floats separated by spaces. An empty ``model_id`` takes the
  value of ``--model-id``.
* **JSON Lines**: one object per line, ``{"dni": "…", "model_id": "…", "vector": [...]}``;
  ``vector`` may also be a string of space-separated floats. Blank lines are skipped.

Batches are cut by data row: batch *n* holds rows ``n·size … (n+1)·size − 1`` whatever their
content, so the same file always gives the same batches and an import can be resumed from any
batch number. A row that cannot be parsed stays in its batch as a local reject (line number,
field and reason — never its content) and is not sent.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from centinela.errors import InvalidArgument
from centinela.v1 import registry_service_pb2 as rpb

#: Records per stream message (the server refuses more).
BATCH_SIZE = 1000
FORMATS = ("csv", "jsonl")


@dataclasses.dataclass(frozen=True)
class LocalReject:
    """A row the client could not parse: where and why, never what it held."""

    line: int
    field: str
    reason: str


@dataclasses.dataclass
class FileBatch:
    """One import message and, for each record in it, the file line it came from."""

    number: int
    message: rpb.ImportTemplatesRequest
    lines: list[int]
    local_rejects: list[LocalReject]

    @property
    def rows(self) -> int:
        return len(self.lines) + len(self.local_rejects)


def detect_format(path: Path, given: str | None) -> str:
    """``csv`` or ``jsonl`` from ``--format`` or the file name.

    Raises:
        InvalidArgument: the format cannot be told from the name and was not given.
    """
    if given:
        if given not in FORMATS:
            raise InvalidArgument(f"must be one of {', '.join(FORMATS)}", field="--format")
        return given
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise InvalidArgument(
        "cannot tell the file format from its name; give --format csv or --format jsonl",
        field="--format",
    )


def parse_vector(value: Any) -> list[float]:
    """A vector from a JSON list, or a string holding a JSON list or space-separated floats.

    Raises:
        InvalidArgument: not a list of finite numbers (the message never repeats the value).
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                raise InvalidArgument("is not a JSON list of numbers", field="vector") from None
        else:
            try:
                value = [float(x) for x in text.split()]
            except ValueError:
                raise InvalidArgument(
                    "is not a list of space-separated numbers", field="vector"
                ) from None
    if not isinstance(value, list) or not value:
        raise InvalidArgument("must be a non-empty list of numbers", field="vector")
    try:
        out = [float(x) for x in value]
    except (TypeError, ValueError):
        raise InvalidArgument("must hold numbers only", field="vector") from None
    if not all(math.isfinite(x) for x in out):
        raise InvalidArgument("contains NaN or infinite values", field="vector")
    return out


def _record(fields: dict[str, Any], default_model: str) -> rpb.RegistryRecord:
    dni = fields.get("dni")
    if not isinstance(dni, str | int) or str(dni).strip() == "":
        raise InvalidArgument("is missing", field="dni")
    model = fields.get("model_id") or default_model
    if not isinstance(model, str) or not model:
        raise InvalidArgument("is missing; add the column or give --model-id", field="model_id")
    if "vector" not in fields or fields["vector"] in (None, ""):
        raise InvalidArgument("is missing", field="vector")
    vector = parse_vector(fields["vector"])
    return rpb.RegistryRecord(dni=str(dni).strip(), model_id=model, vector=vector)


def _csv_rows(handle: io.TextIOBase) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    reader = csv.DictReader(handle)
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    missing = {"dni", "vector"} - set(header)
    if missing:
        raise InvalidArgument(
            f"the CSV header must name the columns dni, model_id and vector "
            f"(missing: {', '.join(sorted(missing))})",
            field="FILE",
        )
    reader.fieldnames = header
    for row in reader:
        line = reader.line_num
        if None in row:  # more cells than header names
            yield line, None, "row has more cells than the header"
            continue
        yield line, dict(row), ""


def _jsonl_rows(handle: io.TextIOBase) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    for line, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            doc = json.loads(text)
        except ValueError:
            yield line, None, "is not valid JSON"
            continue
        if not isinstance(doc, dict):
            yield line, None, "is not a JSON object"
            continue
        yield line, doc, ""


def count_rows(path: Path, fmt: str) -> int | None:
    """Data rows in the file, for the ETA (blank lines count); None if it is not a file."""
    if not path.is_file():
        return None
    lines, last = 0, b"\n"
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    if last != b"\n":
        lines += 1
    return max(0, lines - 1) if fmt == "csv" else lines


def read_batches(
    path: Path,
    fmt: str,
    *,
    default_model: str = "",
    size: int = BATCH_SIZE,
    start_batch: int = 0,
    context: Any = None,
) -> Iterator[FileBatch]:
    """The file's batches from ``start_batch`` on, each an import message with its lines.

    ``context`` (a RequestContext) is put on every message (the server reads the first).

    Raises:
        InvalidArgument: the file cannot be opened, or its CSV header lacks a column.
    """
    if not 1 <= size <= BATCH_SIZE:
        raise InvalidArgument(f"must lie in 1..{BATCH_SIZE}", field="--batch-size")
    try:
        handle = path.open(newline="" if fmt == "csv" else None, encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot be read ({exc.strerror})", field=str(path)) from None
    with handle:
        rows = _csv_rows(handle) if fmt == "csv" else _jsonl_rows(handle)
        current: FileBatch | None = None
        for index, (line, fields, problem) in enumerate(rows):
            number = index // size
            if number < start_batch:
                continue
            if current is None or current.number != number:
                if current is not None:
                    yield current
                message = rpb.ImportTemplatesRequest(batch_number=number)
                if context is not None:
                    message.context.CopyFrom(context)
                current = FileBatch(number, message, [], [])
            if fields is None:
                current.local_rejects.append(LocalReject(line, "record", problem))
                continue
            try:
                record = _record(fields, default_model)
            except InvalidArgument as exc:
                current.local_rejects.append(LocalReject(line, exc.field or "record", exc.message))
                continue
            current.message.records.append(record)
            current.lines.append(line)
        if current is not None:
            yield current
