"""What every Centinela command line tool shares: connection options, exit codes, errors.

The admin, registry, audit and edge commands all call :func:`add_connection_options` on their
parsers and :func:`client_from_args` to get a :class:`CentinelaClient`, and they report
failures with :func:`print_error`, so options, messages and exit codes are the same
everywhere. Error output never contains vectors, plates, DNIs or names: it is built from the
server's status (which holds none) and from file names the user typed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import grpc

from centinela.clients.client import CentinelaClient
from centinela.clients.errors import ClientError
from centinela.clients.retry import RetryPolicy
from centinela.clients.tls import DEFAULT_DATA_DIR, DEFAULT_SERVER
from centinela.errors import CentinelaError

# ---- exit codes (the same for every command) ------------------------------------------

#: Done; for match commands: no alert.
EXIT_OK = 0
#: Done, and at least one alert was raised (match commands).
EXIT_ALERT = 10
#: Bad usage or local configuration (options, certificates, models, unreadable input).
EXIT_USAGE = 2
#: The server refused the request (invalid, denied by policy, precondition, not found…).
EXIT_REFUSED = 3
#: The server could not be reached or could not answer safely (after retries).
EXIT_UNAVAILABLE = 4
#: Interrupted by the user (Ctrl-C).
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "exit codes: 0 done (no alert), 10 alert raised, 2 usage or local configuration error, "
    "3 refused by the server (invalid, denied by policy, precondition), 4 server unavailable, "
    "130 interrupted"
)


def exit_code_for(err: CentinelaError) -> int:
    """The exit code of a failure."""
    if isinstance(err, ClientError):
        if err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return EXIT_UNAVAILABLE
        if err.code == grpc.StatusCode.UNAUTHENTICATED:
            return EXIT_USAGE
        return EXIT_REFUSED
    return EXIT_USAGE


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """``--server``, ``--data-dir``, ``--identity``, ``--cert/--key/--ca``, ``--timeout``,
    ``--operator``."""
    group = parser.add_argument_group("connection (mutual TLS)")
    group.add_argument(
        "--server", default=DEFAULT_SERVER, help=f"HOST:PORT of the server ({DEFAULT_SERVER})"
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="data directory whose certs/ holds the dev identities (default .centinela)",
    )
    group.add_argument(
        "--identity",
        default=None,
        help="dev identity name in <data-dir>/certs, e.g. muni-miraflores, pnp-admin",
    )
    group.add_argument("--cert", type=Path, help="client certificate (PEM); overrides --identity")
    group.add_argument("--key", type=Path, help="client private key (PEM)")
    group.add_argument("--ca", type=Path, help="Centinela CA certificate (PEM)")
    group.add_argument(
        "--timeout", type=float, default=10.0, help="deadline per call in seconds (10)"
    )
    group.add_argument("--operator", default="", help="pseudonymous operator id for the audit")


def client_from_args(
    args: argparse.Namespace,
    *,
    default_identity: str,
    retry: RetryPolicy | None = None,
    **kwargs: Any,
) -> CentinelaClient:
    """A client from the connection options (``--cert`` wins over ``--identity``).

    Raises:
        ConfigError: the TLS material is incomplete or unreadable.
    """
    common: dict[str, Any] = {
        "timeout": args.timeout,
        "operator_id": args.operator,
        "retry": retry,
        **kwargs,
    }
    if args.cert or args.key or args.ca:
        ca = args.ca or (args.data_dir / "certs" / "ca.crt")
        return CentinelaClient(args.server, cert=args.cert, key=args.key, ca=ca, **common)
    identity = args.identity or default_identity
    return CentinelaClient.from_data_dir(args.data_dir, identity, server=args.server, **common)


def print_error(
    prog: str,
    err: CentinelaError,
    *,
    as_json: bool = False,
    out: TextIO | None = None,
    what: str = "",
) -> int:
    """Print a failure (text with a hint on stderr, or JSON on stdout); return its exit code."""
    code = exit_code_for(err)
    if as_json:
        doc = (
            err.to_dict()
            if isinstance(err, ClientError)
            else {
                "code": err.status,
                "message": err.message,
                "field": err.field or "",
                "hint": "",
            }
        )
        print(json.dumps({"error": doc, "exit_code": code}), file=out or sys.stdout)
        return code
    stream = out or sys.stderr
    prefix = f"{prog}: {what}: " if what else f"{prog}: "
    print(prefix + err.diagnostics(), file=stream)
    if isinstance(err, ClientError):
        print(f"  what to do: {err.hint}", file=stream)
        if err.request_id:
            print(f"  server request id: {err.request_id}", file=stream)
    return code


def table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned columns two spaces apart, the header upper-cased, no trailing blanks."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
