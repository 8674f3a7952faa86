"""The one server interceptor: request id, caller identity, admission, error mapping, call log.

Invariants:

* Every ``centinela.v1`` RPC runs with a verified caller derived from the client certificate
  (``centinela.server.identity``); without one it ends with UNAUTHENTICATED before any
  servicer code runs. A certificate on the CA's revocation list is refused the same way
  (:class:`TlsIdentity`); when no valid list can be read, every call is refused with
  UNAVAILABLE (fail closed).
* Every refused identity (UNAUTHENTICATED, revocation unavailable) and every permission
  denial is logged as a ``security`` event with the reason, the peer address and the
  certificate's serial, SHA-256 fingerprint and subject CN: public facts only, never key
  material. Certificates TLS itself refuses (no certificate, another CA, expired) never reach
  this code: gRPC's core logs those handshakes, not the service.
* This is the only place where :class:`centinela.errors.CentinelaError` becomes a gRPC
  status. Unexpected exceptions become INTERNAL with a generic message: their text may hold
  data that must not reach a caller, so only the exception's class is logged.
* Policy denials carry their rule ids in a ``google.rpc.Status`` with an ``ErrorInfo`` detail
  (``grpc-status-details-bin``) and in the ``x-centinela-rule-ids`` trailer.
* Beyond the limit of units of work in flight (a call, or one message of a long-lived
  stream: :class:`~centinela.server.admission.InFlight`), new work waits in its caller's
  queue, served round robin with the other callers' (identity is therefore resolved first),
  and is shed with RESOURCE_EXHAUSTED past the wait or the queue bound. Stream probes are
  also held at each active caller's share of an adaptive limit below the ceiling, and the
  callers of one organisation together at its share (``admission_gain``; a caller alone
  only at the ceiling); imports and exports hold a unit of the ceiling only and are
  refused past it, never queued. A unary call whose deadline
  leaves less than the service takes now is refused with DEADLINE_EXCEEDED, not started.
* Every call the service started ends with one ``rpc`` log line (method, code, request id,
  caller, decision id, milliseconds), including a call whose client went away: logged
  DEADLINE_EXCEEDED when its deadline passed, CANCELLED when it was cancelled. Either reaches
  the call as a cancellation of its task; a decision already made stays in the audit log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import re
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from google.rpc import code_pb2, error_details_pb2, status_pb2

from centinela.config import Settings
from centinela.errors import (
    CentinelaError,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
)
from centinela.logs import get_logger
from centinela.server import certs
from centinela.server.admission import InFlight
from centinela.server.context import CallState, reset_call, set_call
from centinela.server.identity import Caller, caller_from_pem
from centinela.storage import unreachable

log = get_logger("server.rpc")
security = get_logger("server.security")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{8,128}\Z")
PROTECTED_PREFIX = "/centinela.v1."
#: Streams that stay open for hours, idle between messages: they hold no in-flight unit for
#: their lifetime (StreamMatch takes one per probe; a subscription only waits).
LONG_LIVED = frozenset(
    {"/centinela.v1.MatchService/StreamMatch", "/centinela.v1.MatchService/SubscribeAlerts"}
)

IdentityResolver = Callable[[grpc.aio.ServicerContext[Any, Any]], Caller]


#: A call cancelled this close to its deadline is logged as past it (:meth:`_log_cancelled`).
DEADLINE_SLACK_S = 0.1


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The call's deadline on ``time.monotonic``'s clock (the admission's), if it has one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


# ---- identity --------------------------------------------------------------------------


class IdentityRefused(Unauthenticated):
    """The peer certificate gives no caller; ``reason`` (a short code) goes to the log."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RevocationUnavailable(Unavailable):
    """No valid revocation list: every call is refused until one is back (fail closed)."""

    reason = "revocation_unavailable"


@dataclasses.dataclass(frozen=True)
class PeerCertificate:
    """The public facts of a peer certificate that logs and revocation use."""

    serial: int
    #: SHA-256 of the DER certificate, hex.
    fingerprint: str
    subject_cn: str

    def log_fields(self) -> dict[str, str]:
        return {
            "cert_serial": format(self.serial, "x"),
            "cert_fingerprint": self.fingerprint,
            "cert_cn": self.subject_cn,
        }


@functools.lru_cache(maxsize=1024)
def peer_certificate(pem: bytes) -> PeerCertificate | None:
    """Serial, fingerprint and CN of a PEM certificate (None if it does not parse)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value)[:128] if cns else ""
    return PeerCertificate(cert.serial_number, cert.fingerprint(hashes.SHA256()).hex(), cn)


def _peer_pem(context: grpc.aio.ServicerContext[Any, Any]) -> bytes | None:
    pems = list(context.auth_context().get("x509_pem_cert") or [])
    return bytes(pems[0]) if pems else None


def peer_facts(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """Who is at the other end, for a security event: address and certificate facts."""
    facts = {"peer": str(context.peer() or "")}
    pem = _peer_pem(context)
    cert = peer_certificate(pem) if pem else None
    if cert is not None:
        facts.update(cert.log_fields())
    return facts


class TlsIdentity:
    """The caller from the peer certificate that TLS verified, unless the CA revoked it.

    gRPC's TLS stack does not consult CRLs, so revocation is checked here, on every call,
    against :class:`centinela.server.certs.RevocationChecker` (which re-reads the list when
    its file changes).
    """

    def __init__(self, revocation: certs.RevocationChecker | None = None) -> None:
        self.revocation = revocation
        self._generation = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsIdentity:
        """Checking the CRL the settings name (``crl_file``, default ``certs_dir/crl.pem``)."""
        if settings.insecure_dev:
            return cls(None)
        checker = certs.RevocationChecker(
            settings.effective_crl_file,
            certs.server_files(settings.effective_certs_dir).ca,
            required=settings.crl_file is not None,
        )
        return cls(checker)

    def __call__(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        """The verified caller.

        Raises:
            IdentityRefused: no certificate, an unreadable one, a revoked one, or one that
                names no Centinela caller (UNAUTHENTICATED).
            RevocationUnavailable: no valid revocation list (UNAVAILABLE, fail closed).
        """
        pem = _peer_pem(context)
        if pem is None:
            raise IdentityRefused(
                "a client certificate signed by the Centinela CA is required", "no_certificate"
            )
        cert = peer_certificate(pem)
        if cert is None:
            raise IdentityRefused("the client certificate could not be parsed", "unparseable")
        if self.revocation is not None:
            try:
                revoked = self.revocation.is_revoked(cert.serial)
            except certs.RevocationUnavailable:
                self._report()
                raise RevocationUnavailable(
                    "the server cannot check certificate revocation and refuses every call "
                    "until its revocation list is valid again; retry later"
                ) from None
            self._report()
            if revoked:
                raise IdentityRefused("the client certificate has been revoked", "revoked")
        try:
            return caller_from_pem(pem)
        except Unauthenticated as exc:
            raise IdentityRefused(exc.message, "not_a_centinela_identity") from None

    def _report(self) -> None:
        """Log each change of the revocation list's state once."""
        checker = self.revocation
        if checker is None or checker.generation == self._generation:
            return
        self._generation = checker.generation
        if checker.problem is not None:
            security.error(
                "identity.revocation_unavailable",
                crl_file=str(checker.crl_path),
                problem=checker.problem,
                effect="every call is refused until a valid CRL is in place",
            )
        else:
            security.info("identity.revocation_list_loaded", crl_file=str(checker.crl_path))


#: The caller from TLS alone, without revocation (tests and embedded servers).
caller_from_tls: IdentityResolver = TlsIdentity()


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


async def _decoded(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream's messages; an undecodable one ends the call with INVALID_ARGUMENT."""
    async for item in requests:
        _check_decoded(item)
        yield item


class CentinelaInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every handler with identity, admission control, error mapping and logging."""

    def __init__(
        self,
        identity: IdentityResolver,
        admission: InFlight,
    ) -> None:
        self._identity = identity
        self.admission = admission

    @property
    def in_flight(self) -> int:
        """Units of work currently admitted, bulk work included (see :class:`InFlight`)."""
        return self.admission.count + self.admission.bulk

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
        state = CallState(request_id=request_id, method=method, admission=self.admission)
        if protected:
            try:
                state.caller = self._identity(context)
            except CentinelaError as exc:
                security.warning(
                    "identity.refused",
                    reason=getattr(exc, "reason", type(exc).__name__),
                    code=status_code(exc).name,
                    method=method,
                    request_id=request_id,
                    **peer_facts(context),
                )
                raise
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
            down = unreachable(exc)
            err = down or CentinelaError(
                "internal error; see the server log for request " + state.request_id
            )
            # Where, never what: the message may carry request data.
            (log.warning if down else log.error)(
                "rpc.database_unavailable" if down else "rpc.internal_error",
                method=state.method,
                request_id=state.request_id,
                error_type=type(exc).__name__,
                where=_where(exc),
            )
        code = status_code(err)
        if code == grpc.StatusCode.PERMISSION_DENIED and state.caller is not None:
            security.warning(
                "access.denied",
                method=state.method,
                request_id=state.request_id,
                caller=state.caller.name,
                rule_ids=list(err.rule_ids),
                decision_id=err.decision_id or None,
                **peer_facts(context),
            )
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

    def _log_cancelled(
        self, context: grpc.aio.ServicerContext[Any, Any], state: CallState | None, started: float
    ) -> None:
        """A call that ends because its client went away is logged too: DEADLINE_EXCEEDED
        when its deadline has passed, or is within ``DEADLINE_SLACK_S`` (the client's own
        timer fires at the deadline and cancels the call, which reaches the server a transit
        time before the server's copy of the deadline), else CANCELLED. Under overload most
        of a flood's calls end so, and the call log must account for every call the service
        started."""
        if state is None:
            return
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= DEADLINE_SLACK_S
        code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        self._log_call(state, code, started)

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
                    await interceptor.admission.acquire(
                        state.share, org=state.org, deadline=_deadline(context)
                    )
                    entered = time.perf_counter()
                    try:
                        result = inner_uu(request, context)
                        if inspect.isawaitable(result):
                            result = await result
                    finally:
                        interceptor.admission.leave(time.perf_counter() - entered)
                    context.set_trailing_metadata((("x-request-id", state.request_id),))
                    interceptor._log_call(state, grpc.StatusCode.OK, started)
                    return result
                except asyncio.CancelledError:
                    interceptor._log_cancelled(context, state, started)
                    raise
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
            # A long-lived stream takes no unit itself (its servicer takes one per message).
            holds_unit = method not in LONG_LIVED

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
                    if holds_unit:
                        await interceptor.admission.acquire(state.share, bulk=True)
                    try:
                        async for item in inner_s(request, context):
                            yield item
                    finally:
                        if holds_unit:
                            interceptor.admission.leave(bulk=True)
                    interceptor._log_call(state, grpc.StatusCode.OK, started)
                except (asyncio.CancelledError, GeneratorExit):
                    interceptor._log_cancelled(context, state, started)
                    raise
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
                await interceptor.admission.acquire(state.share, bulk=True)
                try:
                    result = inner_su(_decoded(request_iterator), context)
                    if inspect.isawaitable(result):
                        result = await result
                finally:
                    interceptor.admission.leave(bulk=True)
                interceptor._log_call(state, grpc.StatusCode.OK, started)
                return result
            except asyncio.CancelledError:
                interceptor._log_cancelled(context, state, started)
                raise
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


def _where(exc: BaseException) -> list[str]:
    """The last frames an exception passed through."""
    tb = traceback.extract_tb(exc.__traceback__)
    return [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}:{f.name}" for f in tb[-4:]]
