"""Per-call state shared between the interceptor and the servicers (context variables)."""

from __future__ import annotations

import contextvars
import dataclasses

from centinela.errors import Unauthenticated
from centinela.server.admission import InFlight
from centinela.server.identity import Caller


@dataclasses.dataclass
class CallState:
    """What the interceptor knows about the current call."""

    request_id: str
    method: str
    caller: Caller | None = None
    #: Filled by the servicer, so the call log can name the decision.
    decision_id: str = ""
    #: The server's in-flight ceiling (a StreamMatch takes a unit per message).
    admission: InFlight | None = None

    @property
    def share(self) -> str:
        """Whose queue this call waits in at the in-flight limit: its client certificate
        (its name where no fingerprint is known); calls without a caller share one."""
        if self.caller is None:
            return ""
        return self.caller.fingerprint or self.caller.name

    @property
    def org(self) -> str:
        """Whose organisation's share of the adaptive limit this call's stream probes take:
        its certificate's organisation (``O``), so a client cannot widen its share with
        more certificates of its own organisation; calls without a caller share one."""
        return self.caller.org if self.caller is not None else ""


_current: contextvars.ContextVar[CallState | None] = contextvars.ContextVar(
    "centinela_call", default=None
)


def set_call(state: CallState) -> contextvars.Token[CallState | None]:
    """Bind the call state for the current task."""
    return _current.set(state)


def reset_call(token: contextvars.Token[CallState | None]) -> None:
    """Restore the previous call state."""
    _current.reset(token)


def current_call() -> CallState:
    """The current call's state.

    Raises:
        Unauthenticated: called outside an intercepted call.
    """
    state = _current.get()
    if state is None:
        raise Unauthenticated("no call context")
    return state


def current_caller() -> Caller:
    """The verified caller of the current call.

    Raises:
        Unauthenticated: there is no verified caller.
    """
    caller = current_call().caller
    if caller is None:
        raise Unauthenticated("a verified client certificate is required")
    return caller
