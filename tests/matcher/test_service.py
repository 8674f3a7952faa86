"""The matcher facade over a real store: start-up (snapshot or rebuild), catch-up, searches,
verification, plates, and crypto-shredding, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from centinela.errors import InvalidArgument, ModelMismatch, NotFound, Unavailable
from centinela.matcher import synth
from centinela.matcher.keys import FileKeyProvider
from centinela.matcher.plates import PlateRead
from centinela.matcher.schema import templates
from centinela.matcher.service import (
    REGISTRY,
    WATCHLIST,
    HnswSettings,
    Matcher,
    StartProgress,
    default_galleries,
)
from centinela.matcher.store import TemplateRecord, TemplateStore
from centinela.storage import make_engine

MODEL = "model-a"
NOW = dt.datetime.now(dt.UTC)


def _dni(i: int) -> str:
    return f"{10000000 + i:08d}"


@pytest.fixture(scope="module")
def pop() -> tuple[np.ndarray, np.ndarray]:
    t = synth.identities(800, seed=31)
    return t, synth.genuine_probes(t, seed=32)


def _matcher(store: TemplateStore, snap: Path | None = None) -> Matcher:
    return Matcher(
        store,
        galleries=default_galleries(MODEL),
        snapshot_dir=snap,
        hnsw=HnswSettings(ef_construction=64, ef=64, tune_min_size=10_000),
        batch=300,
        chunk=128,
    )


def _registry(
    store: TemplateStore, pop: tuple[np.ndarray, np.ndarray], a: int, b: int
) -> list[str]:
    res = store.add_templates(
        "reniec", REGISTRY, MODEL, [TemplateRecord(pop[0][i], dni=_dni(i)) for i in range(a, b)]
    )
    return res.template_ids


def _top(m: Matcher, gallery: str, probe: np.ndarray, **kw: object) -> list[str]:
    hits = m.search_faces(gallery, probe, model_id=MODEL, k=3, min_score=0.4, now=NOW, **kw)  # type: ignore[arg-type]
    return [h.template_id for h in hits]


def test_search_before_start_is_unavailable(
    store: TemplateStore, pop: tuple[np.ndarray, np.ndarray]
) -> None:
    m = _matcher(store)
    with pytest.raises(Unavailable):
        m.search_faces(REGISTRY, pop[1][0], model_id=MODEL, k=1, min_score=0.4)
    with pytest.raises(Unavailable):
        m.search_plates(PlateRead("ABC123"))


def test_ingestion_then_catch_up(store: TemplateStore, pop: tuple[np.ndarray, np.ndarray]) -> None:
    """Durable first, searchable after the catch-up; the lag says how far behind the index is."""
    m = _matcher(store)
    m.start()
    ids = _registry(store, pop, 0, 400)
    assert m.index_lag() == 400
    assert _top(m, REGISTRY, pop[1][5]) == []
    assert m.catch_up() == 400
    assert m.index_lag() == 0
    assert _top(m, REGISTRY, pop[1][5]) == [ids[5]]
    assert _top(m, WATCHLIST, pop[1][5]) == []


def test_probe_of_wrong_model_or_dimension(
    store: TemplateStore, pop: tuple[np.ndarray, np.ndarray]
) -> None:
    _registry(store, pop, 0, 10)
    m = _matcher(store)
    m.start()
    with pytest.raises(ModelMismatch):
        m.search_faces(REGISTRY, pop[1][0], model_id="model-b", k=1, min_score=0.4)
    with pytest.raises(InvalidArgument) as info:
        m.search_faces(REGISTRY, pop[1][0][:256], model_id=MODEL, k=1, min_score=0.4)
    assert info.value.field == "probe.vector"
    with pytest.raises(InvalidArgument):
        m.search_faces("nope", pop[1][0], model_id=MODEL, k=1, min_score=0.4)
    with pytest.raises(ModelMismatch):
        m.verify(REGISTRY, pop[1][0], model_id="model-b", dni=_dni(0))


def test_template_of_another_model_is_not_indexed(
    store: TemplateStore, pop: tuple[np.ndarray, np.ndarray]
) -> None:
    store.add_templates("reniec", REGISTRY, "model-b", [TemplateRecord(pop[0][0], dni=_dni(0))])
    m = _matcher(store)
    m.start()
    assert len(m.gallery(REGISTRY)) == 0


def test_watchlist_lifecycle_lift_and_expiry(
    store: TemplateStore, pop: tuple[np.ndarray, np.ndarray]
) -> None:
    """R6: lifted entries stop matching after catch-up; expiring ones at their expiry."""
    t, p = pop
    soon = NOW + dt.timedelta(hours=1)
    res = store.add_templates(
        "pnp",
        WATCHLIST,
        MODEL,
        [TemplateRecord(t[0], dni=_dni(0)), TemplateRecord(t[1], dni=_dni(1), expires_at=soon)],
    )
    m = _matcher(store)
    m.start()
    assert _top(m, WATCHLIST, p[0]) == [res.template_ids[0]]
    store.set_template_state([res.template_ids[0]], active=False, expires_at=None)
    m.catch_up()
    assert _top(m, WATCHLIST, p[0]) == []
    assert _top(m, WATCHLIST, p[1]) == [res.template_ids[1]]
    later = m.search_faces(WATCHLIST, p[1], model_id=MODEL, k=1, min_score=0.4, now=soon)
    assert later == []


def test_objector_excluded_from_registry(
    store: TemplateStore, pop: tuple[np.ndarray, np.ndarray]
) -> None:
    ids = _registry(store, pop, 0, 5)
    m = _matcher(store)
    m.start()
    ref = store.find_subject("reniec", _dni(2))
    assert ref is not None
    store.set_objector(ref, True)
    m.catch_up()
    assert _top(m, REGISTRY, pop[1][2], exclude_objectors=True) == []
    assert _top(
        m, REGISTRY, pop[1][2], exclude_objectors=True, exempt_subjects=frozenset({ref})
    ) == [ids[2]]
    assert _top(m, REGISTRY, pop[1][2]) == [ids[2]]


def test_verify_by_dni_or_subject(store: TemplateStore, pop: tuple[np.ndarray, np.ndarray]) -> None:
    _registry(store, pop, 0, 20)
    m = _matcher(store)
    m.start()
    assert m.verify(REGISTRY, pop[1][4], model_id=MODEL, dni=_dni(4)) > 0.45
    assert m.verify(REGISTRY, pop[1][4], model_id=MODEL, dni=_dni(5)) < 0.4
    ref = store.find_subject("reniec", _dni(4))
    assert ref is not None
    assert m.verify(REGISTRY, pop[1][4], model_id=MODEL, subject_ref=ref) > 0.45
    with pytest.raises(NotFound):
        m.verify(REGISTRY, pop[1][4], model_id=MODEL, dni=_dni(99))
    with pytest.raises(InvalidArgument):
        m.verify(REGISTRY, pop[1][4], model_id=MODEL)


def test_start_from_snapshot_then_replay(
    store: TemplateStore, pop: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    ids = _registry(store, pop, 0, 300)
    first = _matcher(store, tmp_path)
    first.start()
    infos = first.save_snapshots()
    assert {i.gallery for i in infos} == {WATCHLIST, REGISTRY}
    later = _registry(store, pop, 300, 350)
    store.remove_templates([ids[7]])
    phases: list[StartProgress] = []
    second = _matcher(store, tmp_path)
    second.start(phases.append)
    kinds = {(p.phase, p.gallery) for p in phases}
    assert ("snapshot", REGISTRY) in kinds
    assert ("rebuild", REGISTRY) not in kinds
    replay = [p for p in phases if p.phase == "replay" and p.gallery == REGISTRY]
    assert replay[-1].done == replay[-1].total == 51
    assert len(second.gallery(REGISTRY)) == 349
    assert _top(second, REGISTRY, pop[1][320]) == [later[20]]
    assert _top(second, REGISTRY, pop[1][7]) == []
    assert _top(second, REGISTRY, pop[1][8]) == [ids[8]]


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "garbage"])
def test_bad_snapshot_is_rebuilt_from_store(
    store: TemplateStore, pop: tuple[np.ndarray, np.ndarray], tmp_path: Path, damage: str
) -> None:
    """A truncated, corrupted or foreign snapshot is never trusted: the store is the truth."""
    ids = _registry(store, pop, 0, 200)
    m = _matcher(store, tmp_path / "snap")
    m.start()
    m.save_snapshots()
    path = tmp_path / "snap" / f"{REGISTRY}.snapshot"
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        path.write_bytes(raw[:-100] + bytes([raw[-100] ^ 1]) + raw[-99:])
    elif damage == "garbage":
        path.write_bytes(b"\0" * 4096)
    else:  # a snapshot made by another installation (other store, other keys)
        engine = make_engine(f"sqlite:///{tmp_path / 'other.db'}")
        other = TemplateStore(engine, FileKeyProvider(tmp_path / "other-keys"))
        other.add_templates("reniec", REGISTRY, MODEL, [TemplateRecord(pop[0][700], dni=_dni(700))])
        om = _matcher(other, tmp_path / "other-snap")
        om.start()
        om.save_snapshots()
        path.write_bytes((tmp_path / "other-snap" / f"{REGISTRY}.snapshot").read_bytes())
        engine.dispose()
    phases: list[StartProgress] = []
    again = _matcher(store, tmp_path / "snap")
    again.start(phases.append)
    assert ("rebuild", REGISTRY) in {(p.phase, p.gallery) for p in phases}
    assert len(again.gallery(REGISTRY)) == 200
    assert _top(again, REGISTRY, pop[1][10]) == [ids[10]]
    assert _top(again, REGISTRY, pop[1][700]) == []


def test_swapped_ciphertext_is_never_indexed(
    store: TemplateStore, pop: tuple[np.ndarray, np.ndarray]
) -> None:
    """Attack: rows' ciphertexts swapped in the database; both rows are rejected, not swapped."""
    a, b, c = _registry(store, pop, 0, 3)
    with store.engine.begin() as conn:
        rows = {r.template_id: r for r in conn.execute(sa.select(templates))}
        for tid, other in ((a, b), (b, a)):
            conn.execute(
                templates.update()
                .where(templates.c.template_id == tid)
                .values(nonce=rows[other].nonce, ciphertext=rows[other].ciphertext)
            )
    m = _matcher(store)
    m.start()
    assert m.rejected_rows == 2
    assert m.gallery(REGISTRY).template_ids() == [c]
    assert _top(m, REGISTRY, pop[1][0]) == []
    assert _top(m, REGISTRY, pop[1][1]) == []


def test_crypto_shredding_empties_the_gallery(
    store: TemplateStore, pop: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    _registry(store, pop, 0, 100)
    wl = store.add_templates("pnp", WATCHLIST, MODEL, [TemplateRecord(pop[0][500], dni=_dni(500))])
    m = _matcher(store, tmp_path)
    m.start()
    m.save_snapshots()
    assert m.shred("reniec") == 100
    assert len(m.gallery(REGISTRY)) == 0
    assert _top(m, REGISTRY, pop[1][3]) == []
    assert not (tmp_path / f"{REGISTRY}.snapshot").exists()
    assert _top(m, WATCHLIST, pop[1][500]) == wl.template_ids
    restarted = _matcher(store, tmp_path)
    restarted.start()
    assert len(restarted.gallery(REGISTRY)) == 0
    assert len(restarted.gallery(WATCHLIST)) == 1
    assert m.index_lag() == 0


def test_plates_through_the_matcher(store: TemplateStore) -> None:
    ref, _ = store.add_plate("ABC-123")
    store.add_plate("1234-AB")
    m = _matcher(store)
    m.start()
    assert [h.ref for h in m.search_plates(PlateRead("A8C 123"))] == [ref]
    store.set_plate_active(ref, False)  # recovered: R6
    assert m.index_lag() == 1
    m.catch_up()
    assert m.search_plates(PlateRead("ABC123")) == []
    store.set_plate_active(ref, True)
    m.catch_up()
    assert [h.ref for h in m.search_plates(PlateRead("ABC123"))] == [ref]
    store.remove_plate(ref)
    m.catch_up()
    assert m.search_plates(PlateRead("ABC123")) == []


def test_background_catch_up_with_concurrent_searches(
    store: TemplateStore, pop: tuple[np.ndarray, np.ndarray]
) -> None:
    """Imports are acknowledged at once; searches go on while the index catches up."""
    _t, p = pop
    m = _matcher(store)
    m.start()
    m.run_in_background(interval_s=0.05)
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        rng = np.random.default_rng(1)
        while not stop.is_set():
            i = int(rng.integers(0, 600))
            try:
                for h in m.search_faces(REGISTRY, p[i], model_id=MODEL, k=3, min_score=0.4):
                    assert h.score >= 0.4
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        ids: list[str] = []
        for start in range(0, 600, 150):
            ids += _registry(store, pop, start, start + 150)
            m.notify()
        deadline = time.monotonic() + 60
        while m.index_lag() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for th in threads:
            th.join()
        m.stop()
    assert errors == []
    assert m.index_lag() == 0
    assert _top(m, REGISTRY, p[599]) == [ids[599]]


def test_ef_is_tuned_as_the_gallery_grows(store: TemplateStore) -> None:
    """1,000 templates: the tuning's 1,000-probe sample may miss one. With 300 (a sample
    that may miss none) one node the multi-threaded build left unreachable, which happened
    once under the full suite's load, sent ef to the top candidate."""
    m = Matcher(
        store,
        galleries=default_galleries(MODEL),
        hnsw=HnswSettings(ef_construction=64, ef=500, tune_min_size=200),
    )
    m.start()
    assert m.gallery(REGISTRY).ef == 500
    big = synth.identities(1000, seed=33)
    _registry(store, (big, big), 0, 1000)
    m.catch_up()
    assert m.gallery(REGISTRY).ef < 500  # tuned on a sample once the gallery was big enough
