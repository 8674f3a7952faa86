"""The face encoder on real photos: who is found, who is not, and what the gate holds back."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from centinela.clients.encoder import (
    FaceEncoder,
    align,
    encode_single_face,
    find_models,
    load_image,
)
from centinela.clients.quality import QualityGate
from centinela.errors import ConfigError, InvalidArgument
from centinela.models import (
    DEFAULT_FACE_MODEL_FILE,
    default_face_model_id,
    model_id_for,
    packaged_model_dir,
)

pytestmark = pytest.mark.edge


def _inside(box: tuple[float, float, float, float], region: tuple[float, ...]) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


def test_model_id_is_the_content_hash_of_the_recognition_weights(encoder: FaceEncoder) -> None:
    directory = packaged_model_dir()
    assert directory is not None
    assert encoder.model_id == model_id_for(directory / DEFAULT_FACE_MODEL_FILE)
    assert encoder.model_id == default_face_model_id()  # what the server's galleries use
    assert encoder.model_id.startswith("w600k_mbf:")


def test_embeddings_are_unit_float32_of_the_model_dimension(
    encoder: FaceEncoder, photos: dict[str, Path]
) -> None:
    faces = encoder.encode(load_image(photos["t1"]))
    assert len(faces) == 6
    for face in faces:
        assert face.vector.dtype == np.float32
        assert face.vector.shape == (encoder.dimension,) == (512,)
        assert np.all(np.isfinite(face.vector))
        assert abs(float(np.linalg.norm(face.vector)) - 1.0) < 1e-3
        assert face.kps.shape == (5, 2)
        assert 0.5 <= face.quality <= 1.0
        assert face.model_id == encoder.model_id


def test_enrolled_person_is_found_in_a_crowd_photo(
    encoder: FaceEncoder,
    photos: dict[str, Path],
    watchlist_threshold: float,
    yao_region: tuple[float, float, float, float],
) -> None:
    """Yao Ming enrolled from his portrait is the one face of the team photo over threshold."""
    enrolled, model_id = encode_single_face(photos["yaoming"], encoder)
    assert model_id == encoder.model_id
    faces = encoder.encode(load_image(photos["players"]))
    assert len(faces) >= 14  # the team and staff; tiny crowd faces are held back
    scores = [float(np.dot(f.vector, enrolled)) for f in faces]
    hits = [f for f, s in zip(faces, scores, strict=True) if s >= watchlist_threshold]
    assert len(hits) == 1
    assert _inside(hits[0].box, yao_region)
    best, second = sorted(scores, reverse=True)[:2]
    assert best >= watchlist_threshold + 0.1  # a clear genuine score (0.63 measured)
    assert second < watchlist_threshold - 0.15  # and a clear gap to everyone else


@pytest.mark.parametrize("photo", ["gdp", "t1", "astronaut"])
def test_nobody_else_raises_an_alert(
    encoder: FaceEncoder,
    photos: dict[str, Path],
    astronaut: Path,
    watchlist_threshold: float,
    photo: str,
) -> None:
    enrolled, _ = encode_single_face(photos["yaoming"], encoder)
    path = astronaut if photo == "astronaut" else photos[photo]
    faces = encoder.encode(load_image(path))
    assert faces, "the photo has faces that pass the gate"
    assert max(float(np.dot(f.vector, enrolled)) for f in faces) < watchlist_threshold


def test_people_in_different_photos_are_told_apart(
    encoder: FaceEncoder, photos: dict[str, Path], watchlist_threshold: float
) -> None:
    """No pair of different people across gdp.jpg and t1.jpg reaches the threshold."""
    a = [f.vector for f in encoder.encode(load_image(photos["gdp"]))]
    b = [f.vector for f in encoder.encode(load_image(photos["t1"]))]
    sims = np.array(a) @ np.array(b).T
    assert sims.max() < watchlist_threshold


def test_tiny_and_uncertain_crowd_faces_are_held_back(
    encoder: FaceEncoder, photos: dict[str, Path]
) -> None:
    result = encoder.analyse(load_image(photos["players"]))
    assert result.rejected
    gate = encoder.gate
    for rej in result.rejected:
        side = min(rej.box[2] - rej.box[0], rej.box[3] - rej.box[1])
        assert rej.det_score < gate.min_det_score or side < gate.min_face_px
        assert rej.reason
    assert result.detected == len(result.faces) + len(result.rejected)


def test_a_blurred_face_is_held_back(encoder: FaceEncoder, photos: dict[str, Path]) -> None:
    image = load_image(photos["yaoming"])
    assert len(encoder.encode(image)) == 1
    blurred = np.asarray(cv2.GaussianBlur(image, (0, 0), 4), dtype=np.uint8)
    result = encoder.analyse(blurred)
    assert result.faces == []
    assert any("blurred" in r.reason or "quality" in r.reason for r in result.rejected)


def test_a_face_too_small_is_held_back(encoder: FaceEncoder, photos: dict[str, Path]) -> None:
    image = load_image(photos["yaoming"])
    small = np.asarray(
        cv2.resize(image, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA), dtype=np.uint8
    )
    result = encoder.analyse(small)
    assert result.faces == []


def test_quality_floor_is_configurable(photos: dict[str, Path], encoder: FaceEncoder) -> None:
    strict = FaceEncoder(gate=QualityGate(min_quality=0.99), threads=1)
    assert encoder.encode(load_image(photos["gdp"]))
    result = strict.analyse(load_image(photos["gdp"]))
    assert result.faces == []
    assert all("below the floor" in r.reason or "px" in r.reason for r in result.rejected)


def test_alignment_matches_insightface_norm_crop(
    encoder: FaceEncoder, photos: dict[str, Path]
) -> None:
    from insightface.utils import face_align

    image = load_image(photos["yaoming"])
    _boxes, kpss = encoder.detect(image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # skimage's deprecated estimate()
        reference = face_align.norm_crop(image, kpss[0], 112)
    ours = align(image, kpss[0], 112)
    assert ours.shape == reference.shape == (112, 112, 3)
    assert int(np.abs(ours.astype(int) - reference.astype(int)).max()) <= 2


def test_grey_and_rgba_images_are_accepted(encoder: FaceEncoder, photos: dict[str, Path]) -> None:
    image = load_image(photos["yaoming"])
    grey = np.asarray(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), dtype=np.uint8)
    rgba = np.asarray(cv2.cvtColor(image, cv2.COLOR_BGR2BGRA), dtype=np.uint8)
    assert len(encoder.encode(grey)) == 1
    assert len(encoder.encode(rgba)) == 1


def test_wrong_arrays_are_refused(encoder: FaceEncoder) -> None:
    with pytest.raises(InvalidArgument):
        encoder.encode(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(InvalidArgument):
        encoder.encode(np.zeros((10, 10, 2), dtype=np.uint8))


# ---- enrolment from a photo -----------------------------------------------------------------


def test_enrolment_refuses_a_photo_with_several_faces(
    encoder: FaceEncoder, photos: dict[str, Path]
) -> None:
    with pytest.raises(InvalidArgument) as err:
        encode_single_face(photos["gdp"], encoder)
    assert "3 faces found" in err.value.message
    assert "exactly one" in err.value.message


def test_enrolment_refuses_a_photo_without_a_face(encoder: FaceEncoder, tmp_path: Path) -> None:
    path = tmp_path / "wall.png"
    cv2.imwrite(str(path), np.full((200, 300, 3), 128, dtype=np.uint8))
    with pytest.raises(InvalidArgument) as err:
        encode_single_face(path, encoder)
    assert "no face found" in err.value.message


def test_enrolment_refuses_a_photo_whose_faces_fail_the_gate(
    encoder: FaceEncoder, photos: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "blurred.png"
    cv2.imwrite(str(path), cv2.GaussianBlur(load_image(photos["yaoming"]), (0, 0), 4))
    with pytest.raises(InvalidArgument) as err:
        encode_single_face(path, encoder)
    assert "no usable face" in err.value.message


def test_error_messages_never_name_the_file(encoder: FaceEncoder, tmp_path: Path) -> None:
    """A file name may be a person's name: it must not reach messages (and logs)."""
    path = tmp_path / "juan_perez_quispe.jpg"
    path.write_bytes(b"not an image at all")
    with pytest.raises(InvalidArgument) as err:
        encode_single_face(path, encoder)
    assert "juan" not in err.value.diagnostics().lower()
    with pytest.raises(InvalidArgument) as err2:
        load_image(tmp_path / "maria_flores.png")
    assert "maria" not in err2.value.diagnostics().lower()


# ---- model packs ----------------------------------------------------------------------------


def test_model_dir_selects_another_pack_by_its_graphs(tmp_path: Path) -> None:
    """A pack with other file names (as buffalo_l's det_10g/w600k_r50) is recognised."""
    source = packaged_model_dir()
    assert source is not None
    pack = tmp_path / "pack"
    pack.mkdir()
    shutil.copy(source / "scrfd_500m_bnkps.onnx", pack / "det_small.onnx")
    shutil.copy(source / "w600k_mbf.onnx", pack / "arcface_site.onnx")
    shutil.copy(source / "2d106det.onnx", pack / "2d106det.onnx")  # a landmark model: ignored
    det, rec = find_models(pack)
    assert (det.name, rec.name) == ("det_small.onnx", "arcface_site.onnx")
    enc = FaceEncoder(pack, threads=1)
    # Same weights, other file name: the id names the file and pins the content hash.
    assert enc.model_id.startswith("arcface_site:")
    assert enc.model_id.split(":")[1] == default_face_model_id().split(":")[1]


def test_model_dir_without_models_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one face detector"):
        find_models(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        FaceEncoder(tmp_path / "missing", threads=1)
