"""Open-set calibration: the threshold that meets a target FPIR on a non-mated set.

A face gallery's threshold floor (R8) is "calibrated for a target false-positive
identification rate": of probes of people who are *not* in the gallery, at most that share
may score at or above the floor against its best candidate (NIST FRTE 1:N's FPIR). The rate
depends on the gallery as much as on the model: each stranger gets one chance per enrolled
template to look like someone, so at the small rates that matter FPIR grows about in
proportion to the gallery's size, and a floor holds only for the size it was measured at.

This module is the arithmetic only (``CalibrateGallery`` runs the searches, and
``benchmarks/threshold_fpir.py`` uses the same functions on galleries it builds):

* :func:`threshold_for_fpir` is the smallest threshold at which at most ``target`` of the
  non-mated top-1 scores reach it;
* :func:`wilson` is the 95 % interval of a measured rate (a rate of 0.003 on 3,000 probes is
  nine scores, so the interval matters);
* :func:`expected_fpir` extrapolates a floor's target to today's gallery size.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import numpy.typing as npt

#: Fewer non-mated scores than this above the threshold and the threshold rests on a handful
#: of them (relative standard error above ~30 %): the measurement is reported unresolved.
MIN_FALSE_POSITIVES = 10

#: A gallery more than this factor larger than its floor's `calibrated_size` has outgrown it:
#: at the small rates that matter FPIR grows about in proportion, so 10 % more entries means
#: about 10 % more false alerts than the floor was set for.
OUTGROWN_FACTOR = 1.1

#: The curve spans the floor and the measured threshold, this much either side, in steps.
CURVE_MARGIN = 0.05
CURVE_STEP = 0.02


def _ranked(top1: npt.ArrayLike) -> npt.NDArray[np.float64]:
    scores = np.asarray(top1, dtype=np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError("need a non-empty 1-D array of top-1 scores")
    return np.sort(scores)[::-1]


def threshold_for_fpir(top1: npt.ArrayLike, target: float) -> float:
    """The smallest threshold at which at most ``target`` of ``top1`` score at or above it.

    Just above the ``floor(target · n) + 1``-th highest score, so exactly
    ``floor(target · n)`` scores (ties aside) remain at or above it. -1.0 when every score may
    pass (``target · n`` ≥ n).
    """
    if not 0.0 < target < 1.0:
        raise ValueError("the target FPIR must lie in (0, 1)")
    ranked = _ranked(top1)
    allowed = math.floor(target * len(ranked))
    return float(np.nextafter(ranked[allowed], np.inf)) if allowed < len(ranked) else -1.0


def fpir(top1: npt.ArrayLike, threshold: float) -> float:
    """Share of ``top1`` at or above ``threshold``."""
    scores = np.asarray(top1, dtype=np.float64)
    if len(scores) == 0:
        raise ValueError("need top-1 scores")
    return float(np.count_nonzero(scores >= threshold)) / len(scores)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of ``hits`` in ``n`` (95 % for the default ``z``)."""
    if n <= 0 or not 0 <= hits <= n:
        raise ValueError("need 0 <= hits <= n and n > 0")
    p = hits / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def expected_fpir(target: float, size: int, calibrated_size: int) -> float:
    """The FPIR to expect at a floor calibrated for ``target`` at ``calibrated_size`` once the
    gallery holds ``size`` entries (proportional growth; capped at 1). 0.0 when unknown."""
    if calibrated_size <= 0 or target <= 0:
        return 0.0
    return min(1.0, target * size / calibrated_size)


def outgrown(active: int, calibrated_size: int) -> bool:
    """Whether a gallery of ``active`` entries has outgrown a floor calibrated at
    ``calibrated_size`` (by more than ``OUTGROWN_FACTOR``); never when the size is unknown."""
    return 0 < calibrated_size * OUTGROWN_FACTOR < active


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What one non-mated set measured against one gallery (aggregates only)."""

    templates: int
    target_fpir: float
    threshold: float
    resolved: bool
    floor: float
    fpir_at_floor: float
    fpir_at_floor_interval: tuple[float, float]
    curve: tuple[tuple[float, float], ...]


def floor_for(threshold: float) -> float:
    """A measured threshold as a floor a bundle can hold: rounded *up* to three decimals, so
    the floor never sits below the measurement."""
    return math.ceil(threshold * 1000 - 1e-9) / 1000


def curve_points(floor: float, threshold: float) -> list[float]:
    """Thresholds to report: the floor, the measured one as :func:`floor_for` rounds it, and
    a grid of ``CURVE_STEP`` from ``CURVE_MARGIN`` below the lower to as far above the
    higher, within [-1, 1]."""
    low = max(-1.0, min(floor, threshold) - CURVE_MARGIN)
    high = min(1.0, max(floor, threshold) + CURVE_MARGIN)
    steps = range(math.ceil(low / CURVE_STEP), math.floor(high / CURVE_STEP) + 1)
    grid = {round(i * CURVE_STEP, 4) for i in steps}
    return sorted(grid | {round(floor, 4), floor_for(threshold)})


def calibrate(top1: npt.ArrayLike, *, target: float, floor: float) -> Calibration:
    """The calibration ``top1`` (each non-mated template's best score) supports.

    Raises:
        ValueError: no scores, or ``target`` outside (0, 1).
    """
    ranked = _ranked(top1)
    threshold = threshold_for_fpir(ranked, target)
    n = len(ranked)
    at_floor = int(np.count_nonzero(ranked >= floor))
    points = curve_points(floor, threshold)
    return Calibration(
        templates=n,
        target_fpir=target,
        threshold=threshold,
        resolved=target * n >= MIN_FALSE_POSITIVES,
        floor=floor,
        fpir_at_floor=at_floor / n,
        fpir_at_floor_interval=wilson(at_floor, n),
        curve=tuple((t, fpir(ranked, t)) for t in points),
    )
