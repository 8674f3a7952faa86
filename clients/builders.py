"""Small helpers that build the request messages of the Centinela API.

The client methods take and return the generated messages (``centinela.v1.*_pb2``); these
helpers cover the common cases so that a command line tool writes one line per request. They
never add anything the caller did not give, except a capture time of "now" on match requests
when none is given, and purposes named in text are accepted in any case and with dashes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt
from google.protobuf.timestamp_pb2 import Timestamp

from centinela.errors import InvalidArgument
from centinela.ids import ordered_token
from centinela.v1 import common_pb2, match_service_pb2

PURPOSE_NAMES: dict[str, int] = {
    name.removeprefix("PURPOSE_"): number
    for name, number in common_pb2.Purpose.items()
    if number != common_pb2.PURPOSE_UNSPECIFIED
}


def new_request_id() -> str:
    """A fresh client request id: 32 hex digits (within the 8–128 characters the API allows),
    time first (:func:`centinela.ids.ordered_token`).

    The server stores every answer by its request id for retries, in an index on (caller,
    request id): ids in creation order join that index at its edge where random ones take
    a random page each, about 8 KB more written to the server's disk per call (twice, with
    its checkpoint). The server takes any id; this one is the cheap one to keep.
    """
    return ordered_token()


def purpose_value(name: str | int) -> int:
    """The ``Purpose`` number of ``WANTED_PERSON``, ``wanted-person`` or ``PURPOSE_WANTED_PERSON``.

    Raises:
        InvalidArgument: not a purpose of the API.
    """
    if isinstance(name, int):
        return name
    key = name.strip().upper().replace("-", "_").removeprefix("PURPOSE_")
    if key not in PURPOSE_NAMES:
        choices = ", ".join(n.lower().replace("_", "-") for n in PURPOSE_NAMES)
        raise InvalidArgument(f"unknown purpose; choose one of {choices}", field="purpose")
    return PURPOSE_NAMES[key]


def timestamp(when: dt.datetime | None = None) -> Timestamp:
    """A protobuf Timestamp of ``when`` (an aware datetime), or of now."""
    ts = Timestamp()
    ts.FromDatetime((when or dt.datetime.now(dt.UTC)).astimezone(dt.UTC))
    return ts


def request_context(
    *,
    purpose: str | int = common_pb2.PURPOSE_UNSPECIFIED,
    site_id: str = "",
    capture_time: dt.datetime | None = None,
    operator_id: str = "",
    reference: str = "",
    legal_basis: str = "",
    authorisation_id: str = "",
    client_request_id: str = "",
) -> common_pb2.RequestContext:
    """A RequestContext; the client fills ``client_request_id`` when it is left empty."""
    ctx = common_pb2.RequestContext(
        purpose=purpose_value(purpose),  # type: ignore[arg-type]
        site_id=site_id,
        operator_id=operator_id,
        reference=reference,
        legal_basis=legal_basis,
        authorisation_id=authorisation_id,
        client_request_id=client_request_id,
    )
    if capture_time is not None:
        ctx.capture_time.CopyFrom(timestamp(capture_time))
    return ctx


def face_probe(
    vector: npt.NDArray[np.float32] | Sequence[float], model_id: str, quality: float
) -> common_pb2.FaceProbe:
    """A FaceProbe from an embedding (as produced by ``FaceEncoder``)."""
    values = np.asarray(vector, dtype=np.float32).ravel()
    return common_pb2.FaceProbe(model_id=model_id, vector=values.tolist(), quality=quality)


def match_face_request(
    probe: common_pb2.FaceProbe,
    *,
    site_id: str,
    purpose: str | int = common_pb2.PURPOSE_WANTED_PERSON,
    capture_time: dt.datetime | None = None,
    operator_id: str = "",
    galleries: Iterable[int] = (),
    mode: int = common_pb2.SEARCH_MODE_UNSPECIFIED,
    max_results: int = 0,
    min_score: float = 0.0,
) -> match_service_pb2.MatchFaceRequest:
    """A MatchFaceRequest; the capture time defaults to now."""
    return match_service_pb2.MatchFaceRequest(
        context=request_context(
            purpose=purpose,
            site_id=site_id,
            capture_time=capture_time or dt.datetime.now(dt.UTC),
            operator_id=operator_id,
        ),
        probe=probe,
        galleries=list(galleries),  # type: ignore[arg-type]
        mode=mode,  # type: ignore[arg-type]
        max_results=max_results,
        min_score=min_score,
    )


def plate_read(
    text: str,
    *,
    confidences: Sequence[float] = (),
    alternatives: Sequence[str] = (),
    quality: float = 0.0,
) -> common_pb2.PlateRead:
    """A PlateRead as an ANPR camera reports it."""
    return common_pb2.PlateRead(
        text=text,
        confidences=list(confidences),
        alternatives=list(alternatives),
        quality=quality,
    )


def match_plate_request(
    read: common_pb2.PlateRead,
    *,
    site_id: str,
    purpose: str | int = common_pb2.PURPOSE_STOLEN_VEHICLE,
    capture_time: dt.datetime | None = None,
    operator_id: str = "",
) -> match_service_pb2.MatchPlateRequest:
    """A MatchPlateRequest; the capture time defaults to now."""
    return match_service_pb2.MatchPlateRequest(
        context=request_context(
            purpose=purpose,
            site_id=site_id,
            capture_time=capture_time or dt.datetime.now(dt.UTC),
            operator_id=operator_id,
        ),
        read=read,
    )
