"""The bulk write path the registry import uses: planned writes, batch crypto, batch checks.

Real SQLite and PostgreSQL, real keys; no server.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from centinela.matcher.datakeys import content_macs, dni_macs, keyed_digest
from centinela.matcher.envelope import Binding, encode_bindings
from centinela.matcher.keys import FileKeyProvider
from centinela.matcher.schema import new_refs
from centinela.matcher.store import TemplateColumns, TemplateStore
from centinela.matcher.synth import identities
from centinela.server.registry_import import check_batch
from centinela.storage import make_engine, write_transaction
from centinela.v1 import registry_service_pb2 as pb

G, M = "reniec_registry", "m:1"


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> TemplateStore:
    return TemplateStore(make_engine(db_url), FileKeyProvider(tmp_path / "keys"))


def test_batch_crypto_equals_the_per_record_forms(store: TemplateStore) -> None:
    """Bulk AAD and digests are byte-for-byte the per-record ones (old rows stay readable
    and re-imports stay idempotent)."""
    ids, refs = new_refs("tpl", 3), new_refs("sub", 3)
    assert encode_bindings("template", ids, refs, G, M, "dek-1") == [
        Binding("template", i, r, G, M, "dek-1").encode() for i, r in zip(ids, refs, strict=True)
    ]
    vecs = [v.tobytes() for v in identities(3, 8, seed=1)]
    assert content_macs(store.keyring, "reniec", G, M, vecs) == [
        keyed_digest(store.keyring, "reniec", b"template", G.encode(), M.encode(), v) for v in vecs
    ]
    assert dni_macs(store.keyring, "reniec", ["10000001"]) == [
        keyed_digest(store.keyring, "reniec", b"dni", b"10000001")
    ]


def test_new_refs_are_unique_and_grow_with_time() -> None:
    first = new_refs("sub", 1000)
    time.sleep(0.002)
    later = new_refs("sub", 10)
    assert len(set(first + later)) == 1010
    assert all(len(r) == len("sub_") + 32 for r in first)
    assert max(r[:16] for r in first) < min(r[:16] for r in later)


def test_a_planned_write_is_nothing_until_its_transaction_commits(store: TemplateStore) -> None:
    vecs = identities(4, 16, seed=2)
    dnis = ["10000001", "10000002", "10000001", "10000003"]  # one DNI twice in the batch
    planned = store.plan_templates(
        "reniec", G, M, TemplateColumns.for_dnis(vecs, dnis), replace_existing=True
    )
    assert planned.changed
    assert planned.result.subject_refs[0] == planned.result.subject_refs[2]
    seq = store.max_seq()

    def entry_fails() -> None:
        with write_transaction(store.engine) as conn:
            planned(conn)
            raise RuntimeError("the audit entry failed")

    with pytest.raises(RuntimeError):
        entry_fails()
    assert store.max_seq() == seq
    assert store.find_subject("reniec", "10000001") is None
    with write_transaction(store.engine) as conn:
        planned(conn)
    # Four templates written; the first of the DNI sent twice then replaced by the second
    # (registry semantics: one template per DNI, the batch's last one), as if sent one by one.
    assert store.max_seq() == seq + 5
    assert planned.result.replaced == 1
    subject = store.find_subject("reniec", "10000001")
    assert subject == planned.result.subject_refs[0]
    assert store.templates_of(subject) == [planned.result.template_ids[2]]
    again = store.plan_templates("reniec", G, M, TemplateColumns.for_dnis(vecs[1:2], dnis[1:2]))
    assert not again.changed
    assert (again.result.inserted, again.result.unchanged) == (0, 1)


def test_batch_checks_keep_each_dni_with_its_vector() -> None:
    """Rejects in the middle of a batch never shift a vector onto another DNI."""
    vecs = identities(6, 16, seed=3)
    bad = vecs[2] * 3.0  # not unit norm
    nan = vecs[4].copy()
    nan[0] = np.nan
    rows = [vecs[0], vecs[1], bad, vecs[3], nan, vecs[5]]
    msg = pb.ImportTemplatesRequest(
        batch_number=7,
        records=[
            pb.RegistryRecord(dni=f"2000000{i}", model_id=M, vector=v.tolist())
            for i, v in enumerate(rows)
        ],
    )
    checked = check_batch(msg, model_id=M, dimension=16)
    assert checked.dnis == ["20000000", "20000001", "20000003", "20000005"]
    assert np.array_equal(checked.vectors, np.stack([vecs[0], vecs[1], vecs[3], vecs[5]]))
    assert [(r.batch_number, r.position, r.field) for r in checked.rejects] == [
        (7, 2, "vector"),
        (7, 4, "vector"),
    ]
    assert "L2-normalised" in checked.rejects[0].reason
    assert "NaN" in checked.rejects[1].reason
    assert checked.content() == b"20000000200000012000000320000005" + checked.vectors.tobytes()


def test_change_log_read_matches_the_rows(store: TemplateStore) -> None:
    vecs = identities(3, 16, seed=4)
    store.add_templates(
        "reniec", G, M, TemplateColumns.for_dnis(vecs, ["30000001", "30000002", "30000003"])
    )
    changes = store.changes_since(0, gallery=G)
    with store.engine.connect() as conn:
        seqs = [
            r[0] for r in conn.execute(sa.text("SELECT seq FROM matcher_templates ORDER BY seq"))
        ]
    assert [c.seq for c in changes] == seqs
    opened = store.open_templates(changes)
    assert all(v is not None for v in opened)
    assert np.allclose(np.stack(opened), vecs)  # type: ignore[arg-type]
