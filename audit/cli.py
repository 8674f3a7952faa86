"""``centinela audit export`` and ``centinela audit verify``: argument parsing and exit codes.

``main`` also routes the compliance officers' online commands (``checkpoint``, ``events``,
``tail``, ``prove``, ``stats``, ``witness``, ``evidence``, and ``export`` with ``--server``,
``--identity`` or ``--cert``) to ``centinela.clients.compliance_cli``, imported lazily.

Exit codes: 0 done and verified; 1 tampering found or a check failed (what and where is
printed); 2 usage or I/O error. Output never includes entry contents.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from centinela.errors import CentinelaError, VerificationError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

DEFAULT_ORIGIN = "centinela.local/audit"
DB_FILE = "centinela.db"
SIGNING_KEY = Path("keys") / "audit-log.ed25519"
HMAC_KEY = Path("keys") / "audit-hmac.key"


def build_export_parser() -> argparse.ArgumentParser:
    """The parser of ``centinela audit export``."""
    p = argparse.ArgumentParser(
        prog="centinela audit export",
        description=(
            "Export the audit log for offline verification: DIR/entries.jsonl (the exact leaf "
            "bytes, one per line), DIR/checkpoint (the signed note), DIR/log.pub (the log's "
            "verifier key), DIR/leaf-hashes.bin and, for a partial range, DIR/range.json. "
            "A fresh checkpoint covering every stored entry is signed first."
        ),
        epilog="example: centinela audit export --data-dir /var/lib/centinela --out ./export",
    )
    src = p.add_argument_group("where the log is")
    src.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("CENTINELA_DATA_DIR", "data")),
        help="server data directory (default: $CENTINELA_DATA_DIR or ./data); the database is "
        f"DIR/{DB_FILE} and the signing key DIR/{SIGNING_KEY}",
    )
    src.add_argument(
        "--database-url",
        help="SQLAlchemy URL of the database instead of DATA_DIR/centinela.db "
        "(e.g. postgresql+psycopg://user@host/db)",
    )
    src.add_argument(
        "--signing-key",
        type=Path,
        help=f"the log's Ed25519 key, PEM PKCS8, mode 0600 (default: DATA_DIR/{SIGNING_KEY})",
    )
    src.add_argument(
        "--origin",
        default=DEFAULT_ORIGIN,
        help=f"the log's origin line and key name (default: {DEFAULT_ORIGIN})",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (new or empty)")
    p.add_argument("--from", dest="start", type=int, default=0, help="first index (default 0)")
    p.add_argument(
        "--to", dest="end", type=int, help="index after the last one (default: checkpoint size)"
    )
    p.add_argument(
        "--since",
        type=int,
        action="append",
        default=[],
        metavar="SIZE",
        help="also prove consistency from this earlier tree size (the size in the verifier's "
        "state file) when the range does not start at or before it; repeatable",
    )
    p.add_argument(
        "--no-new-checkpoint",
        action="store_true",
        help="use the latest stored checkpoint instead of signing a fresh one",
    )
    return p


def build_verify_parser() -> argparse.ArgumentParser:
    """The parser of ``centinela audit verify``."""
    p = argparse.ArgumentParser(
        prog="centinela audit verify",
        description=(
            "Verify an audit export offline: check the checkpoint's signature against a key "
            "you trust, recompute every leaf and the root, and (with --state) refuse a "
            "rollback or a fork against the last checkpoint you verified. "
            "Exit 0 verified, 1 tampering or failed verification, 2 usage or I/O error."
        ),
        epilog="example: centinela audit verify ./export --trusted-key trusted.pub --state st.json",
    )
    p.add_argument("export_dir", type=Path, metavar="DIR", help="the export directory")
    p.add_argument(
        "--trusted-key",
        type=Path,
        required=True,
        metavar="FILE",
        help="verifier key(s) you trust, one per line: <name>+<hex key id>+<base64 key>; "
        "obtain it out of band, never from the export itself",
    )
    p.add_argument(
        "--origin", help="pin the log origin (default: the name of the first trusted key)"
    )
    p.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="keeps the last verified checkpoint; created on first use, updated on success",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def export_main(argv: Sequence[str]) -> int:
    """Entry point of ``centinela audit export``; returns the exit code."""
    try:
        args = build_export_parser().parse_args(list(argv))
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    # Imported here so `verify` (the officer's tool) does not need the database stack.
    from centinela.audit.export import export_log
    from centinela.audit.keys import load_signing_key
    from centinela.audit.log import AuditLog
    from centinela.storage import make_engine

    url = args.database_url or f"sqlite:///{(args.data_dir / DB_FILE).resolve()}"
    if not args.database_url and not (args.data_dir / DB_FILE).exists():
        print(f"error: no database at {args.data_dir / DB_FILE}", file=sys.stderr)
        return EXIT_USAGE
    key_path = args.signing_key or args.data_dir / SIGNING_KEY
    try:
        key = load_signing_key(key_path)
    except FileNotFoundError:
        print(f"error: no signing key at {key_path}", file=sys.stderr)
        return EXIT_USAGE
    except CentinelaError as exc:
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        return EXIT_USAGE
    engine = make_engine(url, pool_size=2)
    try:
        log = AuditLog(engine, key, args.origin)
        log.store.migrate()
        log.load()
        summary = export_log(
            log,
            args.out,
            start=args.start,
            end=args.end,
            since=args.since,
            new_checkpoint=not args.no_new_checkpoint,
        )
    except VerificationError as exc:
        print(f"FAILED: the stored log does not check out: {exc.diagnostics()}", file=sys.stderr)
        return EXIT_FAILED
    except (CentinelaError, OSError) as exc:
        text = exc.diagnostics() if isinstance(exc, CentinelaError) else str(exc)
        print(f"error: {text}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        engine.dispose()
    print(
        f"exported entries [{summary.start}, {summary.end}) of tree size {summary.tree_size} "
        f"to {summary.out_dir}\nroot {summary.root_hash}"
    )
    return EXIT_OK


def verify_main(argv: Sequence[str]) -> int:
    """Entry point of ``centinela audit verify``; returns the exit code."""
    try:
        args = build_verify_parser().parse_args(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    from centinela.audit.verify import UsageError, load_trusted_keys, verify_export

    try:
        keys = load_trusted_keys(args.trusted_key)
        report = verify_export(args.export_dir, keys, origin=args.origin, state_path=args.state)
    except UsageError as exc:
        _say(args.json, {"verified": False, "error": "usage", "message": str(exc)}, str(exc))
        return EXIT_USAGE
    except VerificationError as exc:
        payload = {
            "verified": False,
            "error": exc.__class__.__name__,
            "message": exc.diagnostics(),
        }
        _say(args.json, payload, f"FAILED ({exc.__class__.__name__}): {exc.diagnostics()}")
        return EXIT_FAILED
    payload = {
        "verified": True,
        "origin": report.origin,
        "tree_size": report.tree_size,
        "root": report.root_hash,
        "from": report.start,
        "to": report.end,
        "entries": report.entries,
        "previous_size": report.previous_size,
    }
    text = (
        f"OK: {report.entries} entries [{report.start}, {report.end}) verified against the "
        f"checkpoint of {report.origin}, tree size {report.tree_size}, root {report.root_hash}"
    )
    if report.previous_size is not None:
        text += f"\nconsistent with the previously trusted size {report.previous_size}"
    _say(args.json, payload, text)
    return EXIT_OK


def _say(as_json: bool, payload: dict[str, object], text: str) -> None:
    if as_json:
        print(json.dumps(payload, sort_keys=True))
    else:
        print(text, file=sys.stdout if payload.get("verified") else sys.stderr)


#: Sub-commands that talk to a running server (``centinela.clients.compliance_cli``).
ONLINE = frozenset({"checkpoint", "events", "tail", "prove", "stats", "witness", "evidence"})
#: Options that make ``export`` go through the AuditService instead of the data directory.
_ONLINE_EXPORT = ("--server", "--identity", "--cert")


def _online_export(argv: Sequence[str]) -> bool:
    return any(a == o or a.startswith(o + "=") for a in argv for o in _ONLINE_EXPORT)


def main(argv: Sequence[str] | None = None) -> int:
    """``centinela audit <command> ...`` (the top-level CLI delegates here).

    ``verify`` and ``export`` without a server work offline on files; ``export`` with
    ``--server``/``--identity``/``--cert`` and the compliance commands go through the
    AuditService (imported lazily: the offline verifier needs no gRPC stack).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and (argv[0] in ONLINE or (argv[0] == "export" and _online_export(argv[1:]))):
        from centinela.clients.compliance_cli import main as online_main

        return online_main(argv)
    if not argv or argv[0] not in {"export", "verify"}:
        print(
            "usage: centinela audit {verify,export,checkpoint,events,tail,prove,stats,witness,"
            "evidence} [--help]",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return export_main(argv[1:]) if argv[0] == "export" else verify_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
