"""One Reniec import batch: per-record validation and the running tally of an import stream.

Invariants (DESIGN.md §3–4; LEGAL_RULES R13, R15):

* A record is stored only when its DNI is 8 digits, its model id is the registry gallery's
  model, and its vector has the gallery's dimension, finite values and unit L2 norm — the same
  checks a probe passes (:mod:`centinela.server.validation`), made on the batch as a whole.
* A refused record is reported by batch number, position, field and reason only: a reject
  never carries the record's content (DNI or vector), and neither does any log line.
* The tally counts every record once: ``received = accepted + unchanged + rejected``. At most
  :data:`MAX_REJECTS` rejects are kept (the rest are counted, not listed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from centinela.errors import InvalidArgument, ModelMismatch
from centinela.matcher.store import TemplateColumns, TemplateRecord
from centinela.server.validation import MAX_DIMENSION, NORM_TOLERANCE, check_dni
from centinela.v1 import registry_service_pb2 as pb

#: Records one stream message may carry (the contract's limit).
MAX_BATCH = 1000
#: Rejects listed in an answer; further ones are only counted.
MAX_REJECTS = 1000


@dataclasses.dataclass(frozen=True)
class Reject:
    """Why one record was refused (never what it held)."""

    batch_number: int
    position: int
    field: str
    reason: str

    def to_proto(self) -> pb.ImportReject:
        return pb.ImportReject(
            batch_number=self.batch_number,
            position=self.position,
            field=self.field,
            reason=self.reason,
        )


@dataclasses.dataclass
class CheckedBatch:
    """The valid records of one message, column by column, ready for the store, and the
    rejects (in position order)."""

    batch_number: int
    received: int
    dnis: list[str]
    vectors: npt.NDArray[np.float32]
    rejects: list[Reject]

    def __len__(self) -> int:
        return len(self.dnis)

    @property
    def records(self) -> list[TemplateRecord]:
        """The valid records one by one (for tests and small callers)."""
        return [
            TemplateRecord(vector=v, dni=d) for d, v in zip(self.dnis, self.vectors, strict=True)
        ]

    def columns(self) -> TemplateColumns:
        """The valid records as the store's bulk input."""
        return TemplateColumns.for_dnis(self.vectors, self.dnis)

    def content(self) -> bytes:
        """What the batch's audit digest covers: the valid records' DNIs (8 ASCII digits
        each) in order, then their vectors (little-endian float32) in the same order."""
        return "".join(self.dnis).encode() + np.ascontiguousarray(self.vectors, "<f4").tobytes()


def check_batch(
    message: pb.ImportTemplatesRequest, *, model_id: str, dimension: int
) -> CheckedBatch:
    """Validate every record of one import message.

    The checks are those of :func:`centinela.server.validation.check_vector` (same messages),
    with the finite and norm checks done on the whole batch at once. A message of more than
    :data:`MAX_BATCH` records is refused whole (each record rejected with field
    ``records``), so a client that ignores the limit learns it at once.
    """
    number = int(message.batch_number)
    records: Sequence[Any] = message.records
    empty = np.empty((0, max(dimension, 0)), np.float32)
    if len(records) > MAX_BATCH:
        reason = f"a message may carry at most {MAX_BATCH} records; split the batch"
        return CheckedBatch(
            number,
            len(records),
            [],
            empty,
            [Reject(number, i, "records", reason) for i in range(len(records))],
        )
    rejects: list[Reject] = []
    positions: list[int] = []
    dnis: list[str] = []
    rows: list[npt.NDArray[np.float32]] = []
    for position, rec in enumerate(records):
        try:
            dni = check_dni(rec.dni, "dni")
            if not rec.model_id:
                raise InvalidArgument("is required", field="model_id")
            if rec.model_id != model_id:
                raise ModelMismatch(
                    f"is not the registry gallery's model {model_id} (R13); "
                    "re-encode with that model",
                    field="model_id",
                )
            size = len(rec.vector)
            if size == 0:
                raise InvalidArgument("is empty", field="vector")
            if size > MAX_DIMENSION or size != dimension:
                raise InvalidArgument(
                    f"has {size} values; the gallery's model has {dimension}", field="vector"
                )
        except (InvalidArgument, ModelMismatch) as exc:
            rejects.append(Reject(number, position, exc.field or "record", exc.message))
            continue
        positions.append(position)
        dnis.append(dni)
        rows.append(np.asarray(rec.vector, dtype=np.float32))
    if not rows:
        return CheckedBatch(number, len(records), [], empty, rejects)
    vectors = np.stack(rows)
    finite: npt.NDArray[np.bool_] = np.asarray(np.isfinite(vectors).all(axis=1))
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(np.where(finite[:, None], vectors, 0.0), axis=1)
    unit = finite & (np.abs(norms - 1.0) <= NORM_TOLERANCE)
    if not unit.all():
        for i in np.flatnonzero(~unit).tolist():
            reason = (
                "contains NaN or infinite values"
                if not finite[i]
                else f"must be L2-normalised (norm within {NORM_TOLERANCE} of 1)"
            )
            rejects.append(Reject(number, positions[i], "vector", reason))
        rejects.sort(key=lambda r: r.position)
        vectors = vectors[unit]
        dnis = [d for d, ok in zip(dnis, unit.tolist(), strict=True) if ok]
    return CheckedBatch(number, len(records), dnis, vectors, rejects)


@dataclasses.dataclass
class ImportTally:
    """Counts of one import stream, and the first rejects."""

    batches: int = 0
    received: int = 0
    accepted: int = 0
    unchanged: int = 0
    replaced: int = 0
    rejected: int = 0
    rejects: list[Reject] = dataclasses.field(default_factory=list)

    def add_rejects(self, rejects: Sequence[Reject]) -> None:
        self.rejected += len(rejects)
        room = MAX_REJECTS - len(self.rejects)
        if room > 0:
            self.rejects.extend(rejects[:room])

    def metrics(self) -> dict[str, int]:
        """The counts as audit metrics (names the audit schema may or may not know)."""
        return {
            "entries": self.accepted,
            "received": self.received,
            "accepted": self.accepted,
            "unchanged": self.unchanged,
            "replaced": self.replaced,
            "rejected": self.rejected,
            "batches": self.batches,
        }

    def to_proto(self) -> pb.ImportTemplatesResponse:
        return pb.ImportTemplatesResponse(
            received=self.received,
            accepted=self.accepted,
            unchanged=self.unchanged,
            rejected=self.rejected,
            rejects=[r.to_proto() for r in self.rejects],
        )
