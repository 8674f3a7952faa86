"""One error hierarchy for all of Centinela.

Every error a component raises on purpose derives from :class:`CentinelaError`. Each class
names what went wrong and carries the gRPC status code name it maps to; the mapping to real
``grpc.StatusCode`` values happens in exactly one place, the server's error interceptor
(``centinela.server.interceptors``). Handlers never abort with an ad-hoc status.

Messages must never contain biometric data, plates, DNIs or names (they reach logs and
callers): say which *field* is wrong, not what it held.
"""

from __future__ import annotations

from collections.abc import Sequence


class CentinelaError(Exception):
    """Base of every error Centinela raises on purpose.

    ``status`` is the name of the ``grpc.StatusCode`` the error maps to.
    """

    status: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        rule_ids: Sequence[str] = (),
        decision_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        #: Rule ids of LEGAL_RULES.md behind the error, when a policy decision caused it.
        self.rule_ids = tuple(rule_ids)
        #: The audited decision that this error answers, if one was made.
        self.decision_id = decision_id

    def diagnostics(self) -> str:
        """A human text: what went wrong and, where known, what to do about it."""
        if self.field:
            return f"{self.field}: {self.message}"
        return self.message


# --- caller errors -----------------------------------------------------------------------


class InvalidArgument(CentinelaError):
    """Malformed input; ``field`` names the offending field."""

    status = "INVALID_ARGUMENT"


class NotFound(CentinelaError):
    """The named object does not exist (or the caller may not know it exists)."""

    status = "NOT_FOUND"


class AlreadyExists(CentinelaError):
    """An object with that identity exists with different content."""

    status = "ALREADY_EXISTS"


class FailedPrecondition(CentinelaError):
    """The request is well-formed but the system is not in a state to serve it."""

    status = "FAILED_PRECONDITION"


class ModelMismatch(FailedPrecondition):
    """A probe or template comes from another embedding model than the gallery's (R13)."""


class FacialMatchingDisabled(FailedPrecondition):
    """The active legal framework does not enable facial matching (R12)."""


class Unauthenticated(CentinelaError):
    """No verified caller identity."""

    status = "UNAUTHENTICATED"


class PermissionDenied(CentinelaError):
    """The caller may not do this."""

    status = "PERMISSION_DENIED"


class PolicyDenied(PermissionDenied):
    """The policy decided to deny; ``reasons`` are rule ids of LEGAL_RULES.md."""

    def __init__(
        self,
        reasons: Sequence[str],
        *,
        decision_id: str | None = None,
        message: str | None = None,
    ) -> None:
        text = message or ("denied by policy: " + ", ".join(tuple(reasons) or ("default deny",)))
        if decision_id:
            text += f" (decision {decision_id})"
        super().__init__(text, rule_ids=reasons, decision_id=decision_id)

    @property
    def reasons(self) -> tuple[str, ...]:
        """The rule ids that denied."""
        return self.rule_ids


class ResourceExhausted(CentinelaError):
    """A rate or concurrency ceiling was reached (R14) or the server is shedding load."""

    status = "RESOURCE_EXHAUSTED"


class Unimplemented(CentinelaError):
    """The RPC is part of the contract but not built in this version."""

    status = "UNIMPLEMENTED"


class DeadlineExceeded(CentinelaError):
    """The caller's deadline passed before the work could be finished."""

    status = "DEADLINE_EXCEEDED"


# --- system errors (fail closed) ---------------------------------------------------------


class Unavailable(CentinelaError):
    """A component needed to answer safely is not available; the caller may retry."""

    status = "UNAVAILABLE"


class AuditUnavailable(Unavailable):
    """The audit log could not make the event durable, so no result may be returned."""


class PolicyEngineUnavailable(Unavailable):
    """The policy engine failed or timed out; treated as a deny by the policy layer."""


class StorageError(Unavailable):
    """The database could not be reached or refused the operation."""


class ConfigError(CentinelaError):
    """Configuration is missing or invalid; raised at start-up."""

    status = "FAILED_PRECONDITION"


# --- keys and encryption -----------------------------------------------------------------


class KeyManagementError(CentinelaError):
    """Base for key-management errors."""

    status = "FAILED_PRECONDITION"


class InsecureKeyFile(KeyManagementError):
    """A key file is readable or writable by others than its owner."""


class KeyNotFound(KeyManagementError):
    """No key with that id exists (or it was destroyed: crypto-shredded)."""


class DecryptionError(KeyManagementError):
    """A ciphertext failed authentication: wrong key, wrong row, or tampering."""

    status = "DATA_LOSS"


# --- audit verification ------------------------------------------------------------------


class VerificationError(CentinelaError):
    """Base for every failed verification of the audit log (tampering found)."""

    status = "DATA_LOSS"


class ProofError(VerificationError):
    """An inclusion or consistency proof does not verify."""


class RootMismatchError(VerificationError):
    """The recomputed root differs from the one that was signed."""

    def __init__(self, message: str, *, expected: str, found: str) -> None:
        super().__init__(f"{message}: expected root {expected}, found {found}")
        self.expected = expected
        self.found = found


class InconsistentCheckpointError(VerificationError):
    """Two checkpoints are not consistent: the log forked or was rewritten."""


class RollbackError(VerificationError):
    """A checkpoint is older (smaller) than one already trusted."""


class SignatureError(VerificationError):
    """A signed note carries no valid signature by a trusted key."""


class NoteFormatError(VerificationError):
    """A checkpoint or signed note is malformed."""


class AppendOnlyViolation(VerificationError):
    """The store refused a write that would alter or remove a leaf."""
