"""``centinela audit …`` over the AuditService: the compliance officers' command line (R16).

Commands::

    centinela audit checkpoint                     the latest signed checkpoint
    centinela audit events [filters] [--json|--csv] events, oldest first, paged
    centinela audit tail [filters]                 follow new events
    centinela audit prove --index N [--size S]     verify an inclusion proof locally
    centinela audit export --out DIR --server …    export through the service (same format)
    centinela audit stats [--since …]              counts by municipality, site, purpose…
    centinela audit witness --state FILE           keep a checkpoint, catch forks and rollbacks
    centinela audit evidence --decision ID --out DIR --reference CASE

Every call is made as the compliance identity over mutual TLS and is itself audited by the
server. Output never shows vectors, plates, DNIs or names: entries hold only keyed digests and
pseudonymous references, and the tables show ids, labels and counts. Exit codes are the common
ones (``cli_common``) plus 1 when a local verification fails (a bad proof, a fork, a rollback).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from centinela.audit.merkle import root_from_inclusion_proof, verify_consistency, verify_inclusion
from centinela.clients import cli_common as cc
from centinela.clients.builders import new_request_id, purpose_value, timestamp
from centinela.clients.compliance_common import (
    EXIT_FAILED,
    client,
    context,
    open_signed,
    trusted,
    when,
)
from centinela.clients.compliance_export import evidence_command, export_command
from centinela.clients.witness import witness
from centinela.errors import CentinelaError, InvalidArgument, VerificationError
from centinela.v1 import audit_service_pb2 as apb

PROG = "centinela audit"
COMMANDS = ("checkpoint", "events", "tail", "prove", "export", "stats", "witness", "evidence")
COLUMNS = ["index", "time", "type", "org", "site", "purpose", "outcome", "rules", "decision"]
#: Column widths of ``tail`` (rows are printed as they come, so they cannot be measured).
TAIL_WIDTHS = [6, 20, 19, 17, 16, 22, 9, 16, 0]


# ---- small helpers ------------------------------------------------------------------------


def _summary(index: int, entry: bytes) -> dict[str, str]:
    doc = json.loads(entry)
    caller = doc.get("caller") or {}
    return {
        "index": str(index),
        "time": str(doc.get("time", ""))[:19] + "Z",
        "type": doc.get("type", ""),
        "org": caller.get("org", "-"),
        "site": doc.get("site_id", "-"),
        "purpose": doc.get("purpose", "-"),
        "outcome": doc.get("outcome", "-"),
        "rules": ",".join(doc.get("rule_ids", ())) or "-",
        "decision": doc.get("decision_id", "-"),
    }


def _table(rows: list[dict[str, str]], header: list[str]) -> str:
    return cc.table([[r[h] for h in header] for r in rows], header)


def _fixed(values: Iterable[str]) -> str:
    return " ".join(v.ljust(w) for v, w in zip(values, TAIL_WIDTHS, strict=True)).rstrip()


def _event_json(ev: apb.AuditEvent) -> str:
    return json.dumps(
        {"index": ev.index, "leaf_hash": ev.leaf_hash.hex(), "entry": json.loads(ev.entry)},
        sort_keys=True,
    )


def _csv_row(values: Sequence[str]) -> str:
    return ",".join('"' + v.replace('"', '""') + '"' if "," in v or '"' in v else v for v in values)


def _list_request(args: argparse.Namespace) -> apb.ListEventsRequest:
    req = apb.ListEventsRequest(
        caller_org=args.org,
        site_id=args.site,
        outcome=args.outcome,
        rule_id=args.rule,
        event_type=args.type,
        page_size=args.page_size,
    )
    if args.purpose:
        req.purpose = purpose_value(args.purpose)  # type: ignore[assignment]
    if args.since is not None:
        req.since.CopyFrom(timestamp(args.since))
    if args.until is not None:
        req.until.CopyFrom(timestamp(args.until))
    return req


# ---- commands -----------------------------------------------------------------------------


def _checkpoint(args: argparse.Namespace) -> int:
    with client(args) as conn:
        resp = conn.get_checkpoint(apb.GetCheckpointRequest())
    keys, source = trusted(args, resp.verifier_key)
    cp = open_signed(resp.signed_note, keys)
    if args.json:
        print(
            json.dumps(
                {
                    "origin": cp.origin,
                    "tree_size": cp.size,
                    "root": cp.root_hash.hex(),
                    "verifier_key": resp.verifier_key,
                    "signed_note": resp.signed_note,
                    "signature_checked_with": source,
                }
            )
        )
        return cc.EXIT_OK
    print(f"origin      {cp.origin}\ntree size   {cp.size}\nroot        {cp.root_hash.hex()}")
    print(f"log key     {resp.verifier_key}\nsignature   valid ({source})\n")
    print(resp.signed_note, end="")
    return cc.EXIT_OK


def _events(args: argparse.Namespace) -> int:
    req = _list_request(args)
    printed = 0
    rows: list[dict[str, str]] = []
    if args.csv:
        print(_csv_row(COLUMNS))
    with client(args) as conn:
        token = args.page_token
        while True:
            req.page_token = token
            page = conn.list_events(req)
            for ev in page.events:
                if args.limit and printed >= args.limit:
                    break
                printed += 1
                if args.json:
                    print(_event_json(ev))
                elif args.csv:
                    print(_csv_row(list(_summary(ev.index, ev.entry).values())))
                else:
                    rows.append(_summary(ev.index, ev.entry))
            token = page.next_page_token
            if not token or not args.all or (args.limit and printed >= args.limit):
                break
    if not (args.json or args.csv):
        print(_table(rows, COLUMNS) if rows else "no events match")
        if token:
            print(f"more: --page-token {token}")
    elif token and not args.csv:
        print(json.dumps({"next_page_token": token}))
    return cc.EXIT_OK


def _tail(args: argparse.Namespace) -> int:
    """Poll ListEvents from the start time; skip this tool's own audit reads."""
    req = _list_request(args)
    since = args.since or dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    last_index = -1
    own: deque[str] = deque(maxlen=4096)
    shown = 0
    deadline = time.monotonic() + args.duration if args.duration else None
    if not args.json:
        print(_fixed([c.upper() for c in COLUMNS]))
    with client(args) as conn:
        while True:
            req.since.CopyFrom(timestamp(since))
            req.page_token = ""
            while True:
                rid = new_request_id()
                own.append(rid)
                req.context.CopyFrom(context(request_id=rid))
                page = conn.list_events(req)
                for ev in page.events:
                    if ev.index <= last_index:
                        continue
                    doc = json.loads(ev.entry)
                    last_index = ev.index
                    since = max(
                        since, dt.datetime.fromisoformat(doc["time"].replace("Z", "+00:00"))
                    )
                    if doc.get("type") == "AUDIT_READ" and doc.get("request_id") in own:
                        continue
                    row = _summary(ev.index, ev.entry)
                    print(_event_json(ev) if args.json else _fixed(row.values()), flush=True)
                    shown += 1
                    if args.count and shown >= args.count:
                        return cc.EXIT_OK
                req.page_token = page.next_page_token
                if not req.page_token:
                    break
            if deadline is not None and time.monotonic() >= deadline:
                return cc.EXIT_OK
            time.sleep(args.interval)


def _prove(args: argparse.Namespace) -> int:
    with client(args) as conn:
        inc = conn.get_inclusion_proof(
            apb.GetInclusionProofRequest(index=args.index, tree_size=args.size or 0)
        )
        cp_resp = conn.get_checkpoint(apb.GetCheckpointRequest())
        keys, source = trusted(args, cp_resp.verifier_key)
        cp = open_signed(cp_resp.signed_note, keys)
        size = int(inc.tree_size)
        leaf = hashlib.sha256(b"\x00" + inc.entry).digest()
        if leaf != inc.leaf_hash:
            raise VerificationError(f"entry {args.index} does not hash to its leaf hash")
        root_s = root_from_inclusion_proof(args.index, size, leaf, list(inc.hashes))
        how = ""
        if size == cp.size:
            verify_inclusion(args.index, size, leaf, list(inc.hashes), cp.root_hash)
        elif size < cp.size:
            cons = conn.get_consistency_proof(
                apb.GetConsistencyProofRequest(first_size=size, second_size=cp.size)
            )
            verify_consistency(size, cp.size, root_s, cp.root_hash, list(cons.hashes))
            how = f", tied to it by a consistency proof from size {size}"
        else:
            raise InvalidArgument(
                f"no signed checkpoint covers size {size} yet (latest {cp.size})", field="--size"
            )
    doc = {
        "verified": True,
        "index": args.index,
        "leaf_hash": leaf.hex(),
        "tree_size": size,
        "root_at_size": root_s.hex(),
        "checkpoint_size": cp.size,
        "checkpoint_root": cp.root_hash.hex(),
        "origin": cp.origin,
        "key": source,
    }
    if args.json:
        print(json.dumps(doc))
    else:
        print(
            f"OK: entry {args.index} (leaf {leaf.hex()}) is included in the tree of size {size} "
            f"(root {root_s.hex()})\nverified locally against the checkpoint signed by "
            f"{cp.origin} at size {cp.size} (root {cp.root_hash.hex()}){how}\n"
            f"signature checked with {source}"
        )
    return cc.EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    req = apb.GetStatsRequest()
    if args.since is not None:
        req.since.CopyFrom(timestamp(args.since))
    with client(args) as conn:
        s = conn.get_stats(req)
    sections: list[tuple[str, str, Any]] = [
        ("by_municipality", "match requests by municipality", s.by_municipality),
        ("by_site", "match requests by site", s.by_site),
        ("by_purpose", "match requests by purpose", s.by_purpose),
        ("by_outcome", "events by outcome", s.by_outcome),
        ("denials_by_rule", "denials by rule", s.denials_by_rule),
        (
            "shadow_disagreements_by_rule",
            "shadow-policy disagreements by rule",
            s.shadow_disagreements_by_rule,
        ),
    ]
    if args.json:
        doc: dict[str, Any] = {key: dict(v) for key, _, v in sections}
        doc.update(
            alerts_confirmed=s.alerts_confirmed,
            alerts_rejected=s.alerts_rejected,
            total_events=s.total_events,
        )
        print(json.dumps(doc, sort_keys=True))
        return cc.EXIT_OK
    scope = f"since {args.since.isoformat()}" if args.since else "whole log"
    print(f"{s.total_events} events ({scope})")
    print(f"alerts confirmed {s.alerts_confirmed}, rejected {s.alerts_rejected}")
    for _, title, counts in sections:
        print(f"\n{title}:")
        if not counts:
            print("  (none)")
        for key, value in sorted(dict(counts).items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {key:<40} {value}")
    return cc.EXIT_OK


def _witness(args: argparse.Namespace) -> int:
    keys = None
    if args.trusted_key:
        keys, _ = trusted(args, "")
    with client(args) as conn:
        res = witness(conn, args.state, keys)
    if args.json:
        print(json.dumps({"ok": True, **res.__dict__}))
        return cc.EXIT_OK
    if res.status == "first":
        print(f"first checkpoint kept: {res.origin} size {res.size} root {res.root_hash}")
        if res.trust_on_first_use:
            print("warning: trusting the key the server sent (first use); pin --trusted-key")
    elif res.status == "same":
        print(f"OK: unchanged at size {res.size} root {res.root_hash}")
    else:
        print(
            f"OK: size {res.previous_size} -> {res.size}, consistent (RFC 9162 proof verified); "
            f"root {res.root_hash}"
        )
    return cc.EXIT_OK


# ---- parser -------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, *, trusted: bool = False) -> None:
    p.add_argument("--json", action="store_true", help="JSON output for scripts")
    if trusted:
        p.add_argument(
            "--trusted-key",
            type=Path,
            metavar="FILE",
            help="the log's verifier key obtained out of band (default: the server's, unpinned)",
        )
    cc.add_connection_options(p)


def _filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (all optional; combined with AND)")
    g.add_argument("--since", type=when, help="at or after (ISO 8601 or age: 30m, 24h, 7d)")
    g.add_argument("--until", type=when, help="before (ISO 8601 or age)")
    g.add_argument("--org", default="", help="caller organisation, e.g. muni-miraflores")
    g.add_argument("--site", default="", help="site id")
    g.add_argument("--purpose", default="", help="e.g. wanted-person, stolen-vehicle")
    g.add_argument("--outcome", default="", help="e.g. HIT, NO_HIT, DENIED, READ")
    g.add_argument("--rule", default="", help="rule id among the entry's rule ids, e.g. R3")
    g.add_argument("--type", default="", help="event type, e.g. MATCH_DECISION, AUDIT_READ")
    p.add_argument("--page-size", type=int, default=100, help="1-1000 (100)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the online ``centinela audit`` commands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compliance officers: read, prove and witness the audit log over the "
        "AuditService (R16). Every read is itself audited.",
        epilog=cc.EXIT_CODES_HELP + "; 1 a local verification failed (proof, fork, rollback)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("checkpoint", help="the latest signed checkpoint")
    _common(p, trusted=True)
    p.set_defaults(func=_checkpoint)
    p = sub.add_parser("events", help="list events (filters, paging)")
    _filters(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV of the summary columns")
    p.add_argument("--page-token", default="", help="continue from a previous page")
    p.add_argument("--all", action="store_true", help="follow every page")
    p.add_argument("--limit", type=int, default=0, help="stop after N events")
    _common(p)
    p.set_defaults(func=_events)
    p = sub.add_parser("tail", help="follow new events")
    _filters(p)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls (2)")
    p.add_argument("--count", type=int, default=0, help="exit after N events")
    p.add_argument("--duration", type=float, default=0.0, help="exit after S seconds")
    _common(p)
    p.set_defaults(func=_tail)
    p = sub.add_parser("prove", help="verify an entry's inclusion proof locally")
    p.add_argument("--index", type=int, required=True, help="leaf index")
    p.add_argument("--size", type=int, default=0, help="tree size (default: latest checkpoint)")
    _common(p, trusted=True)
    p.set_defaults(func=_prove)
    p = sub.add_parser("export", help="export a range through the service")
    p.add_argument("--out", type=Path, required=True, help="output directory (new or empty)")
    p.add_argument("--from", dest="start", type=int, default=0, help="first index (0)")
    p.add_argument("--to", dest="end", type=int, default=0, help="end index (checkpoint size)")
    p.add_argument("--since", type=int, action="append", default=[], metavar="SIZE")
    _common(p, trusted=True)
    p.set_defaults(func=export_command)
    p = sub.add_parser("stats", help="counts by municipality, site, purpose, outcome, rule")
    p.add_argument("--since", type=when, help="at or after (ISO 8601 or age: 24h, 7d)")
    _common(p)
    p.set_defaults(func=_stats)
    p = sub.add_parser("witness", help="check the latest checkpoint against the kept one")
    p.add_argument("--state", type=Path, required=True, help="the witness's state file")
    _common(p, trusted=True)
    p.set_defaults(func=_witness)
    p = sub.add_parser("evidence", help="write the evidence package of one decision")
    p.add_argument("--decision", required=True, help="decision id, e.g. dec_3f9a…")
    p.add_argument("--out", type=Path, required=True, help="output directory (new or empty)")
    p.add_argument("--reference", required=True, help="case or court request id (audited)")
    _common(p, trusted=True)
    p.set_defaults(func=evidence_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run an online ``centinela audit`` command; return its exit code."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    what = f"{PROG} {args.command}"
    if getattr(args, "page_size", 100) not in range(1, 1001):
        return cc.print_error(what, InvalidArgument("must lie in 1..1000", field="--page-size"))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except VerificationError as err:
        if args.json:
            print(json.dumps({"verified": False, "error": type(err).__name__, "message": str(err)}))
        else:
            print(f"{what}: FAILED ({type(err).__name__}): {err.diagnostics()}", file=sys.stderr)
        return EXIT_FAILED
    except CentinelaError as err:
        return cc.print_error(what, err, as_json=args.json)
    except OSError as err:
        print(f"{what}: {err.strerror}: {err.filename}", file=sys.stderr)
        return cc.EXIT_USAGE
    except KeyboardInterrupt:
        return cc.EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
