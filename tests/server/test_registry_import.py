"""Per-record validation of Reniec import batches (no server: the pure checks)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from centinela.matcher.synth import identities
from centinela.server.registry_import import MAX_REJECTS, ImportTally, Reject, check_batch
from centinela.v1 import registry_service_pb2 as pb

MODEL = "m:1"


def _msg(records: list[pb.RegistryRecord], number: int = 4) -> pb.ImportTemplatesRequest:
    return pb.ImportTemplatesRequest(batch_number=number, records=records)


def test_valid_records_pass_with_their_dni() -> None:
    vecs = identities(3, 16, seed=1)
    recs = [
        pb.RegistryRecord(dni=f"1000000{i}", model_id=MODEL, vector=v.tolist())
        for i, v in enumerate(vecs)
    ]
    checked = check_batch(_msg(recs), model_id=MODEL, dimension=16)
    assert (checked.batch_number, checked.received, checked.rejects) == (4, 3, [])
    assert [r.dni for r in checked.records] == ["10000000", "10000001", "10000002"]
    assert np.allclose(checked.records[1].vector, vecs[1])


def test_each_fault_is_named() -> None:
    v = identities(1, 16, seed=2)[0]
    recs = [
        pb.RegistryRecord(dni="", model_id=MODEL, vector=v.tolist()),
        pb.RegistryRecord(dni="1234567a", model_id=MODEL, vector=v.tolist()),
        pb.RegistryRecord(dni="10000002", model_id="", vector=v.tolist()),
        pb.RegistryRecord(dni="10000003", model_id="other", vector=v.tolist()),
        pb.RegistryRecord(dni="10000004", model_id=MODEL, vector=[]),
        pb.RegistryRecord(dni="10000005", model_id=MODEL, vector=(v * 0.5).tolist()),
        pb.RegistryRecord(dni="10000006", model_id=MODEL, vector=[float("inf")] * 16),
    ]
    checked = check_batch(_msg(recs), model_id=MODEL, dimension=16)
    assert checked.records == []
    assert [(r.position, r.field) for r in checked.rejects] == [
        (0, "dni"),
        (1, "dni"),
        (2, "model_id"),
        (3, "model_id"),
        (4, "vector"),
        (5, "vector"),
        (6, "vector"),
    ]
    for r in checked.rejects:
        assert "1000000" not in r.reason


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["ok", "bad_dni", "bad_model", "bad_vec"]), max_size=40))
def test_tally_counts_every_record_once(kinds: list[str]) -> None:
    v = identities(1, 8, seed=3)[0].tolist()
    recs = []
    for i, kind in enumerate(kinds):
        dni = f"{20_000_000 + i}" if kind != "bad_dni" else "x"
        model = MODEL if kind != "bad_model" else "other"
        vec = v if kind != "bad_vec" else v[:4]
        recs.append(pb.RegistryRecord(dni=dni, model_id=model, vector=vec))
    checked = check_batch(_msg(recs), model_id=MODEL, dimension=8)
    assert len(checked.records) + len(checked.rejects) == checked.received == len(kinds)
    assert len(checked.records) == kinds.count("ok")


def test_rejects_listed_up_to_the_cap_all_counted() -> None:
    tally = ImportTally()
    tally.add_rejects([Reject(0, i, "dni", "bad") for i in range(MAX_REJECTS - 1)])
    tally.add_rejects([Reject(1, i, "dni", "bad") for i in range(5)])
    assert tally.rejected == MAX_REJECTS + 4
    assert len(tally.rejects) == MAX_REJECTS
    assert tally.to_proto().rejected == MAX_REJECTS + 4
