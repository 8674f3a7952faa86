"""Validation names the field and never echoes the value."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from centinela.errors import InvalidArgument, ModelMismatch
from centinela.server import validation as v
from centinela.v1 import common_pb2

MODEL = "arcface-test:0001"


def _unit(dim: int = 512, seed: int = 0) -> list[float]:
    x = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return [float(v) for v in x / np.linalg.norm(x)]


def _probe(**kw: object) -> common_pb2.FaceProbe:
    args: dict[str, object] = {"model_id": MODEL, "vector": _unit(), "quality": 0.9}
    args.update(kw)
    return common_pb2.FaceProbe(**args)  # type: ignore[arg-type]


def _ts(when: dt.datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(when)
    return t


def test_good_probe_passes() -> None:
    vec = v.check_face_probe(_probe(), model_id=MODEL, dimension=512)
    assert vec.shape == (512,)
    assert vec.dtype == np.float32


@pytest.mark.parametrize(
    ("probe", "field"),
    [
        (_probe(vector=_unit(128)), "probe.vector"),
        (_probe(vector=[]), "probe.vector"),
        (_probe(vector=[float("nan"), *_unit()[1:]]), "probe.vector"),
        (_probe(vector=[float("inf"), *_unit()[1:]]), "probe.vector"),
        (_probe(vector=[x * 2 for x in _unit()]), "probe.vector"),
        (_probe(quality=1.5), "probe.quality"),
        (_probe(model_id=""), "probe.model_id"),
    ],
)
def test_bad_probe_names_the_field(probe: common_pb2.FaceProbe, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        v.check_face_probe(probe, model_id=MODEL, dimension=512)
    assert err.value.field == field
    if len(probe.vector) > 1:  # no vector value is echoed
        assert f"{probe.vector[1]:.4f}"[:6] not in err.value.diagnostics()


def test_other_model_is_a_failed_precondition() -> None:
    with pytest.raises(ModelMismatch) as err:
        v.check_face_probe(_probe(model_id="other:1"), model_id=MODEL, dimension=512)
    assert err.value.status == "FAILED_PRECONDITION"


def test_context_requires_purpose_and_rejects_future_capture() -> None:
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(InvalidArgument, match="R1"):
        v.check_context(common_pb2.RequestContext(site_id="s1"))
    future = common_pb2.RequestContext(
        purpose=common_pb2.PURPOSE_WANTED_PERSON,
        site_id="s1",
        capture_time=_ts(now + dt.timedelta(minutes=5)),
    )
    with pytest.raises(InvalidArgument) as err:
        v.check_context(future, capture_required=True)
    assert err.value.field == "context.capture_time"
    ok = common_pb2.RequestContext(
        purpose=common_pb2.PURPOSE_WANTED_PERSON, site_id="s1", capture_time=_ts(now)
    )
    doc = v.check_context(ok, site_required=True, capture_required=True)
    assert doc["purpose"] == "WANTED_PERSON"
    assert doc["site_id"] == "s1"


def test_unknown_purpose_reaches_the_policy() -> None:
    ctx = common_pb2.RequestContext(purpose=99)  # type: ignore[arg-type]
    assert v.check_context(ctx)["purpose"] == "UNKNOWN_99"


@pytest.mark.parametrize(
    ("read", "field"),
    [
        (common_pb2.PlateRead(text=""), "read.text"),
        (common_pb2.PlateRead(text="AB"), "read.text"),
        (common_pb2.PlateRead(text="ABC-123\x00"), "read.text"),
        (common_pb2.PlateRead(text="ABC-123", confidences=[0.9, 0.9]), "read.confidences"),
        (common_pb2.PlateRead(text="ABC-123", alternatives=["x"]), "read.alternatives[0]"),
    ],
)
def test_bad_plate_read_names_the_field(read: common_pb2.PlateRead, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        v.check_plate_read(read)
    assert err.value.field == field
    if read.text:
        assert read.text not in err.value.diagnostics()


@given(st.text(alphabet="0123456789ABC-", min_size=5, max_size=12))
def test_dni_check_never_echoes(value: str) -> None:
    if len(value) == 8 and value.isdigit():
        assert v.check_dni(value) == value
        return
    with pytest.raises(InvalidArgument) as err:
        v.check_dni(value)
    assert value not in err.value.diagnostics()
