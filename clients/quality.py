"""The edge's face quality gate: which detected faces are worth encoding and sending.

Invariants (R13, DESIGN.md §2 step 1):

* A face is encoded and sent only when it passes every check of the gate: detector score,
  face size in pixels (shorter side of the detected box), sharpness (variance of the
  Laplacian of the aligned grey crop), and the combined quality against the floor.
* The combined quality is the product of three factors in [0, 1] — detector score, size
  factor ``min(1, side / good_face_px)`` and sharpness factor
  ``min(1, sharpness / good_sharpness)`` — so it is itself in [0, 1] and is what the probe
  carries in ``FaceProbe.quality``. The default floor equals the policy's face quality floor
  (0.5 in both bundles): a face the server would refuse is not sent.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import numpy.typing as npt


@dataclasses.dataclass(frozen=True)
class QualityGate:
    """Thresholds of the quality gate (see the module docstring)."""

    #: Lowest SCRFD detector score accepted.
    min_det_score: float = 0.6
    #: Smallest face accepted: shorter side of the detected box, in pixels of the image.
    min_face_px: float = 32.0
    #: Lowest sharpness accepted (variance of the Laplacian of the aligned 112×112 grey crop).
    min_sharpness: float = 10.0
    #: Lowest combined quality accepted (the policy's face quality floor).
    min_quality: float = 0.5
    #: Faces this size or larger get a size factor of 1.
    good_face_px: float = 40.0
    #: Crops this sharp or sharper get a sharpness factor of 1.
    good_sharpness: float = 40.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_quality <= 1.0 or not 0.0 <= self.min_det_score <= 1.0:
            raise ValueError("min_quality and min_det_score must lie in [0, 1]")
        if self.good_face_px <= 0 or self.good_sharpness <= 0:
            raise ValueError("good_face_px and good_sharpness must be positive")

    def quality(self, det_score: float, face_px: float, sharpness: float) -> float:
        """The combined quality in [0, 1]."""
        det = min(1.0, max(0.0, det_score))
        size = min(1.0, max(0.0, face_px / self.good_face_px))
        sharp = min(1.0, max(0.0, sharpness / self.good_sharpness))
        return float(det * size * sharp)

    def precheck(self, det_score: float, face_px: float) -> str:
        """Why a detection fails before alignment ("" when it passes)."""
        if det_score < self.min_det_score:
            return f"detector score {det_score:.2f} below {self.min_det_score:.2f}"
        if face_px < self.min_face_px:
            return f"face {face_px:.0f} px, smaller than {self.min_face_px:.0f} px"
        return ""

    def check(self, sharpness: float, quality: float) -> str:
        """Why an aligned face fails ("" when it passes)."""
        if sharpness < self.min_sharpness:
            return f"too blurred (sharpness {sharpness:.0f} below {self.min_sharpness:.0f})"
        if quality < self.min_quality:
            return f"quality {quality:.2f} below the floor {self.min_quality:.2f}"
        return ""


def sharpness(aligned_bgr: npt.NDArray[np.uint8]) -> float:
    """Variance of the Laplacian of an aligned face crop (higher is sharper)."""
    grey = cv2.cvtColor(aligned_bgr, cv2.COLOR_BGR2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())
