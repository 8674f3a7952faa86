"""A face gallery: hnswlib HNSW with live add/remove, entry-state filtering, exact re-scoring.

Invariants (DESIGN.md §2 step 5, §4; LEGAL_RULES R6, R7, R13):

* A gallery has one ``model_id``, one dimension and one metric, fixed at creation. A probe
  from another model raises :class:`~centinela.errors.ModelMismatch`; a probe of another
  dimension, or with a non-finite value, raises ``InvalidArgument(field="probe.vector")``.
* A search never returns an entry that is removed, not yet fully inserted, inactive (lifted),
  expired at the ``now`` of the search (no restart or sweep needed), or — when asked — whose
  subject objected (R7) unless that subject is exempted by name. Candidates are filtered
  before scoring; when filtering leaves fewer than ``k`` candidates that could still pass the
  threshold, the search is repeated with the filter inside the HNSW traversal, so filtered
  entries never crowd out allowed ones.
* Scores are recomputed exactly (float64 dot product with the stored unit vector) before the
  threshold and top-k are applied.
* hnswlib's ``knn_query`` is not safe against concurrent ``add_items``/``mark_deleted``/
  ``resize_index``: searches hold a readers–writer lock shared, every index mutation holds it
  exclusively, in small batches so searches interleave with a long catch-up. All mutations
  are also serialised by one re-entrant lock (``changes()``), which snapshots and compaction
  hold to see a state consistent with ``applied_seq``.
* Templates are in clear only in this process's memory; nothing here writes to disk.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Any

import hnswlib
import numpy as np
import numpy.typing as npt

from centinela.errors import InvalidArgument, ModelMismatch
from centinela.matcher import multimap
from centinela.matcher.rwlock import RWLock

VISIBLE = np.uint8(1)
ACTIVE = np.uint8(2)
OBJECTOR = np.uint8(4)
#: Candidates fetched from HNSW beyond ``k`` before filtering and exact re-scoring.
CANDIDATE_MARGIN = 16
EF_CANDIDATES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768)
#: Survivors re-scored exactly beyond ``k`` (near-ties in float32 may reorder).
RESCORE_MARGIN = 4
#: float32 scoring error tolerated before the exact threshold.
RESCORE_SLACK = 1e-3
DEFAULT_CHUNK = 256
#: Bounds of an adaptive chunk (``add_batch(max_hold_s=...)``).
MIN_CHUNK, MAX_CHUNK = 16, 4096
METRICS = ("cosine",)


def exact_scores(stored: npt.ArrayLike, q: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The exact cosine of each stored (unit) vector with the unit probe ``q``, in [-1, 1].

    The same pair always gets the same float, whatever else is scored beside it. A matrix
    product does not promise that: BLAS sums a row in an order that depends on the batch's
    shape and alignment (with numpy 2.4, 79 % of rows differed in the last bit between a
    batch of one and a batch of several), so a threshold set at a score reported earlier
    could drop that very candidate on the next search. An elementwise product, exactly
    rounded, summed per row by numpy's pairwise reduction, is the same per row in any batch.
    """
    rows = np.asarray(stored, dtype=np.float64)
    scores: npt.NDArray[np.float64] = np.clip((rows * q).sum(axis=1), -1.0, 1.0)
    return scores


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result: a template, its pseudonymous subject, and its exact cosine score."""

    template_id: str
    subject_ref: str
    score: float


@dataclasses.dataclass(frozen=True)
class GalleryItem:
    """A template to index, with the state the search filters on."""

    template_id: str
    subject_ref: str
    vector: npt.NDArray[np.float32]
    active: bool = True
    expires_at: dt.datetime | None = None
    objector: bool = False


def epoch(when: dt.datetime | None) -> float:
    """Seconds since the epoch; ``None`` (never expires) is +inf; naive datetimes are UTC."""
    if when is None:
        return math.inf
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


class FaceGallery:
    """An HNSW face gallery of one model; thread-safe for concurrent search and updates."""

    def __init__(
        self,
        name: str,
        model_id: str,
        dim: int,
        metric: str = "cosine",
        *,
        M: int = 16,
        ef_construction: int = 200,
        ef: int = 64,
        capacity: int = 1024,
        compact_ratio: float = 0.25,
        compact_min: int = 256,
        num_threads: int = -1,
    ) -> None:
        if metric not in METRICS:
            raise InvalidArgument(f"unsupported metric {metric!r}", field="metric")
        if dim < 1:
            raise InvalidArgument("dimension must be positive", field="dim")
        self.name = name
        self.model_id = model_id
        self.dim = dim
        self.metric = metric
        self.M = M
        self.ef_construction = ef_construction
        self.num_threads = num_threads
        self.compact_ratio = compact_ratio
        self.compact_min = compact_min
        #: Highest store change sequence reflected here (set by the service).
        self.applied_seq = 0
        self._rw = RWLock()
        self._mutation = threading.RLock()
        self._index = self._new_index(max(capacity, 16))
        self._index.set_ef(ef)
        self._flags = np.zeros(max(capacity, 16), dtype=np.uint8)
        self._expires = np.full(max(capacity, 16), math.inf, dtype=np.float64)
        self._tid: list[str] = []
        self._sref: list[str] = []
        self._label_of: dict[str, int] = {}
        # Labels per subject as tuples, not sets: untracked by the GC (see multimap).
        self._by_subject: dict[str, tuple[int, ...]] = {}
        self._deleted_slots = 0

    def _new_index(self, capacity: int) -> Any:
        index = hnswlib.Index(space=self.metric, dim=self.dim)
        index.init_index(
            max_elements=capacity,
            M=self.M,
            ef_construction=self.ef_construction,
            allow_replace_deleted=True,
        )
        return index

    # ---- introspection --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._label_of)

    def searchable(self, now: dt.datetime) -> int:
        """Entries a search at ``now`` may return: visible, active and unexpired (objectors
        included). One pass over the flag arrays, about a millisecond a million slots.

        Taken without the index lock, so that a report never waits for an import: a change
        made meanwhile may or may not be counted.
        """
        flags, expires = self._flags, self._expires
        n = min(len(flags), len(expires))
        both = VISIBLE | ACTIVE
        ok = (flags[:n] & both) == both
        return int(np.count_nonzero(ok & (expires[:n] > epoch(now))))

    @property
    def ef(self) -> int:
        return int(self._index.ef)

    def set_ef(self, ef: int) -> None:
        """Set the search breadth (recall/speed trade-off)."""
        with self._rw.write():
            self._index.set_ef(int(ef))

    def __contains__(self, template_id: object) -> bool:
        return template_id in self._label_of

    def template_ids(self) -> list[str]:
        """Ids of the indexed templates."""
        with self._rw.read():
            return list(self._label_of)

    def memory_bytes(self) -> int:
        """Bytes held: the HNSW structure (vectors and links) plus label metadata (estimate)."""
        with self._rw.read():
            index = int(self._index.index_file_size())
            meta = self._flags.nbytes + self._expires.nbytes
            # Python strings of template and subject ids (~49 bytes of header each), and the
            # two dictionaries that map them to labels (~100 bytes an entry).
            per_id = 49 + len(self._tid[0]) if self._tid else 0
            ids = 2 * per_id * len(self._tid)
            maps = 100 * len(self._label_of)
            return index + meta + ids + maps

    @contextmanager
    def changes(self) -> Iterator[None]:
        """Hold off every other mutation (compaction, snapshots, the catch-up) for a while."""
        with self._mutation:
            yield

    # ---- validation -----------------------------------------------------------------------

    def check_model(self, model_id: str | None) -> None:
        """Raise :class:`ModelMismatch` when ``model_id`` is given and is not the gallery's."""
        if model_id is not None and model_id != self.model_id:
            raise ModelMismatch(
                f"probe model does not match gallery {self.name}'s model", field="probe.model_id"
            )

    def _prepare(self, probe: npt.ArrayLike, field: str = "probe.vector") -> npt.NDArray[Any]:
        q = np.asarray(probe, dtype=np.float64)
        if q.ndim == 2 and q.shape[0] == 1:
            q = q[0]
        if q.ndim != 1 or q.shape[0] != self.dim:
            raise InvalidArgument(
                f"vector must have {self.dim} values for gallery {self.name}", field=field
            )
        if not np.all(np.isfinite(q)):
            raise InvalidArgument("vector has a non-finite value", field=field)
        norm = float(np.linalg.norm(q))
        if norm == 0.0:
            raise InvalidArgument("vector is zero", field=field)
        return q / norm

    # ---- updates ------------------------------------------------------------------------

    def add(self, items: Sequence[GalleryItem], *, chunk: int = DEFAULT_CHUNK) -> int:
        """Index ``items``; an id already present only has its state updated. Returns new count."""
        if not items:
            return 0
        vectors = np.stack([np.asarray(i.vector, dtype=np.float32).ravel() for i in items])
        return self.add_batch(
            [i.template_id for i in items],
            [i.subject_ref for i in items],
            vectors,
            active=np.array([i.active for i in items], dtype=bool),
            expires=np.array([epoch(i.expires_at) for i in items], dtype=np.float64),
            objector=np.array([i.objector for i in items], dtype=bool),
            chunk=chunk,
        )

    def add_batch(
        self,
        template_ids: Sequence[str],
        subject_refs: Sequence[str],
        vectors: npt.NDArray[np.float32],
        *,
        active: npt.NDArray[np.bool_] | None = None,
        expires: npt.NDArray[np.float64] | None = None,
        objector: npt.NDArray[np.bool_] | None = None,
        chunk: int = DEFAULT_CHUNK,
        max_hold_s: float | None = None,
        inserter: Executor | None = None,
    ) -> int:
        """Columnar :meth:`add` (``expires`` in epoch seconds, +inf for never).

        New templates are inserted ``chunk`` at a time with hnswlib's multi-threaded
        ``add_items``; each chunk becomes visible to searches only once fully inserted. With
        ``max_hold_s``, the chunk size follows the measured insertion time so that each chunk
        holds the searches off for about that long (insertion slows as the graph grows). With
        ``inserter``, hnswlib runs on that executor's thread (its insertion threads inherit
        that thread's CPU priority) while this one waits without the GIL.

        Raises:
            InvalidArgument: a vector has the wrong dimension or a non-finite value.
        """
        n = len(template_ids)
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(n, -1)
        if vecs.shape[1] != self.dim:
            raise InvalidArgument(f"vector must have {self.dim} values", field="template.vector")
        if not np.all(np.isfinite(vecs)):
            raise InvalidArgument("vector has a non-finite value", field="template.vector")
        act = np.ones(n, dtype=bool) if active is None else np.asarray(active, dtype=bool)
        exp = np.full(n, math.inf) if expires is None else np.asarray(expires, dtype=np.float64)
        obj = np.zeros(n, dtype=bool) if objector is None else np.asarray(objector, dtype=bool)
        flags = (ACTIVE * act.astype(np.uint8)) | (OBJECTOR * obj.astype(np.uint8))
        added = 0
        with self._mutation:
            last: dict[str, int] = {}
            for i, tid in enumerate(template_ids):
                last[tid] = i
            fresh: list[int] = []
            with self._rw.write():
                for tid, i in last.items():
                    label = self._label_of.get(tid)
                    if label is None:
                        fresh.append(i)
                    else:
                        self._flags[label] = VISIBLE | flags[i]
                        self._expires[label] = exp[i]
            size, start = max(1, chunk), 0
            while start < len(fresh):
                part = np.asarray(fresh[start : start + size], dtype=np.int64)
                start += len(part)
                with self._rw.write():
                    began = time.perf_counter()
                    labels = self._reserve(len(part))
                    for i in part.tolist():
                        self._tid.append(template_ids[i])
                        self._sref.append(subject_refs[i])
                    self._flags[labels] = flags[part]  # not VISIBLE yet
                    self._expires[labels] = exp[part]
                    insert = functools.partial(
                        self._index.add_items,
                        vecs[part],
                        labels,
                        num_threads=self.num_threads,
                        replace_deleted=True,
                    )
                    if inserter is None:
                        insert()
                    else:
                        inserter.submit(insert).result()
                    self._deleted_slots -= min(self._deleted_slots, len(part))
                    self._flags[labels] |= VISIBLE
                    for label, i in zip(labels.tolist(), part.tolist(), strict=True):
                        self._label_of[template_ids[i]] = label
                        multimap.add(self._by_subject, subject_refs[i], label)
                added += len(part)
                if max_hold_s:
                    per_item = (time.perf_counter() - began) / len(part)
                    size = int(min(MAX_CHUNK, max(MIN_CHUNK, max_hold_s / max(per_item, 1e-9))))
        return added

    def reserve(self, count: int) -> None:
        """Make room for ``count`` more entries now (one resize of the index; the searches
        wait for it once)."""
        with self._mutation, self._rw.write():
            need = len(self._tid) + count
            if need > len(self._flags):
                grow = need - len(self._flags)
                self._flags = np.concatenate([self._flags, np.zeros(grow, np.uint8)])
                self._expires = np.concatenate([self._expires, np.full(grow, math.inf)])
            slots = int(self._index.element_count) + max(0, count - self._deleted_slots)
            if slots > int(self._index.max_elements):
                self._index.resize_index(slots)

    def _reserve(self, count: int) -> npt.NDArray[np.int64]:
        """Allocate ``count`` fresh labels and make room in the index (write lock held)."""
        first = len(self._tid)
        need = first + count
        if need > len(self._flags):
            size = max(need, int(len(self._flags) * 1.5) + 16)
            self._flags = np.concatenate([self._flags, np.zeros(size - len(self._flags), np.uint8)])
            self._expires = np.concatenate(
                [self._expires, np.full(size - len(self._expires), math.inf)]
            )
        slots = int(self._index.element_count) + max(0, count - self._deleted_slots)
        if slots > int(self._index.max_elements):
            self._index.resize_index(max(slots, int(self._index.max_elements * 1.5) + 16))
        return np.arange(first, need, dtype=np.int64)

    def remove(self, template_id: str) -> bool:
        """Remove a template at once (``mark_deleted``); False if it was not indexed."""
        with self._mutation, self._rw.write():
            return self._remove_locked(template_id)

    def _remove_locked(self, template_id: str) -> bool:
        label = self._label_of.pop(template_id, None)
        if label is None:
            return False
        self._flags[label] = 0
        self._index.mark_deleted(label)
        self._deleted_slots += 1
        multimap.discard(self._by_subject, self._sref[label], label)
        return True

    def remove_many(self, template_ids: Sequence[str]) -> int:
        """Remove several templates under one lock; returns how many were indexed."""
        with self._mutation, self._rw.write():
            return sum(self._remove_locked(t) for t in template_ids)

    def clear(self) -> None:
        """Drop every entry (crypto-shredding of the owner): a fresh empty index."""
        with self._mutation, self._rw.write():
            ef = self.ef
            self._index = self._new_index(1024)
            self._index.set_ef(ef)
            self._flags = np.zeros(1024, dtype=np.uint8)
            self._expires = np.full(1024, math.inf)
            self._tid, self._sref = [], []
            self._label_of, self._by_subject = {}, {}
            self._deleted_slots = 0

    def set_state(self, template_id: str, *, active: bool, expires_at: dt.datetime | None) -> bool:
        """Change an entry's active flag and expiry (lift, renew); False if not indexed."""
        with self._mutation, self._rw.write():
            label = self._label_of.get(template_id)
            if label is None:
                return False
            keep = self._flags[label] & (VISIBLE | OBJECTOR)
            self._flags[label] = keep | (ACTIVE if active else np.uint8(0))
            self._expires[label] = epoch(expires_at)
            return True

    def set_template_objector(self, template_id: str, objector: bool) -> bool:
        """Set one entry's objector flag (as replayed from the store); False if not indexed."""
        with self._mutation, self._rw.write():
            label = self._label_of.get(template_id)
            if label is None:
                return False
            if objector:
                self._flags[label] |= OBJECTOR
            else:
                self._flags[label] &= ~OBJECTOR
            return True

    def set_objector(self, subject_ref: str, objector: bool) -> int:
        """Record or withdraw a subject's objection (R7); returns how many entries changed."""
        with self._mutation, self._rw.write():
            labels = list(self._by_subject.get(subject_ref, ()))
            for label in labels:
                if objector:
                    self._flags[label] |= OBJECTOR
                else:
                    self._flags[label] &= ~OBJECTOR
            return len(labels)

    # ---- search -------------------------------------------------------------------------

    def _allowed(
        self,
        labels: npt.NDArray[np.uint64],
        now_ts: float,
        exclude_objectors: bool,
        exempt: frozenset[str],
    ) -> npt.NDArray[np.bool_]:
        flags = self._flags[labels]
        ok: npt.NDArray[np.bool_] = (
            ((flags & VISIBLE) != 0) & ((flags & ACTIVE) != 0) & (self._expires[labels] > now_ts)
        )
        if exclude_objectors:
            objecting = ok & ((flags & OBJECTOR) != 0)
            for pos in np.flatnonzero(objecting):
                if self._sref[int(labels[pos])] not in exempt:
                    ok[pos] = False
        return ok

    def _knn(self, q: npt.NDArray[Any], kq: int, flt: Any = None) -> tuple[Any, Any]:
        while True:
            try:
                labels, dists = self._index.knn_query(q, k=kq, num_threads=1, filter=flt)
                return labels[0], dists[0]
            except RuntimeError:
                # Fewer than kq reachable entries (deleted or filtered ones): ask for fewer.
                if kq <= 1:
                    return np.empty(0, np.uint64), np.empty(0, np.float32)
                kq = max(1, kq // 2)

    def search(
        self,
        probe: npt.ArrayLike,
        *,
        k: int,
        min_score: float,
        now: dt.datetime,
        exclude_objectors: bool = False,
        exempt_subjects: frozenset[str] = frozenset(),
        model_id: str | None = None,
        wait: bool = True,
    ) -> list[Hit]:
        """Top-``k`` allowed entries scoring at least ``min_score``, best first.

        With ``wait=False`` the search runs only if no writer holds or awaits the index.

        Raises:
            ModelMismatch: ``model_id`` is given and differs from the gallery's.
            InvalidArgument: wrong dimension, non-finite or zero probe, or ``k`` < 1.
            WouldBlock: ``wait`` is false and a writer holds or awaits the index.
        """
        self.check_model(model_id)
        q = self._prepare(probe)
        if k < 1:
            raise InvalidArgument("k must be at least 1", field="k")
        now_ts = epoch(now)
        q32 = q.astype(np.float32)[None, :]
        with self._rw.read() if wait else self._rw.read_now():
            live = len(self._label_of)
            if live == 0:
                return []
            kq = min(live, max(k + CANDIDATE_MARGIN, 2 * k))
            labels, dists = self._knn(q32, kq)
            # HNSW gives its candidates best first. When even the best cannot reach the
            # threshold, no filtering, wider search or re-scoring can change the (empty)
            # answer: most probes are of nobody listed, and this skips all of that for them.
            if len(dists) == 0 or 1.0 - float(dists[0]) < min_score - RESCORE_SLACK:
                return []
            ok = self._allowed(labels, now_ts, exclude_objectors, exempt_subjects)
            could_miss = len(labels) and (1.0 - float(dists[-1])) >= min_score
            if int(ok.sum()) < min(k, len(labels)) and could_miss and kq < live:
                allowed_all = self._allowed(
                    np.fromiter(self._label_of.values(), np.uint64, live),
                    now_ts,
                    exclude_objectors,
                    exempt_subjects,
                )
                n_ok = int(allowed_all.sum())
                if n_ok == 0:
                    return []

                def flt(label: int) -> bool:
                    one = np.array([label], dtype=np.uint64)
                    return bool(self._allowed(one, now_ts, exclude_objectors, exempt_subjects)[0])

                labels, dists = self._knn(q32, min(kq, n_ok), flt)
                ok = self._allowed(labels, now_ts, exclude_objectors, exempt_subjects)
            # hnswlib's float32 scores pick the survivors; the exact score decides. Fetching a
            # stored vector costs ~40 µs, so only plausible survivors are re-scored.
            approx = 1.0 - dists.astype(np.float64)
            keep = ok & (approx >= min_score - RESCORE_SLACK)
            labels = labels[keep][: k + RESCORE_MARGIN]
            if len(labels) == 0:
                return []
            stored = self._index.get_items(labels, return_type="numpy")
            scores = exact_scores(stored, q)
            order = np.argsort(-scores, kind="stable")[:k]
            return [
                Hit(self._tid[int(labels[i])], self._sref[int(labels[i])], float(scores[i]))
                for i in order
                if scores[i] >= min_score
            ]

    def best_scores(
        self, probes: npt.ArrayLike, *, now: dt.datetime, rows_per_lock: int = 64
    ) -> npt.NDArray[np.float64]:
        """Each probe's best exact score among the entries a search at ``now`` may return,
        -1.0 where there is none: ``search(probe, k=1, min_score=-1.0)``'s score, row by row,
        for a batch (a calibration's non-mated set) in one index pass per ``rows_per_lock``
        rows, so a writer waits for at most that many searches.

        The same candidates are re-scored as ``search`` would: the first ``1 +
        RESCORE_MARGIN`` allowed ones of the ``1 + CANDIDATE_MARGIN`` HNSW returns. A row
        whose candidates are all excluded (inactive, expired) is searched by ``search``
        itself, with the filter inside the traversal.

        Raises:
            InvalidArgument: not a 2-D batch of this dimension, or a non-finite or zero row.
        """
        raw = np.asarray(probes, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != self.dim:
            raise InvalidArgument(
                f"probes must be rows of {self.dim} values for gallery {self.name}",
                field="probes",
            )
        # Each row's norm as ``_prepare`` takes it (a vector norm, not a batched one, whose
        # last bit can differ), so a row is scaled to the very probe ``search`` would use.
        norms = np.array([np.linalg.norm(row) for row in raw])
        if not np.all(np.isfinite(norms)) or np.any(norms == 0.0):
            raise InvalidArgument("a probe is non-finite or zero", field="probes")
        qs = raw / norms[:, None]
        out = np.full(len(qs), -1.0)
        now_ts = epoch(now)
        fallback: list[int] = []
        for start in range(0, len(qs), max(1, rows_per_lock)):
            part = slice(start, start + max(1, rows_per_lock))
            fallback += [start + i for i in self._best_rows(qs[part], now_ts, out[part])]
        for i in fallback:
            hits = self.search(raw[i], k=1, min_score=-1.0, now=now)
            out[i] = hits[0].score if hits else -1.0
        return out

    def _best_rows(
        self, qs: npt.NDArray[np.float64], now_ts: float, out: npt.NDArray[np.float64]
    ) -> list[int]:
        """Fill ``out`` (a view) with the rows' best scores; return the rows left to
        ``search`` (no allowed candidate among those HNSW returned)."""
        with self._rw.read():
            live = len(self._label_of)
            if live == 0:
                return []
            try:
                labels, _ = self._index.knn_query(
                    qs.astype(np.float32), k=min(live, 1 + CANDIDATE_MARGIN), num_threads=1
                )
            except RuntimeError:  # fewer reachable entries than asked for: row by row
                return list(range(len(qs)))
            labels = np.asarray(labels, dtype=np.uint64)
            ok = self._allowed(labels.ravel(), now_ts, False, frozenset()).reshape(labels.shape)
            take = ok & (np.cumsum(ok, axis=1) <= 1 + RESCORE_MARGIN)
            rows, cols = np.nonzero(take)
            if len(rows):
                stored = np.asarray(
                    self._index.get_items(labels[rows, cols], return_type="numpy"),
                    dtype=np.float64,
                )
                # Row by row the same arithmetic as exact_scores (elementwise, then a
                # pairwise sum per row), so a score is the same float ``search`` reports.
                scores = np.clip((stored * qs[rows]).sum(axis=1), -1.0, 1.0)
                np.maximum.at(out, rows, scores)
        return [int(i) for i in np.flatnonzero(~take.any(axis=1))]

    def verify(
        self, subject_ref: str, probe: npt.ArrayLike, *, model_id: str | None = None
    ) -> float | None:
        """Best exact score of ``probe`` against the subject's templates; None if it has none.

        Raises:
            ModelMismatch: ``model_id`` is given and differs from the gallery's.
            InvalidArgument: the probe is malformed.
        """
        self.check_model(model_id)
        q = self._prepare(probe)
        with self._rw.read():
            labels = sorted(self._by_subject.get(subject_ref, ()))
            if not labels:
                return None
            stored = self._index.get_items(labels, return_type="numpy")
            return float(np.max(exact_scores(stored, q)))

    def vectors_of(self, subject_ref: str) -> list[npt.NDArray[np.float32]]:
        """The indexed (decrypted, in-memory) templates of one subject, in label order.

        Used to copy a registry subject's face into a watchlist entry without a photo; the
        caller audits that link.
        """
        with self._rw.read():
            labels = sorted(self._by_subject.get(subject_ref, ()))
            if not labels:
                return []
            stored = self._index.get_items(labels, return_type="numpy")
        return [np.asarray(v, dtype=np.float32) for v in stored]

    # ---- tuning and compaction ----------------------------------------------------------

    def tune_ef(
        self,
        *,
        target: float = 0.999,
        sample: int = 1000,
        seed: int = 0,
        cosine: tuple[float, float] = (0.5, 0.55),
        candidates: Sequence[int] = EF_CANDIDATES,
    ) -> int:
        """Choose the smallest ``ef`` whose hit rate on a sample reaches ``target``; set it.

        The sample is genuine-like probes made from stored templates (noise orthogonal to the
        template, cosine in ``cosine``); a hit is the source template among the candidates a
        search fetches. At most ``(1 - target) * sample`` misses are allowed (rounded down).
        """
        from centinela.matcher.synth import genuine_probes

        with self._mutation:
            with self._rw.read():
                live = np.fromiter(self._label_of.values(), np.uint64, len(self._label_of))
                if len(live) < 2:
                    return self.ef
                rng = np.random.default_rng(seed)
                chosen_labels = rng.choice(live, size=min(sample, len(live)), replace=False)
                stored = self._index.get_items(chosen_labels, return_type="numpy")
            probes = genuine_probes(np.asarray(stored, np.float32), seed=seed + 1, cosine=cosine)
            kq = min(len(live), 1 + CANDIDATE_MARGIN)
            allowed_misses = math.floor((1.0 - target) * len(chosen_labels) + 1e-9)
            best = int(candidates[-1])
            for ef in candidates:
                with self._rw.write():
                    self._index.set_ef(int(ef))
                with self._rw.read():
                    found, _ = self._index.knn_query(probes, k=kq, num_threads=self.num_threads)
                misses = int(np.sum(~np.any(found == chosen_labels[:, None], axis=1)))
                if misses <= allowed_misses:
                    # One step above the first passing value: a 1,000-probe sample cannot
                    # resolve a 0.1 % miss rate, so keep a margin.
                    pos = list(candidates).index(ef)
                    best = int(candidates[min(pos + 1, len(candidates) - 1)])
                    break
            with self._rw.write():
                self._index.set_ef(best)
            return best

    def needs_compaction(self) -> bool:
        """True when deleted slots not yet reused pass the threshold."""
        total = int(self._index.element_count)
        return self._deleted_slots >= self.compact_min and (
            self._deleted_slots > self.compact_ratio * max(total, 1)
        )

    def compact(self) -> None:
        """Rebuild the index from the live entries with dense labels; searches go on meanwhile.

        Writers wait (``changes()`` is held); the old index serves searches until the swap.
        """
        with self._mutation:
            with self._rw.read():
                live = list(self._label_of.items())
                old = np.array([label for _, label in live], dtype=np.uint64)
                ef = self.ef
            index = self._new_index(max(len(live), 16))
            for start in range(0, len(old), 4096):
                part = old[start : start + 4096]
                with self._rw.read():
                    vecs = self._index.get_items(part, return_type="numpy")
                index.add_items(
                    vecs, np.arange(start, start + len(part)), num_threads=self.num_threads
                )
            index.set_ef(ef)
            with self._rw.write():
                self._index = index
                self._flags = np.concatenate([self._flags[old], np.zeros(16, np.uint8)])
                self._expires = np.concatenate([self._expires[old], np.full(16, math.inf)])
                self._tid = [self._tid[int(x)] for x in old]
                self._sref = [self._sref[int(x)] for x in old]
                self._label_of = {tid: i for i, (tid, _) in enumerate(live)}
                self._by_subject = {}
                for i, sref in enumerate(self._sref):
                    multimap.add(self._by_subject, sref, i)
                self._deleted_slots = 0

    # ---- state for snapshots ------------------------------------------------------------

    def export_state(self) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
        """Scalars and arrays that :meth:`from_state` rebuilds this gallery from.

        Call inside :meth:`changes` to pair the state with ``applied_seq``.
        """
        with self._mutation, self._rw.read():
            (hstate,) = self._index.__getstate__()
            n = len(self._tid)
            meta: dict[str, Any] = {
                "name": self.name,
                "model_id": self.model_id,
                "dim": self.dim,
                "metric": self.metric,
                "M": self.M,
                "ef_construction": self.ef_construction,
                "ef": self.ef,
                "applied_seq": self.applied_seq,
                "deleted_slots": self._deleted_slots,
                "labels": n,
                "hnsw": {k: v for k, v in hstate.items() if not isinstance(v, np.ndarray)},
            }
            arrays: dict[str, npt.NDArray[Any]] = {
                f"hnsw.{k}": v for k, v in hstate.items() if isinstance(v, np.ndarray)
            }
            arrays["flags"] = self._flags[:n].copy()
            arrays["expires"] = self._expires[:n].copy()
            arrays["tid"] = np.frombuffer("\n".join(self._tid).encode(), dtype=np.uint8)
            arrays["sref"] = np.frombuffer("\n".join(self._sref).encode(), dtype=np.uint8)
            return meta, arrays

    @classmethod
    def from_state(
        cls, meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]], *, num_threads: int = -1
    ) -> FaceGallery:
        """Rebuild a gallery exported by :meth:`export_state` (already authenticated)."""
        g = cls(
            meta["name"],
            meta["model_id"],
            int(meta["dim"]),
            meta["metric"],
            M=int(meta["M"]),
            ef_construction=int(meta["ef_construction"]),
            capacity=16,
            num_threads=num_threads,
        )
        hstate = dict(meta["hnsw"])
        hstate.update({k[5:]: v for k, v in arrays.items() if k.startswith("hnsw.")})
        index = hnswlib.Index.__new__(hnswlib.Index)
        index.__setstate__((hstate,))
        index.set_ef(int(meta["ef"]))
        g._index = index
        n = int(meta["labels"])
        g._flags = np.concatenate([arrays["flags"].astype(np.uint8), np.zeros(16, np.uint8)])
        g._expires = np.concatenate([arrays["expires"].astype(np.float64), np.full(16, math.inf)])
        g._tid = bytes(arrays["tid"]).decode().split("\n") if n else []
        g._sref = bytes(arrays["sref"]).decode().split("\n") if n else []
        if len(g._tid) != n or len(g._sref) != n:
            raise ValueError("snapshot label tables are inconsistent")
        visible = np.flatnonzero(g._flags[:n] & VISIBLE)
        g._label_of = {g._tid[i]: int(i) for i in visible.tolist()}
        for i in visible.tolist():
            multimap.add(g._by_subject, g._sref[i], int(i))
        g._deleted_slots = int(meta["deleted_slots"])
        g.applied_seq = int(meta["applied_seq"])
        return g
