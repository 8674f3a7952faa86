"""The matcher facade: owns the galleries, starts them, keeps them in step with the store.

Invariants (DESIGN.md §2 step 5, §4; LEGAL_RULES R4, R6, R7, R13):

* Start-up loads each face gallery from its encrypted snapshot when the snapshot is
  authentic, belongs to this store, gallery and model, and is not ahead of the store; any
  other snapshot is rejected and the gallery is rebuilt from the encrypted store. Changes
  after the snapshot's high-water mark are then replayed, so the result equals a rebuild.
* Ingestion is decoupled from indexing: the store acknowledges durable templates; the
  catch-up (in the background or on demand) applies the change log in ``seq`` order, bulk
  inserting with hnswlib's multi-threaded ``add_items``; :meth:`Matcher.index_lag` says how
  many durable changes are not yet searchable. A template becomes visible to searches only
  once fully inserted.
* A row that fails to decrypt (wrong key, moved or altered ciphertext, shredded owner) is
  never indexed; it is counted and logged without content.
* Searches refuse to run before start-up finished (``Unavailable``), refuse other models
  (``ModelMismatch``) and malformed probes (``InvalidArgument``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog

from centinela.errors import (
    DecryptionError,
    InvalidArgument,
    KeyManagementError,
    NotFound,
    Unavailable,
)
from centinela.matcher.gallery import FaceGallery, Hit
from centinela.matcher.plate_records import PlateChange
from centinela.matcher.plates import PlateHit, PlateIndex, PlateRead
from centinela.matcher.snapshot import SnapshotInfo, SnapshotRejected, read_snapshot, write_snapshot
from centinela.matcher.store import TemplateChange, TemplateStore

log = structlog.get_logger("centinela.matcher")

WATCHLIST = "pnp_watchlist"
REGISTRY = "reniec_registry"
VEHICLES = "stolen_vehicles"
DEFAULT_FACE_MODEL = "arcface-w600k_r50"


@dataclasses.dataclass(frozen=True)
class FaceGallerySpec:
    """A face gallery's fixed identity: name, data owner, model, dimension, metric."""

    name: str
    owner: str
    model_id: str
    dim: int = 512
    metric: str = "cosine"


def default_galleries(model_id: str = DEFAULT_FACE_MODEL, dim: int = 512) -> list[FaceGallerySpec]:
    """The PNP watchlist and the Reniec registry, both of ``model_id``."""
    return [
        FaceGallerySpec(WATCHLIST, "pnp", model_id, dim),
        FaceGallerySpec(REGISTRY, "reniec", model_id, dim),
    ]


@dataclasses.dataclass(frozen=True)
class StartProgress:
    """Progress of start-up: ``phase`` is ``snapshot``, ``rebuild``, ``replay`` or ``ready``."""

    phase: str
    gallery: str
    done: int
    total: int


@dataclasses.dataclass(frozen=True)
class HnswSettings:
    """Build and search parameters of the face galleries."""

    M: int = 16
    ef_construction: int = 100
    ef: int = 64
    tune_ef: bool = True
    tune_min_size: int = 2000
    #: Niceness of the background catch-up's insertion threads (hnswlib's, which inherit it
    #: from the thread that calls it): they use every idle core, an import comes first. The
    #: catch-up's own Python work runs at normal priority (a low-priority thread holding the
    #: GIL would hold every other thread of the server).
    catch_up_nice: int = 10
    #: How long one insertion chunk may hold a gallery's searches off (adaptive chunk size;
    #: the gallery's lock lets waiting searches in between chunks).
    max_hold_s: float = 0.025
    #: The background catch-up waits while bulk batches arrive closer than this apart (the
    #: import has the machine; its templates are indexed when it pauses or ends) …
    bulk_quiet_s: float = 0.5
    #: … but not longer than this in a row: searches never miss a durable template longer.
    bulk_defer_max_s: float = 300.0


ProgressFn = Callable[[StartProgress], None]
#: A backlog this large grows the index to its final size at once.
RESERVE_AT = 10_000


class Matcher:
    """Face galleries and the plate index over one :class:`TemplateStore`. Thread-safe."""

    def __init__(
        self,
        store: TemplateStore,
        *,
        galleries: Sequence[FaceGallerySpec] | None = None,
        snapshot_dir: Path | None = None,
        hnsw: HnswSettings | None = None,
        plate_max_distance: float = 0.75,
        batch: int = 4096,
        chunk: int = 256,
        num_threads: int = -1,
    ) -> None:
        self.store = store
        self.specs = {s.name: s for s in (galleries or default_galleries())}
        self.snapshot_dir = snapshot_dir
        self.hnsw = hnsw or HnswSettings()
        self.batch = batch
        self.chunk = chunk
        self.num_threads = num_threads
        self.plates = PlateIndex(max_distance=plate_max_distance)
        self.plates_seq = 0
        self.rejected_rows = 0
        self._galleries: dict[str, FaceGallery] = {}
        self._tuned_size: dict[str, int] = {}
        # One catch-up lock per index, so a lift waits for the watchlist's catch-up only,
        # never for a registry bulk load.
        self._catch_locks = {name: threading.RLock() for name in self.specs}
        self._plates_lock = threading.RLock()
        self._started = False
        self._wake = threading.Event()
        self._inserter: ThreadPoolExecutor | None = None
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="matcher-load")
        self._bulk_until = self._bulk_since = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- galleries ------------------------------------------------------------------------

    def _new_gallery(self, spec: FaceGallerySpec) -> FaceGallery:
        return FaceGallery(
            spec.name,
            spec.model_id,
            spec.dim,
            spec.metric,
            M=self.hnsw.M,
            ef_construction=self.hnsw.ef_construction,
            ef=self.hnsw.ef,
            num_threads=self.num_threads,
        )

    def gallery(self, name: str) -> FaceGallery:
        """The face gallery ``name``.

        Raises:
            InvalidArgument: no such face gallery.
            Unavailable: start-up has not finished.
        """
        if not self._started:
            raise Unavailable("the matcher is still starting")
        g = self._galleries.get(name)
        if g is None:
            raise InvalidArgument("unknown face gallery", field="gallery")
        return g

    @property
    def galleries(self) -> Mapping[str, FaceGallery]:
        return dict(self._galleries)

    def _snapshot_path(self, name: str) -> Path | None:
        return None if self.snapshot_dir is None else self.snapshot_dir / f"{name}.snapshot"

    # ---- start-up -----------------------------------------------------------------------

    def start(self, progress: ProgressFn | None = None) -> None:
        """Load snapshots (or rebuild), replay later changes, build the plate index."""
        report = progress or (lambda _p: None)
        rebuilt: list[str] = []
        for name, spec in self.specs.items():
            g = self._load_snapshot(spec, report)
            if g is None:
                g = self._new_gallery(spec)
                rebuilt.append(name)
            self._galleries[name] = g
        for name, g in self._galleries.items():
            phase = "rebuild" if name in rebuilt else "replay"
            total = self.store.count_changes_since(g.applied_seq, gallery=name)
            self._catch_up_gallery(g, _progress(report, phase, name, total))
            if name in rebuilt:
                self._maybe_tune(g)
            else:
                self._tuned_size[name] = len(g)  # the snapshot carries its tuned ef
        self._catch_up_plates()
        self._started = True
        for name, g in self._galleries.items():
            report(StartProgress("ready", name, len(g), len(g)))
            log.info("matcher.gallery_ready", gallery=name, entries=len(g), ef=g.ef)

    def _load_snapshot(self, spec: FaceGallerySpec, report: ProgressFn) -> FaceGallery | None:
        path = self._snapshot_path(spec.name)
        if path is None or not path.exists():
            return None
        try:
            g = read_snapshot(
                path,
                gallery=spec.name,
                model_id=spec.model_id,
                dim=spec.dim,
                owner=spec.owner,
                store_id=self.store.store_id,
                store_seq=self.store.max_seq(),
                key_lookup=lambda kid: self.store.keyring.key(spec.owner, kid),
                progress=lambda done, total: report(
                    StartProgress("snapshot", spec.name, done, total)
                ),
                num_threads=self.num_threads,
            )
        except SnapshotRejected as exc:
            log.warning("matcher.snapshot_rejected", gallery=spec.name, reason=str(exc))
            return None
        return g

    def save_snapshots(self) -> list[SnapshotInfo]:
        """Write an encrypted snapshot of every face gallery (atomic replace)."""
        if self.snapshot_dir is None:
            return []
        self.snapshot_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        out = []
        for name, g in self._galleries.items():
            owner = self.specs[name].owner
            key_id, key = self.store.keyring.current(owner, "data")
            path = self._snapshot_path(name)
            assert path is not None
            out.append(
                write_snapshot(
                    path, g, owner=owner, key_id=key_id, data_key=key, store_id=self.store.store_id
                )
            )
        return out

    # ---- catch-up -----------------------------------------------------------------------

    def catch_up(self, galleries: Sequence[str] | None = None, *, plates: bool = True) -> int:
        """Index every durable change not yet applied (of ``galleries``, default all, and of
        the plates); returns how many were applied."""
        chosen = [
            g for name, g in list(self._galleries.items()) if galleries is None or name in galleries
        ]
        applied = 0
        for g in chosen:
            applied += self._catch_up_gallery(g, None)
        if plates:
            applied += self._catch_up_plates()
        for g in chosen:
            if g.needs_compaction():
                g.compact()
            self._maybe_tune(g)
        return applied

    def _catch_lock(self, name: str) -> threading.RLock:
        return self._catch_locks[name]

    def _maybe_tune(self, g: FaceGallery) -> None:
        """Re-tune ``ef`` on a sample whenever a gallery has doubled since the last tuning."""
        size = len(g)
        if not self.hnsw.tune_ef or size < self.hnsw.tune_min_size:
            return
        if size >= 2 * self._tuned_size.get(g.name, 0):
            ef = g.tune_ef()
            self._tuned_size[g.name] = size
            log.info("matcher.ef_tuned", gallery=g.name, entries=size, ef=ef)

    def _catch_up_gallery(self, g: FaceGallery, progress: Callable[[int], None] | None) -> int:
        """Apply the gallery's pending changes in ``seq`` order; the next batch is read and
        decrypted (another thread) while this one is inserted."""
        done = 0
        with self._catch_lock(g.name):
            pending = self.store.count_changes_since(g.applied_seq, gallery=g.name)
            if pending >= RESERVE_AT:
                g.reserve(pending)  # one resize of the index, not one per 50 % of growth
            loading = self._loader.submit(self._load, g, g.applied_seq)
            while True:
                changes, opened = loading.result()
                if not changes:
                    return done
                loading = self._loader.submit(self._load, g, changes[-1].seq)
                with g.changes():
                    self._apply(g, changes, opened)
                    g.applied_seq = changes[-1].seq
                done += len(changes)
                if progress is not None:
                    progress(done)

    def _load(
        self, g: FaceGallery, after: int
    ) -> tuple[list[TemplateChange], dict[str, npt.NDArray[np.float32] | None]]:
        """The next changes of a gallery, and the vectors of those it may index."""
        changes = self.store.changes_since(after, gallery=g.name, limit=self.batch)
        wanted = [c for c in changes if not c.deleted and c.model_id == g.model_id]
        opened = self.store.open_templates(wanted)
        return changes, {c.template_id: v for c, v in zip(wanted, opened, strict=True)}

    def _apply(
        self,
        g: FaceGallery,
        changes: Sequence[TemplateChange],
        opened: Mapping[str, npt.NDArray[np.float32] | None] | None = None,
    ) -> None:
        removed: list[str] = []
        fresh: list[TemplateChange] = []
        for c in changes:
            if c.deleted or c.model_id != g.model_id:
                removed.append(c.template_id)
            elif c.template_id in g:
                g.set_state(c.template_id, active=c.active, expires_at=_dt(c.expires_at))
                g.set_template_objector(c.template_id, c.objector)
            else:
                fresh.append(c)
        new: list[TemplateChange] = []
        vectors: list[npt.NDArray[np.float32]] = []
        vecs = (
            [opened.get(c.template_id) for c in fresh]
            if opened is not None
            else self.store.open_templates(fresh)
        )
        for c, vec in zip(fresh, vecs, strict=True):
            if vec is None or vec.shape != (g.dim,):
                # Wrong or destroyed key, moved or altered ciphertext: never indexed.
                self.rejected_rows += 1
                log.warning("matcher.row_rejected", gallery=g.name, seq=c.seq)
                continue
            new.append(c)
            vectors.append(vec)
        if removed:
            g.remove_many(removed)
        if new:
            g.add_batch(
                [c.template_id for c in new],
                [c.subject_ref for c in new],
                np.stack(vectors),
                active=np.array([c.active for c in new], dtype=bool),
                expires=np.array(
                    [np.inf if c.expires_at is None else c.expires_at for c in new],
                    dtype=np.float64,
                ),
                objector=np.array([c.objector for c in new], dtype=bool),
                chunk=self.chunk,
                max_hold_s=self.hnsw.max_hold_s,
                inserter=self._inserter,
            )

    def _catch_up_plates(self) -> int:
        done = 0
        with self._plates_lock:
            while True:
                changes = self.store.plate_changes_since(self.plates_seq, limit=self.batch)
                if not changes:
                    return done
                for c in changes:
                    self._apply_plate(c)
                self.plates_seq = changes[-1].seq
                done += len(changes)

    def _apply_plate(self, c: PlateChange) -> None:
        if c.deleted or not c.active:
            self.plates.remove(c.plate_ref)
            return
        try:
            self.plates.add(c.plate_ref, self.store.open_plate(c))
        except (DecryptionError, KeyManagementError, NotFound, InvalidArgument):
            self.rejected_rows += 1
            log.warning("matcher.row_rejected", gallery=VEHICLES, seq=c.seq)

    def index_lag(self) -> int:
        """Durable changes (templates and plates) not yet applied to the indexes."""
        lag = sum(
            self.store.count_changes_since(g.applied_seq, gallery=name)
            for name, g in self._galleries.items()
        )
        return lag + self.store.count_plate_changes_since(self.plates_seq)

    def notify(self, *, bulk: bool = False) -> None:
        """Wake the background catch-up now (after a change was committed).

        ``bulk``: a batch of a bulk import; while batches keep coming, the background
        catch-up waits (they are indexed when the stream pauses), so the import has the
        machine; changes made effective synchronously (``catch_up()``) are not affected.
        """
        if bulk:
            now = time.monotonic()
            if now >= self._bulk_until:
                self._bulk_since = now  # a new import: the deferral starts now
            self._bulk_until = now + self.hnsw.bulk_quiet_s
        self._wake.set()

    def run_in_background(self, interval_s: float = 0.5) -> None:
        """Start a daemon thread that catches up every ``interval_s`` or when notified."""
        if self._thread is not None:
            return

        if self._inserter is None and self.hnsw.catch_up_nice > 0:
            self._inserter = ThreadPoolExecutor(
                max_workers=len(self.specs),
                thread_name_prefix="matcher-insert",
                initializer=_lower_priority,
                initargs=(self.hnsw.catch_up_nice,),
            )

        def loop() -> None:
            while not self._stop.is_set():
                now = time.monotonic()
                pause = self._bulk_until - now
                if pause > 0 and now - self._bulk_since < self.hnsw.bulk_defer_max_s:
                    self._stop.wait(pause)
                    continue
                self._bulk_since = now
                try:
                    self.catch_up()
                except Exception as exc:  # e.g. the database is away: retry, never die
                    log.warning("matcher.catch_up_failed", error=exc.__class__.__name__)
                self._wake.wait(interval_s)
                self._wake.clear()

        self._thread = threading.Thread(target=loop, name="matcher-catch-up", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background catch-up."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._inserter is not None:
            self._inserter.shutdown(wait=True)
            self._inserter = None
        self._stop.clear()

    # ---- searches -----------------------------------------------------------------------

    def search_faces(
        self,
        gallery: str,
        probe: npt.ArrayLike,
        *,
        model_id: str,
        k: int,
        min_score: float,
        now: dt.datetime | None = None,
        exclude_objectors: bool = False,
        exempt_subjects: frozenset[str] = frozenset(),
        wait: bool = True,
    ) -> list[Hit]:
        """Top-``k`` allowed entries of ``gallery`` scoring at least ``min_score``.

        Raises:
            Unavailable: start-up not finished. InvalidArgument: unknown gallery or bad
            probe. ModelMismatch: the probe's model is not the gallery's.
            WouldBlock: ``wait`` is false and a writer holds or awaits the index.
        """
        return self.gallery(gallery).search(
            probe,
            k=k,
            min_score=min_score,
            now=now or dt.datetime.now(dt.UTC),
            exclude_objectors=exclude_objectors,
            exempt_subjects=exempt_subjects,
            model_id=model_id,
            wait=wait,
        )

    def search_plates(
        self,
        read: PlateRead,
        *,
        max_distance: float | None = None,
        k: int = 10,
        wait: bool = True,
    ) -> list[PlateHit]:
        """Listed, active stolen vehicles whose plate matches the read.

        Raises:
            Unavailable: start-up not finished. InvalidArgument: malformed read.
            WouldBlock: ``wait`` is false and a writer holds or awaits the index.
        """
        if not self._started:
            raise Unavailable("the matcher is still starting")
        return self.plates.search(read, max_distance=max_distance, k=k, wait=wait)

    def verify(
        self,
        gallery: str,
        probe: npt.ArrayLike,
        *,
        model_id: str,
        subject_ref: str | None = None,
        dni: str | None = None,
    ) -> float:
        """1:1 score of ``probe`` against one subject, named by reference or DNI (R4).

        Raises:
            NotFound: no such subject, or it has no template in the gallery.
            InvalidArgument, ModelMismatch, Unavailable: as for :meth:`search_faces`.
        """
        g = self.gallery(gallery)
        if (subject_ref is None) == (dni is None):
            raise InvalidArgument("give exactly one of subject_ref and dni", field="subject")
        g.check_model(model_id)
        if dni is not None:
            subject_ref = self.store.find_subject(self.specs[gallery].owner, dni)
            if subject_ref is None:
                raise NotFound("no such subject in the gallery", field="dni")
        assert subject_ref is not None
        score = g.verify(subject_ref, probe, model_id=model_id)
        if score is None:
            raise NotFound("no such subject in the gallery", field="subject")
        return score

    # ---- crypto-shredding ---------------------------------------------------------------

    def shred(self, owner: str) -> int:
        """Crypto-shred ``owner`` in the store and empty its galleries at once."""
        # Hold the catch-up off so no row decrypted before the shredding is added after it.
        with contextlib.ExitStack() as held:
            for name in self.specs:
                held.enter_context(self._catch_lock(name))
            held.enter_context(self._plates_lock)
            count = self.store.shred_owner(owner)
            for name, spec in self.specs.items():
                if spec.owner == owner and name in self._galleries:
                    self._galleries[name].clear()
                    path = self._snapshot_path(name)
                    if path is not None:
                        path.unlink(missing_ok=True)
            if owner == "pnp":
                self.plates.clear()
            self.catch_up()
        return count


def _lower_priority(nice: int) -> None:
    """Lower this thread's CPU priority (Linux: per thread; threads it starts inherit it)."""
    if nice <= 0:
        return
    try:
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(current, nice))
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: run at full priority
        log.info("matcher.priority_unchanged", error=exc.__class__.__name__)


def _progress(report: ProgressFn, phase: str, name: str, total: int) -> Callable[[int], None]:
    def call(done: int) -> None:
        report(StartProgress(phase, name, done, total))

    return call


def _dt(epoch_s: float | None) -> dt.datetime | None:
    return None if epoch_s is None else dt.datetime.fromtimestamp(epoch_s, dt.UTC)
