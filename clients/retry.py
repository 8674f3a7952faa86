"""Bounded retries with exponential backoff and jitter, for failures where nothing was decided.

Invariants:

* Retried (:func:`retryable`): ``UNAVAILABLE`` (the server could not be reached, or could not
  answer safely: audit or database down, fail closed, nothing was decided); a ``CANCELLED``
  the server never started (no ``x-request-id`` trailer: gRPC dropped it from a full waiting
  queue, ``centinela.server.admission``); a ``RESOURCE_EXHAUSTED`` from the server's
  in-flight limit (it carries the server's request id and no rule id). Every other code is an
  answer, and retrying it would repeat a decision or hammer a rate ceiling (R14's
  ``RESOURCE_EXHAUSTED`` names its rule and is not retried).
* Retries are bounded twice: by ``max_attempts`` and by the call's overall deadline. A retry
  never starts when its backoff would end after the deadline.
* Retried calls are idempotent on the server because the client fills the request's
  ``client_request_id`` once per logical call and every attempt reuses it
  (``centinela.clients.client``).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

T = TypeVar("T")

#: Codes always worth retrying. Deliberately one (see :func:`retryable` for the others).
RETRYABLE: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})


def retryable(err: grpc.RpcError) -> bool:
    """Whether a failed call decided nothing and may be sent again (see the module doc)."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    if code in RETRYABLE:
        return True
    if code not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return False
    trailers = getattr(err, "trailing_metadata", None)
    keys = {k for k, _v in (trailers() if callable(trailers) else None) or ()}
    if code == grpc.StatusCode.CANCELLED:
        return "x-request-id" not in keys  # dropped unstarted by the waiting bound
    return "x-request-id" in keys and "x-centinela-rule-ids" not in keys  # in-flight limit


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a call that decided nothing (:func:`retryable`).

    The n-th retry (n from 1) waits ``min(max_backoff, initial_backoff * multiplier**(n-1))``
    seconds scaled by a random factor in ``[1 - jitter, 1]`` (so many edge agents restarting at
    once do not retry in lock-step).
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must lie in [0, 1]")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be non-negative and the multiplier at least 1")

    def backoff(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return base * (1.0 - self.jitter * rand())


#: No retries at all (for callers that handle UNAVAILABLE themselves).
NO_RETRY = RetryPolicy(max_attempts=1)


def call_with_retry(
    attempt: Callable[[float | None], T],
    policy: RetryPolicy,
    *,
    timeout: float | None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
) -> T:
    """Run ``attempt(remaining_timeout)`` until it succeeds, fails for good, or time runs out.

    ``timeout`` is the logical call's overall deadline in seconds (None: no deadline); each
    attempt gets what remains of it.

    Raises:
        grpc.RpcError: the last attempt's error (non-retryable, attempts exhausted, or no time
            left for another attempt).
    """
    deadline = None if timeout is None else clock() + timeout
    retry = 0
    while True:
        remaining = None if deadline is None else max(0.0, deadline - clock())
        try:
            return attempt(remaining)
        except grpc.RpcError as err:
            retry += 1
            if not retryable(err) or retry >= policy.max_attempts:
                raise
            wait = policy.backoff(retry, rand)
            if deadline is not None and clock() + wait >= deadline:
                raise
            sleep(wait)
