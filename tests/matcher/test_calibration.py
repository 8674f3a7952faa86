"""The calibration arithmetic: thresholds for a target FPIR, Wilson intervals, extrapolation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from centinela.matcher.calibration import (
    MIN_FALSE_POSITIVES,
    calibrate,
    curve_points,
    expected_fpir,
    floor_for,
    fpir,
    threshold_for_fpir,
    wilson,
)

scores = st.lists(
    st.floats(min_value=-1.0, max_value=1.0, allow_nan=False, width=32), min_size=1, max_size=400
)
targets = st.floats(min_value=1e-4, max_value=0.999)


@given(top1=scores, target=targets)
def test_the_threshold_is_the_smallest_that_meets_the_target(
    top1: list[float], target: float
) -> None:
    t = threshold_for_fpir(top1, target)
    allowed = math.floor(target * len(top1))
    above = sum(s >= t for s in top1)
    assert above <= allowed  # meets the target on this sample
    # ... and no lower threshold that is one of the scores does (unless every score may pass)
    if t > -1.0:
        below = max(s for s in top1 if s < t)
        assert sum(s >= below for s in top1) > allowed


def test_a_worked_example() -> None:
    top1 = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    t = threshold_for_fpir(top1, 0.2)  # two of ten may pass: just above the third score
    assert 0.7 < t < 0.7 + 1e-12
    assert fpir(top1, t) == 0.2
    assert threshold_for_fpir(top1, 0.05) > 0.9  # none of ten may pass
    assert fpir(top1, 0.5) == 0.5


def test_wilson_matches_published_values() -> None:
    # Wilson 95 % intervals (z = 1.96): 0/10 -> [0, 0.2775]; 5/10 -> [0.2366, 0.7634].
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson(9, 3000)
    assert low < 9 / 3000 < high


def test_expected_fpir_grows_with_the_gallery_and_is_zero_when_unknown() -> None:
    assert expected_fpir(0.003, 200_000, 100_000) == pytest.approx(0.006)
    assert expected_fpir(0.003, 100, 0) == 0.0
    assert expected_fpir(0.5, 10, 1) == 1.0


def test_calibrate_reports_resolution_and_the_floor() -> None:
    rng = np.random.default_rng(3)
    top1 = rng.normal(0.3, 0.05, size=5000)
    result = calibrate(top1, target=0.003, floor=0.42)
    assert result.resolved == (MIN_FALSE_POSITIVES <= 0.003 * 5000)
    assert result.fpir_at_floor == pytest.approx(float(np.mean(top1 >= 0.42)))
    assert (
        result.fpir_at_floor_interval[0] <= result.fpir_at_floor <= result.fpir_at_floor_interval[1]
    )
    assert not calibrate(top1[:100], target=0.003, floor=0.42).resolved
    ts = [t for t, _ in result.curve]
    assert ts == sorted(ts)
    assert 0.42 in ts


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, float("nan")])
def test_a_target_outside_the_open_interval_is_refused(target: float) -> None:
    with pytest.raises(ValueError, match="target"):
        threshold_for_fpir([0.5], target)


def test_no_scores_is_refused() -> None:
    with pytest.raises(ValueError, match="top-1"):
        threshold_for_fpir([], 0.01)


def test_a_floor_never_sits_below_the_measurement() -> None:
    assert floor_for(0.5321) == 0.533
    assert floor_for(0.533) == 0.533
    assert floor_for(0.5330001) == 0.534


def test_the_curve_spans_floor_and_threshold_on_a_grid() -> None:
    points = curve_points(0.42, 0.49187)
    assert points[0] == pytest.approx(0.38)
    assert points[-1] == pytest.approx(0.54)
    assert 0.42 in points
    assert 0.492 in points  # the measured threshold as a floor
    assert points == sorted(points)
