"""Face galleries on real hnswlib: search, R6/R7 filtering, validation, concurrency, compaction."""

from __future__ import annotations

import datetime as dt
import gc
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from centinela.errors import InvalidArgument, ModelMismatch
from centinela.matcher import synth
from centinela.matcher.gallery import FaceGallery, GalleryItem, exact_scores

NOW = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)
N = 2000


@pytest.fixture(scope="module")
def population() -> tuple[np.ndarray, np.ndarray]:
    templates = synth.identities(N, seed=101)
    return templates, synth.genuine_probes(templates, seed=102)


def _gallery(templates: np.ndarray, **kw: object) -> FaceGallery:
    g = FaceGallery("pnp_watchlist", "model-a", 512, ef_construction=100, **kw)  # type: ignore[arg-type]
    g.add_batch(
        [f"t{i}" for i in range(len(templates))],
        [f"s{i}" for i in range(len(templates))],
        templates,
        chunk=1024,
    )
    return g


@pytest.fixture(scope="module")
def gallery(population: tuple[np.ndarray, np.ndarray]) -> FaceGallery:
    g = _gallery(population[0])
    g.tune_ef(sample=300)
    return g


def test_genuine_probes_find_their_template(
    gallery: FaceGallery, population: tuple[np.ndarray, np.ndarray]
) -> None:
    _, probes = population
    found = 0
    for i in range(300):
        hits = gallery.search(probes[i], k=1, min_score=0.4, now=NOW)
        found += bool(hits) and hits[0].template_id == f"t{i}" and hits[0].subject_ref == f"s{i}"
    assert found == 300


def test_scores_are_exact_and_sorted(
    gallery: FaceGallery, population: tuple[np.ndarray, np.ndarray]
) -> None:
    templates, probes = population
    hits = gallery.search(probes[7], k=5, min_score=-1.0, now=NOW)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for h in hits:
        exact = float(
            templates[int(h.template_id[1:])].astype(np.float64)
            @ (probes[7] / np.linalg.norm(probes[7]))
        )
        assert h.score == pytest.approx(exact, abs=1e-6)


def test_threshold_filters_everything_below(
    gallery: FaceGallery, population: tuple[np.ndarray, np.ndarray]
) -> None:
    hits = gallery.search(population[1][3], k=10, min_score=0.95, now=NOW)
    assert hits == []


def test_a_threshold_at_the_best_exact_score_keeps_it_and_one_just_above_drops_it(
    gallery: FaceGallery, population: tuple[np.ndarray, np.ndarray]
) -> None:
    # The float32 score HNSW ranks by may sit a hair below the exact one: a probe whose best
    # candidate is exactly at the threshold must still come back (nothing is dropped on the
    # approximate score alone), and one a hair under the threshold must not.
    _templates, probes = population
    for i in (7, 11, 23):
        (best,) = gallery.search(probes[i], k=1, min_score=-1.0, now=NOW)
        (again,) = gallery.search(probes[i], k=1, min_score=best.score, now=NOW)
        assert again == best
        assert gallery.search(probes[i], k=1, min_score=best.score + 1e-9, now=NOW) == []


def test_hit_recall_against_exact_search(
    gallery: FaceGallery, population: tuple[np.ndarray, np.ndarray]
) -> None:
    """Hit recall >= 0.999 of what exact search returns above the threshold."""
    templates, probes = population
    genuine = np.einsum("ij,ij->i", templates, probes)
    exact_hits = returned = 0
    for i in range(N):
        if genuine[i] < 0.4:
            continue
        exact_hits += 1
        hits = gallery.search(probes[i], k=10, min_score=0.4, now=NOW)
        returned += any(h.template_id == f"t{i}" for h in hits)
    assert returned / exact_hits >= 0.999


def test_probe_of_wrong_dimension_is_refused(gallery: FaceGallery) -> None:
    with pytest.raises(InvalidArgument) as info:
        gallery.search(np.ones(128, np.float32), k=1, min_score=0.4, now=NOW)
    assert info.value.field == "probe.vector"


def test_probe_of_wrong_model_is_refused(
    gallery: FaceGallery, population: tuple[np.ndarray, np.ndarray]
) -> None:
    with pytest.raises(ModelMismatch):
        gallery.search(population[1][0], k=1, min_score=0.4, now=NOW, model_id="model-b")
    with pytest.raises(ModelMismatch):
        gallery.verify("s0", population[1][0], model_id="model-b")


@pytest.mark.parametrize("bad", [np.full(512, np.nan), np.full(512, np.inf), np.zeros(512)])
def test_non_finite_or_zero_probe_is_refused(gallery: FaceGallery, bad: np.ndarray) -> None:
    with pytest.raises(InvalidArgument):
        gallery.search(bad, k=1, min_score=0.4, now=NOW)


def test_inactive_and_expired_entries_never_come_back(
    population: tuple[np.ndarray, np.ndarray],
) -> None:
    """R6: a lifted entry is gone at once, an expiring one at the instant it expires."""
    templates, probes = population
    g = FaceGallery("pnp_watchlist", "model-a", 512)
    soon = NOW + dt.timedelta(minutes=5)
    g.add(
        [
            GalleryItem("lifted", "s0", templates[0], active=False),
            GalleryItem("expiring", "s1", templates[1], expires_at=soon),
            GalleryItem("fine", "s2", templates[2]),
        ]
    )
    assert g.search(probes[0], k=3, min_score=0.4, now=NOW) == []
    assert [h.template_id for h in g.search(probes[1], k=3, min_score=0.4, now=NOW)] == ["expiring"]
    assert g.search(probes[1], k=3, min_score=0.4, now=soon) == []
    assert g.search(probes[1], k=3, min_score=0.4, now=soon + dt.timedelta(seconds=1)) == []
    assert g.set_state("lifted", active=True, expires_at=None)
    assert [h.template_id for h in g.search(probes[0], k=3, min_score=0.4, now=NOW)] == ["lifted"]


def test_objectors_excluded_unless_named(population: tuple[np.ndarray, np.ndarray]) -> None:
    """R7: objectors are dropped when asked, except subjects the authorisation names."""
    templates, probes = population
    g = FaceGallery("reniec_registry", "model-a", 512)
    g.add(
        [
            GalleryItem("t0", "s0", templates[0], objector=True),
            GalleryItem("t1", "s1", templates[1]),
        ]
    )
    assert g.search(probes[0], k=1, min_score=0.4, now=NOW, exclude_objectors=True) == []
    named = g.search(
        probes[0],
        k=1,
        min_score=0.4,
        now=NOW,
        exclude_objectors=True,
        exempt_subjects=frozenset({"s0"}),
    )
    assert [h.template_id for h in named] == ["t0"]
    assert [h.template_id for h in g.search(probes[0], k=1, min_score=0.4, now=NOW)] == ["t0"]
    g.set_objector("s0", False)
    assert g.search(probes[0], k=1, min_score=0.4, now=NOW, exclude_objectors=True)


def test_filtered_entries_do_not_crowd_out_allowed_ones(
    population: tuple[np.ndarray, np.ndarray],
) -> None:
    """Many inactive near-duplicates rank above the one active entry: it is still found."""
    templates, probes = population
    g = _gallery(templates[:500])
    rng = np.random.default_rng(3)
    dupes = templates[0] + 0.01 * rng.standard_normal((60, 512)).astype(np.float32)
    g.add_batch(
        [f"d{i}" for i in range(60)],
        [f"sd{i}" for i in range(60)],
        dupes,
        active=np.zeros(60, bool),
    )
    g.set_state("t0", active=True, expires_at=None)
    hits = g.search(probes[0], k=1, min_score=0.3, now=NOW)
    assert [h.template_id for h in hits] == ["t0"]


def test_removed_entries_never_come_back_and_can_return(
    population: tuple[np.ndarray, np.ndarray],
) -> None:
    templates, probes = population
    g = _gallery(templates[:300])
    assert g.remove("t5")
    assert not g.remove("t5")
    assert all(h.template_id != "t5" for h in g.search(probes[5], k=10, min_score=-1, now=NOW))
    g.add([GalleryItem("t5-again", "s5", templates[5])])
    assert g.search(probes[5], k=1, min_score=0.4, now=NOW)[0].template_id == "t5-again"
    assert len(g) == 300


def test_removal_during_concurrent_search(population: tuple[np.ndarray, np.ndarray]) -> None:
    """Searches running while entries are removed and added never return a removed entry."""
    templates, probes = population
    g = _gallery(templates[:1000])
    removed: set[str] = set()
    lock = threading.Lock()
    errors: list[str] = []
    stop = threading.Event()

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            i = int(rng.integers(0, 1000))
            with lock:
                gone_before = set(removed)
            for h in g.search(probes[i], k=5, min_score=0.3, now=NOW):
                if h.template_id in gone_before:
                    errors.append(h.template_id)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(0, 1000, 3):
            g.remove(f"t{i}")
            with lock:
                removed.add(f"t{i}")
            if i % 30 == 0:
                g.add_batch([f"n{i}"], [f"sn{i}"], templates[1000 + i // 3 : 1001 + i // 3])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    for i in range(0, 1000, 3):
        assert all(
            h.template_id != f"t{i}" for h in g.search(probes[i], k=5, min_score=0.3, now=NOW)
        )


def test_concurrent_insertion_never_shows_half_inserted(
    population: tuple[np.ndarray, np.ndarray],
) -> None:
    """While a bulk add runs, each search result is a complete entry with its exact score."""
    templates, probes = population
    g = FaceGallery("pnp_watchlist", "model-a", 512, ef_construction=64)
    bad: list[str] = []
    stop = threading.Event()

    def searcher() -> None:
        rng = np.random.default_rng(9)
        while not stop.is_set():
            i = int(rng.integers(0, N))
            for h in g.search(probes[i], k=3, min_score=0.3, now=NOW):
                j = int(h.template_id[1:])
                exact = float(
                    templates[j].astype(np.float64) @ (probes[i] / np.linalg.norm(probes[i]))
                )
                if abs(exact - h.score) > 1e-5:
                    bad.append(h.template_id)

    t = threading.Thread(target=searcher)
    t.start()
    try:
        g.add_batch([f"t{i}" for i in range(N)], [f"s{i}" for i in range(N)], templates, chunk=100)
    finally:
        stop.set()
        t.join()
    assert bad == []
    assert len(g) == N


def test_compaction_after_many_deletions(population: tuple[np.ndarray, np.ndarray]) -> None:
    templates, probes = population
    g = _gallery(templates[:1200], compact_min=100, compact_ratio=0.2)
    g.remove_many([f"t{i}" for i in range(400)])
    assert g.needs_compaction()
    g.compact()
    assert not g.needs_compaction()
    assert len(g) == 800
    assert g.search(probes[900], k=1, min_score=0.4, now=NOW)[0].template_id == "t900"
    assert g.search(probes[10], k=5, min_score=0.4, now=NOW) == []
    g.add([GalleryItem("late", "s-late", templates[10])])
    assert g.search(probes[10], k=1, min_score=0.4, now=NOW)[0].template_id == "late"


def test_verify_scores_one_subject(
    gallery: FaceGallery, population: tuple[np.ndarray, np.ndarray]
) -> None:
    _templates, probes = population
    score = gallery.verify("s4", probes[4], model_id="model-a")
    assert score is not None
    assert score > 0.45
    other = gallery.verify("s5", probes[4])
    assert other is not None
    assert other < 0.4
    assert gallery.verify("nobody", probes[4]) is None


def test_state_updates_of_existing_ids_do_not_duplicate(
    population: tuple[np.ndarray, np.ndarray],
) -> None:
    templates, probes = population
    g = FaceGallery("pnp_watchlist", "model-a", 512)
    g.add([GalleryItem("t0", "s0", templates[0])])
    g.add([GalleryItem("t0", "s0", templates[0], active=False)])
    assert len(g) == 1
    assert g.search(probes[0], k=5, min_score=0.3, now=NOW) == []


def test_tune_ef_picks_a_value_from_the_candidates(
    population: tuple[np.ndarray, np.ndarray],
) -> None:
    g = _gallery(population[0][:600])
    ef = g.tune_ef(sample=200)
    assert ef in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768)
    assert g.ef == ef


def test_unknown_metric_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        FaceGallery("x", "m", 512, metric="l1")


_SMALL = synth.identities(40, seed=55)


@given(
    st.lists(
        st.tuples(st.booleans(), st.sampled_from([None, -60, 60]), st.booleans()),
        min_size=40,
        max_size=40,
    ),
    st.booleans(),
    st.sets(st.integers(0, 39), max_size=5),
)
@settings(max_examples=30, deadline=None)
def test_search_returns_exactly_the_allowed_entries(
    states: list[tuple[bool, int | None, bool]], exclude: bool, exempt: set[int]
) -> None:
    """Property: whatever the entry states, a search over everything returns exactly the
    entries that are active, unexpired at ``now`` and (if asked) not objecting or exempted."""
    g = FaceGallery("reniec_registry", "model-a", 512)
    g.add_batch([f"t{i}" for i in range(40)], [f"s{i}" for i in range(40)], _SMALL)
    allowed = set()
    for i, (active, expiry, objector) in enumerate(states):
        when = None if expiry is None else NOW + dt.timedelta(seconds=expiry)
        g.set_state(f"t{i}", active=active, expires_at=when)
        g.set_template_objector(f"t{i}", objector)
        unexpired = when is None or when > NOW
        if active and unexpired and not (exclude and objector and i not in exempt):
            allowed.add(f"t{i}")
    hits = g.search(
        _SMALL[0],
        k=40,
        min_score=-1.0,
        now=NOW,
        exclude_objectors=exclude,
        exempt_subjects=frozenset(f"s{i}" for i in exempt),
    )
    assert {h.template_id for h in hits} == allowed


def test_vectors_of_returns_a_subjects_templates(
    gallery: FaceGallery, population: tuple[np.ndarray, np.ndarray]
) -> None:
    templates, _ = population
    (vec,) = gallery.vectors_of("s9")
    assert np.allclose(vec, templates[9], atol=1e-6)
    assert gallery.vectors_of("nobody") == []


def test_a_subjects_templates_survive_removal_compaction_and_snapshots() -> None:
    """Subjects with several templates: the per-subject label table follows every change."""
    g = FaceGallery("pnp_watchlist", "model-a", 512, compact_min=1, compact_ratio=0.01)
    subjects = ["multi", "multi", "solo", "multi", "other"]
    g.add_batch([f"t{i}" for i in range(5)], subjects, _SMALL[:5])
    assert np.allclose(np.stack(g.vectors_of("multi")), _SMALL[[0, 1, 3]], atol=1e-6)
    g.add([GalleryItem("t1", "multi", _SMALL[1])])  # re-adding a template changes nothing
    assert len(g.vectors_of("multi")) == 3
    assert g.remove("t1")
    assert np.allclose(np.stack(g.vectors_of("multi")), _SMALL[[0, 3]], atol=1e-6)
    assert g.set_objector("multi", True) == 2
    assert g.search(_SMALL[0], k=5, min_score=0.9, now=NOW, exclude_objectors=True) == []
    g.compact()
    assert np.allclose(np.stack(g.vectors_of("multi")), _SMALL[[0, 3]], atol=1e-6)
    meta, arrays = g.export_state()
    copy = FaceGallery.from_state(meta, arrays)
    assert np.allclose(np.stack(copy.vectors_of("multi")), _SMALL[[0, 3]], atol=1e-6)
    assert copy.verify("solo", _SMALL[2]) == pytest.approx(1.0, abs=1e-5)
    assert g.remove_many(["t0", "t3"]) == 2
    assert g.vectors_of("multi") == []
    assert g.verify("multi", _SMALL[0]) is None
    assert g.verify("solo", _SMALL[2]) == pytest.approx(1.0, abs=1e-5)


def _tracked_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


def test_a_gallery_adds_no_garbage_collected_object_per_template(
    population: tuple[np.ndarray, np.ndarray],
) -> None:
    """A full collection walks every GC-tracked object with the event loop stopped; the
    gallery must not add one per template (with the view's records, a set per subject made
    each full collection a 110-128 ms pause at 100,000 templates and 411 ms at a million)."""
    templates, _ = population
    before = _tracked_objects()
    g = _gallery(templates)
    g.remove_many([f"t{i}" for i in range(0, N, 3)])
    g.compact()
    grown = _tracked_objects() - before
    assert len(g) > N // 2
    assert grown < N // 20, f"{grown} tracked objects for {len(g)} templates"


def test_exact_score_of_a_pair_does_not_depend_on_the_batch_it_is_scored_in() -> None:
    # A matrix product sums each row in an order that varies with the batch's shape and
    # alignment (numpy 2.4: most rows differed in the last bit), which made a threshold set
    # at a reported score drop that candidate on the next search.
    rng = np.random.default_rng(0)
    q = rng.standard_normal(512)
    q /= np.linalg.norm(q)
    rows = rng.standard_normal((40, 512)).astype(np.float32)
    alone = {i: exact_scores(rows[i : i + 1], q)[0] for i in range(40)}
    for _ in range(500):
        i, n, offset = int(rng.integers(0, 40)), int(rng.integers(1, 16)), int(rng.integers(0, 8))
        picked = np.concatenate([[i], rng.integers(0, 40, n - 1)])
        buf = np.empty(n * 512 + 8)
        batch = buf[offset : offset + n * 512].reshape(n, 512)  # another start alignment
        batch[:] = rows[picked]
        assert exact_scores(batch, q)[0] == alone[i]


@pytest.mark.parametrize("inactive_share", [0.0, 0.5, 0.97])
def test_best_scores_give_what_search_gives_row_by_row(
    population: tuple[np.ndarray, np.ndarray], inactive_share: float
) -> None:
    """A calibration's batch path: each row's best score is the very float ``search(k=1)``
    reports, whatever share of entries is excluded (at 0.97 most rows' HNSW candidates are
    all inactive, so they take ``search``'s filtered traversal)."""
    templates = population[0][:3000]
    g = _gallery(templates)
    rng = np.random.default_rng(9)
    for i in np.flatnonzero(rng.random(len(templates)) < inactive_share):
        g.set_state(f"t{i}", active=False, expires_at=None)
    probes = np.vstack([synth.strangers(150, seed=11), population[1][:50]])
    batch = g.best_scores(probes, now=NOW, rows_per_lock=32)
    one_by_one = []
    for p in probes:
        hits = g.search(p, k=1, min_score=-1.0, now=NOW)
        one_by_one.append(hits[0].score if hits else -1.0)
    assert batch.tolist() == one_by_one


def test_best_scores_refuse_a_bad_batch(gallery: FaceGallery) -> None:
    with pytest.raises(InvalidArgument, match="rows of 512"):
        gallery.best_scores(np.zeros((2, 8)), now=NOW)
    with pytest.raises(InvalidArgument, match="non-finite or zero"):
        gallery.best_scores(np.zeros((2, 512)), now=NOW)
    assert gallery.best_scores(np.empty((0, 512)), now=NOW).tolist() == []
