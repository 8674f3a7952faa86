"""The quality gate's arithmetic: a product of factors in [0, 1], and checks in order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from centinela.clients.quality import QualityGate

pytestmark = pytest.mark.edge  # the gate module uses OpenCV (edge extra)

scores = st.floats(min_value=0.0, max_value=1.0)
sizes = st.floats(min_value=0.0, max_value=2000.0)
sharpness = st.floats(min_value=0.0, max_value=10_000.0)


@given(det=scores, side=sizes, sharp=sharpness)
def test_quality_lies_in_the_unit_interval(det: float, side: float, sharp: float) -> None:
    q = QualityGate().quality(det, side, sharp)
    assert 0.0 <= q <= 1.0
    assert q <= det + 1e-12  # never better than the detector's own confidence


@given(det=scores, side=sizes, sharp=sharpness, more=st.floats(min_value=0.0, max_value=500.0))
def test_quality_never_drops_when_a_face_is_larger_or_sharper(
    det: float, side: float, sharp: float, more: float
) -> None:
    gate = QualityGate()
    q = gate.quality(det, side, sharp)
    assert gate.quality(det, side + more, sharp) >= q
    assert gate.quality(det, side, sharp + more) >= q


def test_checks_name_what_failed() -> None:
    gate = QualityGate()
    assert "detector score" in gate.precheck(0.55, 100)
    assert "smaller than 32 px" in gate.precheck(0.9, 20)
    assert gate.precheck(0.9, 40) == ""
    assert "blurred" in gate.check(5.0, 0.9)
    assert "below the floor" in gate.check(50.0, 0.3)
    assert gate.check(50.0, 0.8) == ""
