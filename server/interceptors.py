"""The one server interceptor: request id, caller identity, admission, error mapping, call log.

Invariants:

* Every ``centinela.v1`` RPC runs with a verified caller derived from the client certificate
  (``centinela.server.identity``); without one it ends with UNAUTHENTICATED before any
  servicer code runs.
* This is the only place where :class:`centinela.errors.CentinelaError` becomes a gRPC
  status. Unexpected exceptions become INTERNAL with a generic message: their text may hold
  data that must not reach a caller, so only the exception's class is logged.
* Policy denials carry their rule ids in a ``google.rpc.Status`` with an ``ErrorInfo`` detail
  (``grpc-status-details-bin``) and in the ``x-centinela-rule-ids`` trailer.
* Beyond ``max_concurrent`` calls in flight, new calls are shed with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import inspect
import re
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

from centinela.errors import (
    CentinelaError,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)
from centinela.logs import get_logger
from centinela.server.context import CallState, reset_call, set_call
from centinela.server.identity import Caller, caller_from_pem

log = get_logger("server.rpc")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
PROTECTED_PREFIX = "/centinela.v1."

IdentityResolver = Callable[[grpc.aio.ServicerContext[Any, Any]], Caller]


def caller_from_tls(context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
    """The caller from the peer certificate that TLS verified.

    Raises:
        Unauthenticated: no verified client certificate.
    """
    auth = context.auth_context()
    pems = list(auth.get("x509_pem_cert") or [])
    if not pems:
        raise Unauthenticated("a client certificate signed by the Centinela CA is required")
    return caller_from_pem(bytes(pems[0]))


def status_code(err: CentinelaError) -> grpc.StatusCode:
    """The gRPC status code of a Centinela error."""
    return getattr(grpc.StatusCode, err.status, grpc.StatusCode.INTERNAL)


def _trailers(err: CentinelaError, request_id: str) -> tuple[tuple[str, str | bytes], ...]:
    code = status_code(err)
    meta: dict[str, str] = {"request_id": request_id}
    if err.field:
        meta["field"] = err.field
    trailers: list[tuple[str, str | bytes]] = [("x-request-id", request_id)]
    if err.rule_ids:
        meta["rule_ids"] = ",".join(err.rule_ids)
        trailers.append(("x-centinela-rule-ids", ",".join(err.rule_ids)))
    if err.decision_id:
        meta["decision_id"] = err.decision_id
        trailers.append(("x-centinela-decision-id", err.decision_id))
    info = error_details_pb2.ErrorInfo(
        reason=type(err).__name__, domain="centinela.v1", metadata=meta
    )
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name, code_pb2.INTERNAL), message=err.diagnostics()
    )
    status.details.add().Pack(info)
    trailers.append(("grpc-status-details-bin", status.SerializeToString()))
    return tuple(trailers)


class MalformedRequest:
    """Stands for a request whose bytes are not the RPC's protobuf message."""


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that yields :class:`MalformedRequest` instead of raising, so that
    undecodable bytes get INVALID_ARGUMENT (gRPC itself would answer INTERNAL)."""
    if deserialize is None:
        return None

    def safe(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:
            return MalformedRequest()

    return safe


def _check_decoded(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidArgument("the request bytes are not a valid message of this RPC")


class CentinelaInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every handler with identity, admission control, error mapping and logging."""

    def __init__(self, identity: IdentityResolver, *, max_concurrent: int = 256) -> None:
        self._identity = identity
        self._max_concurrent = max_concurrent
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Calls currently admitted."""
        return self._in_flight

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        protected = method.startswith(PROTECTED_PREFIX)
        metadata = dict(handler_call_details.invocation_metadata or ())
        wanted_id = str(metadata.get("x-request-id", ""))
        return self._wrap(handler, method, protected, wanted_id)

    # ---- wrapping --------------------------------------------------------------------

    def _begin(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, protected: bool, rid: str
    ) -> CallState:
        request_id = rid if _REQUEST_ID_RE.match(rid) else uuid.uuid4().hex
        state = CallState(request_id=request_id, method=method)
        if self._in_flight >= self._max_concurrent:
            raise ResourceExhausted("server is at its concurrency ceiling; retry with backoff")
        if protected:
            state.caller = self._identity(context)
        return state

    async def _fail(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        state: CallState,
        exc: BaseException,
        started: float,
    ) -> None:
        if isinstance(exc, CentinelaError):
            err = exc
        elif isinstance(exc, NotImplementedError):
            err = CentinelaError("this RPC is not implemented yet")
            err.status = "UNIMPLEMENTED"
        else:
            err = CentinelaError(
                "internal error; see the server log for request " + state.request_id
            )
            tb = traceback.extract_tb(exc.__traceback__)
            log.error(
                "rpc.internal_error",
                method=state.method,
                request_id=state.request_id,
                error_type=type(exc).__name__,
                # Where, never what: the message may carry request data.
                where=[f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}:{f.name}" for f in tb[-4:]],
            )
        code = status_code(err)
        self._log_call(state, code, started)
        await context.abort(
            code, err.diagnostics(), trailing_metadata=_trailers(err, state.request_id)
        )

    def _log_call(self, state: CallState, code: grpc.StatusCode, started: float) -> None:
        log.info(
            "rpc",
            method=state.method,
            code=code.name,
            request_id=state.request_id,
            caller=state.caller.name if state.caller else "",
            decision_id=state.decision_id or None,
            ms=round((time.perf_counter() - started) * 1000, 3),
        )

    def _wrap(self, handler: Any, method: str, protected: bool, rid: str) -> Any:
        interceptor = self

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                started = time.perf_counter()
                state: CallState | None = None
                token = None
                try:
                    state = interceptor._begin(context, method, protected, rid)
                    token = set_call(state)
                    _check_decoded(request)
                    interceptor._in_flight += 1
                    try:
                        result = inner_uu(request, context)
                        if inspect.isawaitable(result):
                            result = await result
                    finally:
                        interceptor._in_flight -= 1
                    context.set_trailing_metadata((("x-request-id", state.request_id),))
                    interceptor._log_call(state, grpc.StatusCode.OK, started)
                    return result
                except Exception as exc:
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    await interceptor._fail(
                        context, state or CallState(rid or "-", method), exc, started
                    )
                finally:
                    if token is not None:
                        reset_call(token)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )

        if handler.unary_stream is not None or handler.stream_stream is not None:
            streaming_request = handler.stream_stream is not None
            inner_s = handler.stream_stream if streaming_request else handler.unary_stream

            async def streaming(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                started = time.perf_counter()
                state: CallState | None = None
                token = None
                try:
                    state = interceptor._begin(context, method, protected, rid)
                    token = set_call(state)
                    if not streaming_request:
                        _check_decoded(request)
                    interceptor._in_flight += 1
                    try:
                        async for item in inner_s(request, context):
                            yield item
                    finally:
                        interceptor._in_flight -= 1
                    interceptor._log_call(state, grpc.StatusCode.OK, started)
                except Exception as exc:
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    await interceptor._fail(
                        context, state or CallState(rid or "-", method), exc, started
                    )
                finally:
                    if token is not None:
                        reset_call(token)

            factory = (
                grpc.stream_stream_rpc_method_handler
                if streaming_request
                else grpc.unary_stream_rpc_method_handler
            )
            return factory(
                streaming,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )

        inner_su = handler.stream_unary

        async def stream_unary(
            request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            started = time.perf_counter()
            state: CallState | None = None
            token = None
            try:
                state = interceptor._begin(context, method, protected, rid)
                token = set_call(state)
                interceptor._in_flight += 1
                try:
                    result = inner_su(request_iterator, context)
                    if inspect.isawaitable(result):
                        result = await result
                finally:
                    interceptor._in_flight -= 1
                interceptor._log_call(state, grpc.StatusCode.OK, started)
                return result
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await interceptor._fail(
                    context, state or CallState(rid or "-", method), exc, started
                )
            finally:
                if token is not None:
                    reset_call(token)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
