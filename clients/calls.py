"""The call machinery under ``CentinelaClient``: ids, deadlines, retries, error decoding.

Invariants:

* Every request that has a ``RequestContext`` leaves with a ``client_request_id``: the
  caller's, or a fresh one per logical call. The caller's message is copied, never changed,
  so re-using a message object for a second call can never make the server treat it as a
  retry of the first. All attempts of one call share the id (server-side idempotency).
* Only UNAVAILABLE is retried, bounded by attempts and by the call's deadline
  (``centinela.clients.retry``). Streams are not retried once a message has been received,
  except where the RPC has a resume point (``resume``), which then decides the next request.
* Every failure reaches the caller as a :class:`~centinela.clients.errors.ClientError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from centinela.clients.builders import new_request_id
from centinela.clients.errors import from_rpc_error
from centinela.clients.retry import RetryPolicy, call_with_retry, retryable

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

#: Default overall deadline of a unary call, seconds (retries included).
DEFAULT_TIMEOUT = 10.0


def _has_context(message: Message) -> bool:
    return "context" in message.DESCRIPTOR.fields_by_name


def prepare(request: Req, operator_id: str = "") -> tuple[Req, str]:
    """A copy of ``request`` with its client request id (and default operator id) filled.

    Returns the copy and the id ("" for requests without a context).
    """
    copy = type(request)()
    copy.CopyFrom(request)
    if not _has_context(copy):
        return copy, ""
    ctx: Any = copy.context  # type: ignore[attr-defined]
    if not ctx.client_request_id:
        ctx.client_request_id = new_request_id()
    if operator_id and not ctx.operator_id:
        ctx.operator_id = operator_id
    return copy, str(ctx.client_request_id)


class CallCore:
    """Deadlines, retries and error decoding shared by every typed method."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        operator_id: str = "",
    ) -> None:
        self.channel = channel
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.operator_id = operator_id

    def _metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        # The server logs the call under this id, so client and server logs line up.
        return (("x-request-id", request_id),) if request_id else ()

    def unary(
        self,
        method: Callable[..., Resp],
        request: Req,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> Resp:
        """Call a unary RPC with deadline, retries and error decoding.

        Raises:
            ClientError: the call failed (after retries, for UNAVAILABLE).
        """
        sent, rid = prepare(request, self.operator_id)
        metadata = self._metadata(rid)

        def attempt(remaining: float | None) -> Resp:
            return method(sent, timeout=remaining, metadata=metadata)

        try:
            return call_with_retry(
                attempt, retry or self.retry, timeout=self.timeout if timeout is None else timeout
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def stream_unary(
        self,
        method: Callable[..., Resp],
        requests: Iterable[Req],
        *,
        timeout: float | None = None,
    ) -> Resp:
        """Call a client-streaming RPC. A list or tuple of requests is retried on UNAVAILABLE
        (the same messages, same ids); a one-shot iterator is not.

        Raises:
            ClientError: the call failed.
        """
        replayable = isinstance(requests, Sequence)
        first_id: list[str] = []

        def stamped(items: Iterable[Req]) -> Iterator[Req]:
            for i, item in enumerate(items):
                if i == 0:
                    item, rid = prepare(item, self.operator_id)
                    first_id.append(rid)
                yield item

        if replayable:
            prepared = list(stamped(requests))
            metadata = self._metadata(first_id[0] if first_id else "")

            def attempt(remaining: float | None) -> Resp:
                return method(iter(prepared), timeout=remaining, metadata=metadata)

            policy = self.retry
        else:

            def attempt(remaining: float | None) -> Resp:
                return method(stamped(requests), timeout=remaining)

            policy = RetryPolicy(max_attempts=1)
        try:
            return call_with_retry(
                attempt, policy, timeout=self.timeout if timeout is None else timeout
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def server_stream(
        self,
        method: Callable[..., grpc.CallIterator[Resp]],
        request: Req,
        *,
        timeout: float | None = None,
        resume: Callable[[Req, Resp], Req] | None = None,
    ) -> Iterator[Resp]:
        """Iterate a server-streaming RPC; ``timeout`` None means no deadline.

        UNAVAILABLE before the first message is retried; after a message it is retried only
        with ``resume`` (the next request given the last message received), and the retry
        count starts again after each message received.

        Raises:
            ClientError: the stream failed.
        """
        sent, rid = prepare(request, self.operator_id)
        metadata = self._metadata(rid)
        failures = 0
        received_any = False
        while True:
            call = method(sent, timeout=timeout, metadata=metadata)
            try:
                for item in call:
                    received_any = True
                    failures = 0
                    if resume is not None:
                        sent = resume(sent, item)
                    yield item
                return
            except grpc.RpcError as err:
                failures += 1
                again = retryable(err) and (resume is not None or not received_any)
                if not again or failures >= self.retry.max_attempts:
                    raise from_rpc_error(err) from None
                # A resumed stream is a new logical call: it gets its own id.
                if received_any and resume is not None:
                    sent, rid = prepare(_without_request_id(sent), self.operator_id)
                    metadata = self._metadata(rid)
                time.sleep(self.retry.backoff(failures))
            finally:
                call.cancel()  # type: ignore[no-untyped-call]

    def stream_stream(
        self,
        method: Callable[..., grpc.CallIterator[Resp]],
        requests: Iterable[Req],
        *,
        timeout: float | None = None,
        stamp: Callable[[Req], Req] | None = None,
    ) -> Iterator[Resp]:
        """Iterate a bidirectional stream; each request passes through ``stamp`` first.

        Not retried: the caller knows which requests were answered and reconnects itself.

        Raises:
            ClientError: the stream failed.
        """

        def outgoing() -> Iterator[Req]:
            for item in requests:
                yield stamp(item) if stamp is not None else item

        call = method(outgoing(), timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()  # type: ignore[no-untyped-call]


def _without_request_id(request: Req) -> Req:
    copy = type(request)()
    copy.CopyFrom(request)
    copy.context.client_request_id = ""  # type: ignore[attr-defined]
    return copy
