"""Input validation for match RPCs, before any policy or matcher work (DESIGN.md §2 step 3).

Every failure raises :class:`centinela.errors.InvalidArgument` (or ``ModelMismatch``) naming
the field; messages never echo the offending values (they may be biometric or personal).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any

import numpy as np
import numpy.typing as npt

from centinela.audit.entry import check_opaque_id, is_label
from centinela.errors import InvalidArgument, ModelMismatch
from centinela.v1 import common_pb2

#: Largest dimension accepted before anything else is checked (guards memory).
MAX_DIMENSION = 4096
#: Tolerance on the L2 norm of a probe (ArcFace embeddings are normalised at the edge).
NORM_TOLERANCE = 0.01
#: Capture times may lie this far in the future (clock skew between edge and server).
MAX_CLOCK_SKEW = dt.timedelta(seconds=30)
#: Captures older than this are refused: a real-time alarm on a week-old frame is no alarm.
MAX_CAPTURE_AGE = dt.timedelta(days=7)

# Anchored with \Z, not $: "$" also matches before a final newline ("41234567\n").
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}\Z")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{8,128}\Z")
# Operator ids are pseudonymous tokens (they enter the audit log as they are).
_OPERATOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@=+-]{11,127}\Z")
_DNI_RE = re.compile(r"^[0-9]{8}\Z")
_PLATE_CHARS_RE = re.compile(r"^[A-Za-z0-9 -]{1,16}\Z")
_CATEGORY_RE = re.compile(r"^[A-Z0-9_]{1,64}\Z")

PURPOSES = {
    common_pb2.PURPOSE_WANTED_PERSON: "WANTED_PERSON",
    common_pb2.PURPOSE_STOLEN_VEHICLE: "STOLEN_VEHICLE",
    common_pb2.PURPOSE_MISSING_PERSON: "MISSING_PERSON",
    common_pb2.PURPOSE_JUDICIAL_INVESTIGATION: "JUDICIAL_INVESTIGATION",
    common_pb2.PURPOSE_IDENTITY_VERIFICATION: "IDENTITY_VERIFICATION",
}
GALLERIES = {
    common_pb2.GALLERY_PNP_WATCHLIST: "pnp_watchlist",
    common_pb2.GALLERY_RENIEC_REGISTRY: "reniec_registry",
    common_pb2.GALLERY_STOLEN_VEHICLES: "stolen_vehicles",
}
GALLERY_ENUM = {v: k for k, v in GALLERIES.items()}


def check_id(value: str, field: str, *, required: bool = True) -> str:
    """An identifier: 1–128 characters of letters, digits and ``._:/-``."""
    if not value:
        if required:
            raise InvalidArgument("is required", field=field)
        return ""
    if not _ID_RE.match(value):
        raise InvalidArgument(
            "must be 1-128 characters of letters, digits and ._:/- (starting alphanumeric)",
            field=field,
        )
    return value


def check_site_id(value: str, field: str, *, required: bool = True) -> str:
    """A site id: a letter, then up to 63 letters, digits and ``_.:-`` (the shape the audit
    log records it in; refused here so an odd id is the caller's INVALID_ARGUMENT, not a
    refused audit entry)."""
    if not value:
        if required:
            raise InvalidArgument("is required", field=field)
        return ""
    if not is_label(value):  # site ids enter every audit entry as labels
        raise InvalidArgument(
            "must be a letter then up to 63 letters, digits and _.:- (e.g. mira-portico-01)",
            field=field,
        )
    return value


def check_text(value: str, field: str, *, max_len: int, required: bool = False) -> str:
    """Free text of bounded length with no control characters."""
    if not value:
        if required:
            raise InvalidArgument("is required", field=field)
        return ""
    if len(value) > max_len:
        raise InvalidArgument(f"is longer than {max_len} characters", field=field)
    if any(ord(c) < 32 for c in value):
        raise InvalidArgument("contains control characters", field=field)
    return value


def check_category(value: str, field: str, *, required: bool = True) -> str:
    """An upper-case category code such as ``ROBO_AGRAVADO``."""
    if not value:
        if required:
            raise InvalidArgument("is required", field=field)
        return ""
    if not _CATEGORY_RE.match(value):
        raise InvalidArgument("must be 1-64 characters of A-Z, 0-9 and _", field=field)
    return value


def check_dni(value: str, field: str = "dni") -> str:
    """A Peruvian DNI: exactly 8 digits. The message never repeats the value."""
    if not _DNI_RE.match(value or ""):
        raise InvalidArgument("must be exactly 8 digits", field=field)
    return value


#: The range google.protobuf.Timestamp allows: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def timestamp(ts: Any, field: str = "timestamp") -> dt.datetime:
    """A protobuf Timestamp as an aware UTC datetime.

    Raises:
        InvalidArgument: seconds or nanos outside the range the Timestamp type allows.
    """
    if not (_MIN_SECONDS <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos <= 999_999_999):
        raise InvalidArgument("is outside the range of google.protobuf.Timestamp", field=field)
    return dt.datetime.fromtimestamp(ts.seconds, dt.UTC) + dt.timedelta(
        microseconds=ts.nanos // 1000
    )


def check_context(
    ctx: common_pb2.RequestContext,
    *,
    field: str = "context",
    purpose_required: bool = True,
    site_required: bool = False,
    capture_required: bool = False,
    reference_required: bool = False,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Validate a RequestContext and return it as the policy input's ``context`` document.

    An unknown purpose is not rejected here: the policy denies it with R1 (and the denial is
    audited); an *unspecified* purpose where one is required is a malformed request.
    """
    now = now or dt.datetime.now(dt.UTC)
    out: dict[str, Any] = {"now": now.isoformat()}
    if purpose_required:
        if ctx.purpose == common_pb2.PURPOSE_UNSPECIFIED:
            raise InvalidArgument(
                "is required (R1): declare why this request is made", field=f"{field}.purpose"
            )
        out["purpose"] = PURPOSES.get(ctx.purpose, f"UNKNOWN_{int(ctx.purpose)}")
    out["site_id"] = check_site_id(ctx.site_id, f"{field}.site_id", required=site_required)
    if ctx.HasField("capture_time"):
        when = timestamp(ctx.capture_time, f"{field}.capture_time")
        if when > now + MAX_CLOCK_SKEW:
            raise InvalidArgument(
                "lies in the future beyond the allowed clock skew", field=f"{field}.capture_time"
            )
        if when < now - MAX_CAPTURE_AGE:
            raise InvalidArgument("is older than 7 days", field=f"{field}.capture_time")
        out["capture_time"] = when.isoformat()
    elif capture_required:
        raise InvalidArgument("is required", field=f"{field}.capture_time")
    out["authorisation_id"] = check_id(
        ctx.authorisation_id, f"{field}.authorisation_id", required=False
    )
    out["legal_basis"] = check_text(ctx.legal_basis, f"{field}.legal_basis", max_len=256)
    if ctx.operator_id:
        if not _OPERATOR_RE.match(ctx.operator_id):
            raise InvalidArgument(
                "must be a pseudonymous token of 12-128 characters of [A-Za-z0-9_.:@=+-]",
                field=f"{field}.operator_id",
            )
        # The audit log refuses ids shaped like a plate or holding a DNI-like digit run.
        check_opaque_id(f"{field}.operator_id", ctx.operator_id)
    out["operator_id"] = ctx.operator_id
    out["reference"] = check_id(ctx.reference, f"{field}.reference", required=reference_required)
    if ctx.offence_category:
        out["offence_category"] = check_category(ctx.offence_category, f"{field}.offence_category")
    if ctx.client_request_id and not _REQUEST_ID_RE.match(ctx.client_request_id):
        raise InvalidArgument(
            "must be 8-128 characters of [A-Za-z0-9._:-]", field=f"{field}.client_request_id"
        )
    return out


def check_vector(
    values: Any, *, dimension: int, field: str, check_norm: bool = True
) -> npt.NDArray[np.float32]:
    """A face vector: the gallery's dimension, finite values, unit L2 norm (± tolerance)."""
    n = len(values)
    if n == 0:
        raise InvalidArgument("is empty", field=field)
    if n > MAX_DIMENSION or n != dimension:
        raise InvalidArgument(f"has {n} values; the gallery's model has {dimension}", field=field)
    vec = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(vec)):
        raise InvalidArgument("contains NaN or infinite values", field=field)
    if check_norm:
        norm = float(np.linalg.norm(vec))
        if not math.isfinite(norm) or abs(norm - 1.0) > NORM_TOLERANCE:
            raise InvalidArgument(
                f"must be L2-normalised (norm within {NORM_TOLERANCE} of 1)", field=field
            )
    return vec


def check_face_probe(
    probe: common_pb2.FaceProbe, *, model_id: str, dimension: int, field: str = "probe"
) -> npt.NDArray[np.float32]:
    """Validate a FaceProbe against a gallery's model; return the vector.

    Raises:
        InvalidArgument: malformed vector or quality.
        ModelMismatch: the probe comes from another model (R13).
    """
    if not probe.model_id:
        raise InvalidArgument("is required", field=f"{field}.model_id")
    if not (0.0 <= probe.quality <= 1.0) or math.isnan(probe.quality):
        raise InvalidArgument("must lie in [0, 1]", field=f"{field}.quality")
    if probe.model_id != model_id:
        raise ModelMismatch(
            "comes from another embedding model than the gallery's (R13); "
            "re-encode with the gallery's model",
            field=f"{field}.model_id",
        )
    return check_vector(probe.vector, dimension=dimension, field=f"{field}.vector")


def check_plate_read(read: common_pb2.PlateRead, field: str = "read") -> None:
    """Validate a PlateRead's shape (normalisation itself is the matcher's)."""
    if not read.text:
        raise InvalidArgument("is required", field=f"{field}.text")
    if not _PLATE_CHARS_RE.match(read.text):
        raise InvalidArgument(
            "must be 1-16 letters, digits, spaces or dashes", field=f"{field}.text"
        )
    alnum = sum(c.isalnum() for c in read.text)
    if not 4 <= alnum <= 10:
        raise InvalidArgument("must hold 4-10 letters or digits", field=f"{field}.text")
    if read.confidences:
        if len(read.confidences) != alnum:
            raise InvalidArgument(
                "must have one value per letter or digit of the text", field=f"{field}.confidences"
            )
        if not all(0.0 <= c <= 1.0 for c in read.confidences):
            raise InvalidArgument("values must lie in [0, 1]", field=f"{field}.confidences")
    if len(read.alternatives) > 8:
        raise InvalidArgument("at most 8 alternatives", field=f"{field}.alternatives")
    for i, alt in enumerate(read.alternatives):
        if not _PLATE_CHARS_RE.match(alt) or not 4 <= sum(c.isalnum() for c in alt) <= 10:
            raise InvalidArgument(
                "is not a plate of 4-10 letters or digits", field=f"{field}.alternatives[{i}]"
            )
    if not (0.0 <= read.quality <= 1.0) or math.isnan(read.quality):
        raise InvalidArgument("must lie in [0, 1]", field=f"{field}.quality")
