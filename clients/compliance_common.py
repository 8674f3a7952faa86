"""What the compliance officers' commands share: connection, trusted keys, times.

The verifier key is taken from ``--trusted-key`` when given (obtained out of band); otherwise
the key the server sent is used and every command says so in its output.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re

from centinela.audit.checkpoint import SignedCheckpoint, Verifier, open_checkpoint
from centinela.audit.verify import UsageError, load_trusted_keys
from centinela.clients import cli_common as cc
from centinela.clients.client import CentinelaClient
from centinela.errors import InvalidArgument
from centinela.v1 import common_pb2

DEFAULT_IDENTITY = "compliance"
#: Exit code when a local verification fails (a bad proof or signature, a fork, a rollback).
EXIT_FAILED = 1
_REL = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def when(text: str) -> dt.datetime:
    """ISO 8601 (naive is UTC) or a relative age such as ``30m``, ``24h``, ``7d``."""
    m = _REL.match(text.strip())
    if m:
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=int(m[1]) * _UNITS[m[2]])
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "must be ISO 8601 (2026-11-21T18:00:00Z) or an age like 30m, 24h, 7d"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def client(args: argparse.Namespace) -> CentinelaClient:
    """A client from the connection options, as ``compliance`` unless ``--identity`` says.

    Raises:
        ConfigError: the TLS material is incomplete or unreadable.
    """
    return cc.client_from_args(args, default_identity=DEFAULT_IDENTITY)


def context(reference: str = "", request_id: str = "") -> common_pb2.RequestContext:
    """A request context citing ``reference`` (evidence) and/or with a chosen request id."""
    return common_pb2.RequestContext(reference=reference, client_request_id=request_id)


def trusted(args: argparse.Namespace, served_key: str) -> tuple[list[Verifier], str]:
    """The keys to verify with, and where they came from (said in the output).

    Raises:
        InvalidArgument: the ``--trusted-key`` file is unreadable or malformed.
    """
    if getattr(args, "trusted_key", None):
        try:
            return load_trusted_keys(args.trusted_key), f"trusted key {args.trusted_key}"
        except UsageError as exc:
            raise InvalidArgument(str(exc), field="--trusted-key") from None
    return [Verifier(served_key)], "the key the server sent (pin one with --trusted-key)"


def open_signed(note: str, keys: list[Verifier]) -> SignedCheckpoint:
    """Verify a signed checkpoint note, origin pinned to the first key's name.

    Raises:
        SignatureError, NoteFormatError: not validly signed by a trusted key.
    """
    return open_checkpoint(note, keys, origin=keys[0].name)
