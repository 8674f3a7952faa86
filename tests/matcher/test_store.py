"""The encrypted template store on SQLite and PostgreSQL: idempotent bulk writes, change log,
nothing in clear, tampering detected, key rotation and crypto-shredding."""

from __future__ import annotations

import datetime as dt
import threading

import numpy as np
import pytest
import sqlalchemy as sa

from centinela.errors import DecryptionError, InvalidArgument, KeyNotFound, NotFound
from centinela.matcher import synth
from centinela.matcher.keys import FileKeyProvider
from centinela.matcher.schema import data_keys, plates, subjects, templates
from centinela.matcher.store import TemplateRecord, TemplateStore
from centinela.storage import make_engine

G, M = "reniec_registry", "model-a"


def _dni(i: int) -> str:
    return f"{40000000 + i:08d}"


@pytest.fixture(scope="module")
def vecs() -> np.ndarray:
    return synth.identities(600, seed=21)


def _import(store: TemplateStore, vecs: np.ndarray, n: int, start: int = 0) -> list[str]:
    res = store.add_templates(
        "reniec", G, M, [TemplateRecord(vecs[i], dni=_dni(i)) for i in range(start, start + n)]
    )
    return res.template_ids


def _all_bytes(store: TemplateStore) -> bytes:
    out = bytearray()
    with store.engine.connect() as conn:
        for table in (subjects, templates, plates, data_keys):
            for row in conn.execute(sa.select(table)):
                for v in row:
                    if isinstance(v, bytes | memoryview):
                        out += bytes(v)
                    elif v is not None:
                        out += str(v).encode()
    return bytes(out)


def test_bulk_import_round_trip_and_order(store: TemplateStore, vecs: np.ndarray) -> None:
    ids = _import(store, vecs, 500)
    changes = store.changes_since(0, limit=10_000)
    assert [c.template_id for c in changes] == ids
    assert [c.seq for c in changes] == list(range(1, 501))
    assert store.max_seq() == 500
    for c in changes[:20]:
        i = ids.index(c.template_id)
        assert np.array_equal(store.open_template(c), vecs[i])
    assert store.count_changes_since(250, gallery=G) == 250
    assert store.changes_since(0, gallery="pnp_watchlist") == []


def test_reimport_changes_nothing(store: TemplateStore, vecs: np.ndarray) -> None:
    """Re-sending the same DNI and template is idempotent: same ids, no new sequence."""
    first = store.add_templates(
        "reniec", G, M, [TemplateRecord(vecs[i], dni=_dni(i)) for i in range(50)]
    )
    mark = store.max_seq()
    again = store.add_templates(
        "reniec", G, M, [TemplateRecord(vecs[i], dni=_dni(i)) for i in range(50)]
    )
    assert again.inserted == 0
    assert again.unchanged == 50
    assert again.template_ids == first.template_ids
    assert again.subject_refs == first.subject_refs
    assert store.max_seq() == mark
    dup = store.add_templates("reniec", G, M, [TemplateRecord(vecs[60], dni=_dni(60))] * 3)
    assert dup.inserted == 1
    assert dup.unchanged == 2
    assert len(set(dup.template_ids)) == 1


def test_replace_existing_keeps_one_template_per_dni(
    store: TemplateStore, vecs: np.ndarray
) -> None:
    store.add_templates("reniec", G, M, [TemplateRecord(vecs[0], dni=_dni(0))])
    res = store.add_templates(
        "reniec", G, M, [TemplateRecord(vecs[1], dni=_dni(0))], replace_existing=True
    )
    assert res.inserted == 1
    assert res.replaced == 1
    assert store.templates_of(res.subject_refs[0]) == res.template_ids


def test_dni_lookup_by_keyed_hash_and_never_in_clear(
    store: TemplateStore, vecs: np.ndarray
) -> None:
    _import(store, vecs, 20)
    ref = store.find_subject("reniec", _dni(3))
    assert ref is not None
    assert ref.startswith("sub_")
    assert store.find_subject("pnp", _dni(3)) is None  # owners do not share subjects
    assert store.find_subject("reniec", _dni(99)) is None
    assert store.reveal_dni(ref) == _dni(3)
    raw = _all_bytes(store)
    for i in range(20):
        assert _dni(i).encode() not in raw
    assert vecs[0].tobytes()[:32] not in raw
    store.add_plate("ABC-123")
    assert b"ABC123" not in _all_bytes(store)
    assert b"ABC-123" not in _all_bytes(store)


def test_bad_records_are_refused(store: TemplateStore, vecs: np.ndarray) -> None:
    with pytest.raises(InvalidArgument):
        store.add_templates("reniec", G, M, [TemplateRecord(vecs[0], dni="1234")])
    with pytest.raises(InvalidArgument):
        store.add_templates("reniec", G, M, [TemplateRecord(vecs[0])])
    with pytest.raises(InvalidArgument):
        store.add_templates("reniec", G, M, [TemplateRecord(np.full(512, np.nan), dni=_dni(1))])
    with pytest.raises(NotFound):
        store.add_templates(
            "pnp", "pnp_watchlist", M, [TemplateRecord(vecs[0], subject_ref="sub_x")]
        )
    assert store.max_seq() == 0


def test_state_changes_and_removals_are_replayed(store: TemplateStore, vecs: np.ndarray) -> None:
    ids = store.add_templates(
        "pnp", "pnp_watchlist", M, [TemplateRecord(vecs[i], dni=_dni(i)) for i in range(5)]
    ).template_ids
    mark = store.max_seq()
    until = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    assert store.set_template_state(ids[:2], active=False, expires_at=until) == 2
    assert store.remove_templates([ids[4], "tpl_unknown"]) == 1
    ref = store.find_subject("pnp", _dni(3))
    assert ref is not None
    assert store.set_objector(ref, True) == 1
    changes = {c.template_id: c for c in store.changes_since(mark)}
    assert set(changes) == {ids[0], ids[1], ids[3], ids[4]}
    assert not changes[ids[0]].active
    assert changes[ids[0]].expires_at == until.timestamp()
    assert changes[ids[4]].deleted
    assert changes[ids[4]].ciphertext is None
    assert changes[ids[3]].objector
    with pytest.raises(NotFound):
        store.open_template(changes[ids[4]])
    # Re-sending a removed template brings it back under its old id with a new seq.
    again = store.add_templates("pnp", "pnp_watchlist", M, [TemplateRecord(vecs[4], dni=_dni(4))])
    assert again.template_ids == [ids[4]]
    assert again.inserted == 1


def test_swapped_ciphertext_fails_to_decrypt(store: TemplateStore, vecs: np.ndarray) -> None:
    """Attack: an insider swaps two rows' ciphertexts so one person's face answers for another."""
    a, b = _import(store, vecs, 2)
    with store.engine.begin() as conn:
        rows = {r.template_id: r for r in conn.execute(sa.select(templates))}
        for tid, other in ((a, b), (b, a)):
            conn.execute(
                templates.update()
                .where(templates.c.template_id == tid)
                .values(nonce=rows[other].nonce, ciphertext=rows[other].ciphertext)
            )
    for c in store.changes_since(0):
        with pytest.raises(DecryptionError):
            store.open_template(c)


def test_ciphertext_moved_to_another_gallery_fails(store: TemplateStore, vecs: np.ndarray) -> None:
    (_tid,) = _import(store, vecs, 1)
    with store.engine.begin() as conn:
        conn.execute(templates.update().values(gallery="pnp_watchlist"))
    (change,) = store.changes_since(0)
    with pytest.raises(DecryptionError):
        store.open_template(change)


def test_wrong_key_cannot_read_the_store(db_url: str, tmp_path, vecs: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """Attack: the database copied to a host with other key files reveals nothing."""
    engine = make_engine(db_url)
    try:
        good = TemplateStore(engine, FileKeyProvider(tmp_path / "good"))
        _import(good, vecs, 3)
        thief = TemplateStore(engine, FileKeyProvider(tmp_path / "other"))
        for c in thief.changes_since(0):
            with pytest.raises((KeyNotFound, DecryptionError)):
                thief.open_template(c)
    finally:
        engine.dispose()


def test_kek_rotation_rewraps_without_touching_records(
    store: TemplateStore, vecs: np.ndarray
) -> None:
    ids = _import(store, vecs, 10)
    before = {c.template_id: c.ciphertext for c in store.changes_since(0)}
    old_kek = store.keys.current_kek_id("reniec")
    new_kek = store.rotate_kek("reniec")
    assert new_kek != old_kek
    store.keyring.forget_owner("reniec")  # force unwrapping with the new KEK
    changes = store.changes_since(0)
    assert {c.template_id: c.ciphertext for c in changes} == before
    assert np.array_equal(store.open_template(changes[0]), vecs[ids.index(changes[0].template_id)])
    with store.engine.connect() as conn:
        keks = {r.kek_id for r in conn.execute(sa.select(data_keys.c.kek_id))}
    assert keks == {new_kek}


def test_data_key_rotation_reencrypts_while_readable(
    store: TemplateStore, vecs: np.ndarray
) -> None:
    ids = _import(store, vecs, 30)
    ref = store.find_subject("reniec", _dni(0))
    old = store.keyring.current("reniec")[0]
    new = store.rotate_data_key("reniec")
    more = _import(store, vecs, 5, start=100)
    mixed = {c.key_id for c in store.changes_since(0)}
    assert mixed == {old, new}
    for c in store.changes_since(0)[:3]:
        store.open_template(c)  # readable mid-rotation
    moved = store.reencrypt("reniec", batch=7)
    assert moved == 60  # 30 templates + 30 DNIs
    changes = store.changes_since(0)
    assert {c.key_id for c in changes} == {new}
    assert [c.seq for c in changes][-5:] == sorted(c.seq for c in changes)[-5:]
    by_id = {c.template_id: c for c in changes}
    assert np.array_equal(store.open_template(by_id[ids[7]]), vecs[7])
    assert np.array_equal(store.open_template(by_id[more[0]]), vecs[100])
    assert ref is not None
    assert store.reveal_dni(ref) == _dni(0)
    assert [k for k, _ in store.keyring.key_ids("reniec")] == [new]


def test_crypto_shredding(store: TemplateStore, vecs: np.ndarray) -> None:
    """Destroying an owner's keys makes its templates unrecoverable; others are untouched."""
    _import(store, vecs, 10)
    pnp = store.add_templates("pnp", "pnp_watchlist", M, [TemplateRecord(vecs[50], dni=_dni(50))])
    store.add_plate("ABC-123")
    saved = store.changes_since(0)
    mark = store.max_seq()
    assert store.shred_owner("reniec") == 10
    for c in saved:
        if c.owner == "reniec":
            with pytest.raises((KeyNotFound, DecryptionError)):
                store.open_template(c)
    tomb = store.changes_since(mark)
    assert len(tomb) == 10
    assert all(c.deleted and c.ciphertext is None for c in tomb)
    with store.engine.connect() as conn:
        left = conn.execute(
            sa.select(sa.func.count())
            .select_from(templates)
            .where(templates.c.owner == "reniec", templates.c.ciphertext.is_not(None))
        ).scalar_one()
        dnis = conn.execute(
            sa.select(sa.func.count())
            .select_from(subjects)
            .where(subjects.c.owner == "reniec", subjects.c.dni_ct.is_not(None))
        ).scalar_one()
    assert left == 0
    assert dnis == 0
    (pnp_change,) = [c for c in store.changes_since(0) if c.owner == "pnp"]
    assert np.array_equal(store.open_template(pnp_change), vecs[50])
    assert pnp.template_ids == [pnp_change.template_id]
    assert store.find_plate("ABC123") is not None


def test_plates_are_idempotent_and_replayed(store: TemplateStore) -> None:
    ref, created = store.add_plate("abc 123")
    assert created
    assert ref.startswith("veh_")
    assert store.add_plate("ABC-123") == (ref, False)
    assert store.find_plate("ABC123") == ref
    store.set_plate_active(ref, False)
    (change,) = store.plate_changes_since(0)
    assert not change.active
    assert store.open_plate(change) == "ABC123"
    assert store.remove_plate(ref)
    assert not store.remove_plate(ref)
    assert store.find_plate("ABC123") is None
    with pytest.raises(NotFound):
        store.set_plate_active(ref, True)
    ref2, created2 = store.add_plate("ABC-123")
    assert ref2 == ref
    assert created2
    assert store.count_plate_changes_since(0) == 1


def test_concurrent_writers_keep_sequence_in_commit_order(
    store: TemplateStore, vecs: np.ndarray
) -> None:
    """Readers following the change log never miss a change committed later (seq = commit order)."""
    seen: list[int] = []
    stop = threading.Event()

    def follower() -> None:
        mark = 0
        while not stop.is_set():
            for c in store.changes_since(mark):
                seen.append(c.seq)
                mark = c.seq

    t = threading.Thread(target=follower)
    t.start()

    def writer(k: int) -> None:
        for j in range(5):
            base = 200 + k * 50 + j * 10
            store.add_templates(
                "reniec",
                G,
                M,
                [TemplateRecord(vecs[i], dni=_dni(i)) for i in range(base, base + 10)],
            )

    writers = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    t.join()
    mark = seen[-1] if seen else 0
    seen += [c.seq for c in store.changes_since(mark)]
    assert seen == list(range(1, 151))


def test_store_id_is_stable(db_url: str, keys: FileKeyProvider) -> None:
    engine = make_engine(db_url)
    try:
        a = TemplateStore(engine, keys)
        b = TemplateStore(engine, keys)
        assert a.store_id == b.store_id
        assert len(a.store_id) == 32
    finally:
        engine.dispose()


def test_first_subject_of_a_fresh_owner(store: TemplateStore) -> None:
    """Keys are created outside the write transaction (SQLite has a single writer)."""
    ref = store.ensure_subject("pnp", "12345678")
    assert store.ensure_subject("pnp", "1234 5678") == ref
    assert store.find_subject("pnp", "12345678") == ref


def test_subject_without_dni(store: TemplateStore, vecs: np.ndarray) -> None:
    """A wanted person known only by face: pseudonymous subject, no DNI to reveal."""
    ref = store.new_subject("pnp")
    res = store.add_templates("pnp", "pnp_watchlist", M, [TemplateRecord(vecs[0], subject_ref=ref)])
    assert res.subject_refs == [ref]
    with pytest.raises(NotFound):
        store.reveal_dni(ref)
