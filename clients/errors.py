"""What a failed call means, decoded from the gRPC status the server sent.

The server (``centinela.server.interceptors``) maps every error to a status code, a message
naming the field or rule, a ``google.rpc.Status`` with an ``ErrorInfo`` detail in the
``grpc-status-details-bin`` trailer and, for policy denials, the ``x-centinela-rule-ids`` and
``x-centinela-decision-id`` trailers. :func:`from_rpc_error` reads all of it into one
:class:`ClientError`, so command line tools never touch raw gRPC errors. Messages come from
the server, which never puts personal data in them; this module adds none either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from centinela.errors import CentinelaError
from centinela.v1 import common_pb2

#: What a person can do about each status code (shown by the command line tools).
HINTS: Mapping[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAVAILABLE: (
        "the server cannot be reached or cannot answer safely right now; check --server and "
        "that `centinela serve` is running, then retry"
    ),
    grpc.StatusCode.UNAUTHENTICATED: (
        "the server did not accept the client certificate; check --identity, or --cert, --key "
        "and --ca (the CA must be the one that signed the server's certificate)"
    ),
    grpc.StatusCode.PERMISSION_DENIED: (
        "the policy denied this request; the rule ids say why (see LEGAL_RULES.md) and the "
        "decision id is the audited record to cite"
    ),
    grpc.StatusCode.INVALID_ARGUMENT: "fix the field named in the message and send again",
    grpc.StatusCode.FAILED_PRECONDITION: (
        "the server is not in a state to serve this (model mismatch: encode with the gallery's "
        "model, see --model-dir; facial matching switched off: plates still work)"
    ),
    grpc.StatusCode.RESOURCE_EXHAUSTED: "a rate ceiling was reached; slow down and retry later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the call took too long; retry or raise --timeout",
    grpc.StatusCode.NOT_FOUND: "the object named in the request does not exist",
    grpc.StatusCode.ALREADY_EXISTS: "an object with that identity exists with other content",
    grpc.StatusCode.UNIMPLEMENTED: "this server version does not implement the call yet",
}


class ClientError(CentinelaError):
    """A call that failed, as the server explained it.

    ``code`` is the gRPC status code; ``status`` its name (as on every Centinela error).
    ``rule_ids`` and ``decision_id`` are set for policy decisions, ``field`` when the server
    named the request field at fault, ``reason`` is the server's error class name (e.g.
    ``PolicyDenied``, ``ModelMismatch``) and ``request_id`` the id the server logged the call
    under.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        rule_ids: Sequence[str] = (),
        decision_id: str | None = None,
        field: str | None = None,
        reason: str = "",
        request_id: str = "",
    ) -> None:
        super().__init__(message, field=field, rule_ids=rule_ids, decision_id=decision_id)
        self.code = code
        self.status = code.name
        self.reason = reason
        self.request_id = request_id

    @property
    def hint(self) -> str:
        """What to do about it, in one sentence."""
        return HINTS.get(self.code, "see the server log for the request id")

    def diagnostics(self) -> str:
        """``CODE: message [rules R2, R5] [decision d_…]``; the message already names the field."""
        text = f"{self.code.name}: {self.message}"
        if self.rule_ids and "denied by policy" not in self.message:
            text += f" [rules {', '.join(self.rule_ids)}]"
        if self.decision_id and self.decision_id not in self.message:
            text += f" [decision {self.decision_id}]"
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view for ``--json`` output."""
        return {
            "code": self.code.name,
            "message": self.message,
            "field": self.field or "",
            "rule_ids": list(self.rule_ids),
            "decision_id": self.decision_id or "",
            "reason": self.reason,
            "request_id": self.request_id,
            "hint": self.hint,
        }


def _code_from_number(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def _trailer_text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def from_rpc_error(err: grpc.RpcError) -> ClientError:
    """Decode a failed call (``grpc.RpcError``, also a ``grpc.Call``) into a ClientError."""
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    message = (details_fn() if callable(details_fn) else "") or str(code.name).lower()
    trailers_fn = getattr(err, "trailing_metadata", None)
    trailers = (trailers_fn() if callable(trailers_fn) else None) or ()
    meta: dict[str, str | bytes] = {k: v for k, v in trailers}
    rule_ids: tuple[str, ...] = ()
    decision_id = ""
    field = ""
    reason = ""
    request_id = _trailer_text(meta.get("x-request-id", ""))
    raw_status = meta.get("grpc-status-details-bin")
    if isinstance(raw_status, bytes):
        status = status_pb2.Status()
        try:
            status.ParseFromString(raw_status)
        except DecodeError:
            status.Clear()
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
                reason = info.reason
                field = info.metadata.get("field", "")
                decision_id = info.metadata.get("decision_id", "")
                request_id = info.metadata.get("request_id", request_id)
                rules = info.metadata.get("rule_ids", "")
                rule_ids = tuple(r for r in rules.split(",") if r)
    if not rule_ids and "x-centinela-rule-ids" in meta:
        text = _trailer_text(meta["x-centinela-rule-ids"])
        rule_ids = tuple(r.strip() for r in text.split(",") if r.strip())
    if not decision_id and "x-centinela-decision-id" in meta:
        decision_id = _trailer_text(meta["x-centinela-decision-id"])
    return ClientError(
        code,
        message,
        rule_ids=rule_ids,
        decision_id=decision_id or None,
        field=field or None,
        reason=reason,
        request_id=request_id,
    )


def from_error_status(status: common_pb2.ErrorStatus) -> ClientError:
    """Decode the per-message error of a stream (``ErrorStatus``) into a ClientError."""
    return ClientError(
        _code_from_number(status.code),
        status.message,
        rule_ids=tuple(status.rule_ids),
        decision_id=status.decision_id or None,
        field=status.field or None,
    )
