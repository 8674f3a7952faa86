"""Plate reads against the stolen-vehicle list: normalisation, look-alikes, weighted distance.

Invariants (DESIGN.md §2; LEGAL_RULES R6, R10):

* :func:`normalise_plate` maps a read to upper-case ASCII letters and digits, dropping spaces,
  dashes and dots (Peruvian formats: cars ``ABC-123`` / ``A1B-234``, motorcycles ``1234-AB``);
  it is idempotent and refuses anything else (``InvalidArgument(field="plate.text")``).
* A listed plate matches a read when the weighted edit distance is at most ``max_distance``
  (default 0.75). A substitution between OCR look-alikes (:data:`LOOKALIKE_GROUPS`) costs 0.3
  at full confidence and less when the camera was unsure; any other substitution costs at
  least 0.8 whatever the confidence, an insertion or deletion 1.0. So one look-alike away
  matches, one real character away never does, and low confidence only ever cheapens
  look-alikes. Alternative reads cost :data:`ALTERNATIVE_PENALTY` more than the main read.
* Candidates come from an HNSW index of plate vectors (look-alike classes by position plus
  class bigrams, so look-alikes and shifts stay close) and from an exact look-up of every
  read; the score decides. Inactive (recovered) vehicles are not in the index (R6).
* Plates are in clear only in memory; the store keeps them encrypted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import threading
import unicodedata
from collections.abc import Sequence
from typing import Any

import hnswlib
import numpy as np
import numpy.typing as npt

from centinela.errors import InvalidArgument
from centinela.matcher import multimap
from centinela.matcher.rwlock import RWLock

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
#: Characters that plate-reading OCR confuses with each other (by shape).
LOOKALIKE_GROUPS = ("0ODQ", "1IL", "2Z", "5S", "6G", "8B", "4A", "7T", "UV", "MN", "KX", "CG")
SEPARATORS = frozenset(" \t-–—._·/")
MIN_LEN, MAX_LEN = 4, 10
LOOKALIKE_COST = 0.3
REAL_COST_FLOOR = 0.8
INDEL_COST = 1.0
ALTERNATIVE_PENALTY = 0.1
DEFAULT_MAX_DISTANCE = 0.75

_PAIRS = frozenset((a, b) for group in LOOKALIKE_GROUPS for a in group for b in group if a != b)


def _classes() -> dict[str, int]:
    parent = {c: c for c in ALPHABET}

    def find(c: str) -> str:
        while parent[c] != c:
            c = parent[c]
        return c

    for group in LOOKALIKE_GROUPS:
        for c in group[1:]:
            parent[find(c)] = find(group[0])
    roots = sorted({find(c) for c in ALPHABET})
    return {c: roots.index(find(c)) for c in ALPHABET}


CLASS_OF = _classes()
N_CLASSES = max(CLASS_OF.values()) + 1
_BIGRAMS = 128
DIM = MAX_LEN * N_CLASSES + _BIGRAMS


def normalise_plate(text: str, *, field: str = "plate.text") -> str:
    """Canonical form of a plate: upper-case letters and digits only (idempotent).

    Raises:
        InvalidArgument: other characters, or fewer than 4 or more than 10 of them.
    """
    folded = unicodedata.normalize("NFKC", str(text)).upper()
    out = "".join(ch for ch in folded if ch not in SEPARATORS)
    if not out.isascii() or not out.isalnum():
        raise InvalidArgument("plate may hold only letters, digits, spaces and dashes", field=field)
    if not MIN_LEN <= len(out) <= MAX_LEN:
        raise InvalidArgument(f"plate must have {MIN_LEN}-{MAX_LEN} letters or digits", field=field)
    return out


def plate_format(plate: str) -> str:
    """``car`` (3+3, e.g. ABC123, A1B234), ``motorcycle`` (4 digits + 2 letters) or ``other``."""
    if len(plate) == 6 and plate[:4].isdigit() and plate[4:].isalpha():
        return "motorcycle"
    if len(plate) == 6 and plate[3:].isdigit():
        return "car"
    return "other"


def display_plate(plate: str) -> str:
    """The usual written form: ``ABC-123`` or ``1234-AB``; other formats unchanged."""
    kind = plate_format(plate)
    if kind == "car":
        return f"{plate[:3]}-{plate[3:]}"
    if kind == "motorcycle":
        return f"{plate[:4]}-{plate[4:]}"
    return plate


def is_lookalike(a: str, b: str) -> bool:
    """Whether OCR commonly confuses ``a`` and ``b``."""
    return (a, b) in _PAIRS


def substitution_cost(read: str, listed: str, confidence: float = 1.0) -> float:
    """Cost of reading ``read`` where ``listed`` is written, given the read's confidence."""
    if read == listed:
        return 0.0
    c = min(max(confidence, 0.0), 1.0)
    if is_lookalike(read, listed):
        return LOOKALIKE_COST * (0.5 + 0.5 * c)
    return REAL_COST_FLOOR + (1.0 - REAL_COST_FLOOR) * c


def weighted_distance(read: str, listed: str, confidences: Sequence[float] | None = None) -> float:
    """Weighted edit distance from a normalised read to a normalised listed plate."""
    conf = list(confidences) if confidences is not None else [1.0] * len(read)
    n, m = len(read), len(listed)
    prev = [j * INDEL_COST for j in range(m + 1)]
    for i in range(1, n + 1):
        cur = [prev[0] + INDEL_COST] + [0.0] * m
        r, ci = read[i - 1], conf[i - 1]
        for j in range(1, m + 1):
            cur[j] = min(
                prev[j - 1] + substitution_cost(r, listed[j - 1], ci),
                prev[j] + INDEL_COST,
                cur[j - 1] + INDEL_COST,
            )
        prev = cur
    return prev[m]


def plate_vector(plate: str) -> npt.NDArray[np.float32]:
    """An embedding where look-alike variants and shifted reads stay close (cosine)."""
    v = np.zeros(DIM, dtype=np.float32)
    classes = [CLASS_OF[c] for c in plate]
    for pos, cls in enumerate(classes):
        v[pos * N_CLASSES + cls] = 1.0
    for a, b in itertools.pairwise(classes):
        h = hashlib.blake2s(bytes([a, b]), digest_size=2).digest()
        v[MAX_LEN * N_CLASSES + int.from_bytes(h, "big") % _BIGRAMS] += 0.7
    v /= np.linalg.norm(v)
    return v


@dataclasses.dataclass(frozen=True)
class PlateRead:
    """A read from a plate camera: text, optional per-character confidences, alternatives."""

    text: str
    confidences: Sequence[float] | None = None
    alternatives: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class PlateHit:
    """A listed plate that matches a read: its reference, score in [0, 1], canonical text."""

    ref: str
    score: float
    normalised: str


class PlateIndex:
    """The stolen-vehicle plates in memory: HNSW candidates, weighted edit distance scoring."""

    def __init__(
        self,
        *,
        max_distance: float = DEFAULT_MAX_DISTANCE,
        candidates: int = 32,
        ef: int = 128,
        capacity: int = 1024,
    ) -> None:
        self.max_distance = max_distance
        self.candidates = candidates
        self._rw = RWLock()
        self._mutation = threading.Lock()
        self._index = hnswlib.Index(space="cosine", dim=DIM)
        self._index.init_index(
            max_elements=capacity, M=16, ef_construction=200, allow_replace_deleted=True
        )
        self._index.set_ef(ef)
        self._plate_of: dict[str, str] = {}
        self._label_of: dict[str, int] = {}
        self._ref_of: dict[int, str] = {}
        # Tuples, not sets: untracked by the GC (see multimap).
        self._by_plate: dict[str, tuple[str, ...]] = {}
        self._next = 0
        self._deleted = 0

    def __len__(self) -> int:
        return len(self._plate_of)

    def add(self, ref: str, plate: str) -> None:
        """List a plate under ``ref`` (replacing what ``ref`` held)."""
        norm = normalise_plate(plate)
        with self._mutation:
            if self._plate_of.get(ref) == norm:
                return
            self.remove(ref)
            with self._rw.write():
                need = int(self._index.element_count) + max(0, 1 - self._deleted)
                if need > int(self._index.max_elements):
                    self._index.resize_index(int(self._index.max_elements * 1.5) + 16)
                label = self._next
                self._next += 1
                self._index.add_items(
                    plate_vector(norm)[None, :], [label], num_threads=1, replace_deleted=True
                )
                self._deleted = max(0, self._deleted - 1)
                self._plate_of[ref] = norm
                self._label_of[ref] = label
                self._ref_of[label] = ref
                multimap.add(self._by_plate, norm, ref)

    def remove(self, ref: str) -> bool:
        """Unlist a plate (recovered or removed); False if it was not listed."""
        with self._rw.write():
            label = self._label_of.pop(ref, None)
            if label is None:
                return False
            self._index.mark_deleted(label)
            self._deleted += 1
            del self._ref_of[label]
            norm = self._plate_of.pop(ref)
            multimap.discard(self._by_plate, norm, ref)
            return True

    def clear(self) -> None:
        """Unlist everything."""
        with self._mutation:
            for ref in list(self._plate_of):
                self.remove(ref)

    def search(
        self,
        read: PlateRead,
        *,
        max_distance: float | None = None,
        k: int = 10,
        wait: bool = True,
    ) -> list[PlateHit]:
        """Listed plates within ``max_distance`` of the read or one of its alternatives.

        With ``wait=False`` the search runs only if no writer holds or awaits the index.

        Raises:
            InvalidArgument: malformed text, alternative, or confidences.
            WouldBlock: ``wait`` is false and a writer holds or awaits the index.
        """
        limit = self.max_distance if max_distance is None else max_distance
        reads = self._reads(read)
        with self._rw.read() if wait else self._rw.read_now():
            found: set[str] = set()
            live = len(self._label_of)
            if live == 0:
                return []
            kq = min(live, self.candidates)
            for text, _conf, _penalty in reads:
                found.update(self._by_plate.get(text, ()))
                labels = self._knn(plate_vector(text), kq)
                found.update(self._ref_of[int(x)] for x in labels if int(x) in self._ref_of)
            listed = {ref: self._plate_of[ref] for ref in found if ref in self._plate_of}
        hits = []
        for ref, plate in listed.items():
            dist = min(
                weighted_distance(text, plate, conf) + penalty for text, conf, penalty in reads
            )
            if dist <= limit:
                hits.append(PlateHit(ref, max(0.0, 1.0 - dist / len(plate)), plate))
        hits.sort(key=lambda h: (-h.score, h.ref))
        return hits[:k]

    def _knn(self, vec: npt.NDArray[np.float32], kq: int) -> Any:
        while kq >= 1:
            try:
                labels, _ = self._index.knn_query(vec[None, :], k=kq, num_threads=1)
                return labels[0]
            except RuntimeError:
                kq //= 2
        return []

    @staticmethod
    def _reads(read: PlateRead) -> list[tuple[str, list[float] | None, float]]:
        text = normalise_plate(read.text)
        conf: list[float] | None = None
        if read.confidences is not None and len(read.confidences) > 0:
            conf = [float(c) for c in read.confidences]
            if len(conf) != len(text):
                raise InvalidArgument(
                    "one confidence per letter or digit of the text is required",
                    field="plate.confidences",
                )
            if not all(0.0 <= c <= 1.0 for c in conf):
                raise InvalidArgument("confidences must lie in [0, 1]", field="plate.confidences")
        if len(read.alternatives) > 8:
            raise InvalidArgument("at most 8 alternative reads", field="plate.alternatives")
        out: list[tuple[str, list[float] | None, float]] = [(text, conf, 0.0)]
        for alt in read.alternatives:
            out.append(
                (normalise_plate(alt, field="plate.alternatives"), None, ALTERNATIVE_PENALTY)
            )
        return out
