"""One Reniec import batch: per-record validation and the running tally of an import stream.

Invariants (DESIGN.md §3–4; LEGAL_RULES R13, R15):

* A record is stored only when its DNI is 8 digits, its model id is the registry gallery's
  model, and its vector has the gallery's dimension, finite values and unit L2 norm — the same
  checks a probe passes (:mod:`centinela.server.validation`).
* A refused record is reported by batch number, position, field and reason only: a reject
  never carries the record's content (DNI or vector), and neither does any log line.
* The tally counts every record once: ``received = accepted + unchanged + rejected``. At most
  :data:`MAX_REJECTS` rejects are kept (the rest are counted, not listed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from centinela.errors import InvalidArgument, ModelMismatch
from centinela.matcher.store import TemplateRecord
from centinela.server.validation import check_dni, check_vector
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
    """The valid records of one message, ready for the store, and the rejects."""

    batch_number: int
    received: int
    records: list[TemplateRecord]
    rejects: list[Reject]


def check_batch(
    message: pb.ImportTemplatesRequest, *, model_id: str, dimension: int
) -> CheckedBatch:
    """Validate every record of one import message.

    A message of more than :data:`MAX_BATCH` records is refused whole (each record rejected
    with field ``records``), so a client that ignores the limit learns it at once.
    """
    number = int(message.batch_number)
    records: Sequence[Any] = message.records
    if len(records) > MAX_BATCH:
        reason = f"a message may carry at most {MAX_BATCH} records; split the batch"
        return CheckedBatch(
            number,
            len(records),
            [],
            [Reject(number, i, "records", reason) for i in range(len(records))],
        )
    good: list[TemplateRecord] = []
    rejects: list[Reject] = []
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
            vec = check_vector(rec.vector, dimension=dimension, field="vector")
        except (InvalidArgument, ModelMismatch) as exc:
            rejects.append(Reject(number, position, exc.field or "record", exc.message))
            continue
        good.append(TemplateRecord(vector=vec, dni=dni))
    return CheckedBatch(number, len(records), good, rejects)


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
