"""``centinela registry``: Reniec's command line over the RegistryService (gRPC, mutual TLS).

Commands: ``import FILE`` (CSV or JSON Lines, see :mod:`centinela.clients.registry_file`),
``remove DNI``, ``object DNI``, ``withdraw DNI``, ``status``. Human output by default,
``--json`` for scripts. A DNI may be given as ``-`` to read it from standard input, which keeps
it out of the shell history and the process list. Nothing this tool prints holds a DNI or a
vector: rejects name the file line, field and reason only.

An import is sent as a sequence of streams of ``--batches-per-stream`` messages of
``--batch-size`` records; each stream is acknowledged once its templates are durable, so the
progress line counts acknowledged rows, and a failed import says from which batch to resume
(``--resume-from-batch N``; re-sending batches already stored changes nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format

from centinela.clients import cli_common as cc
from centinela.clients.client import CentinelaClient
from centinela.clients.errors import ClientError
from centinela.clients.registry_file import (
    BATCH_SIZE,
    FileBatch,
    count_rows,
    detect_format,
    read_batches,
)
from centinela.errors import CentinelaError, InvalidArgument
from centinela.v1 import common_pb2
from centinela.v1 import registry_service_pb2 as rpb

PROG = "centinela registry"
DEFAULT_IDENTITY = "reniec"
#: Done, but some records were rejected (listed in the summary).
EXIT_REJECTS = 5
EXIT_HELP = cc.EXIT_CODES_HELP + f"; {EXIT_REJECTS} import done but some records were rejected"
#: Deadline of one import stream, seconds (a stream carries up to 10,000 templates by default).
STREAM_TIMEOUT = 600.0


def _doc(message: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return doc


def _read_dni(value: str) -> str:
    if value != "-":
        return value
    text = sys.stdin.readline().strip()
    if not text:
        raise InvalidArgument("no DNI on standard input", field="DNI")
    return text


def _context(args: argparse.Namespace) -> common_pb2.RequestContext:
    return common_pb2.RequestContext(reference=args.reference or "")


def _decision_text(info: common_pb2.DecisionInfo) -> str:
    return f"decision {info.decision_id}, audit entry #{info.audit_index}"


# ---- import -------------------------------------------------------------------------------


@dataclasses.dataclass
class ImportSummary:
    """What an import did, over all its streams."""

    rows: int = 0
    sent: int = 0
    accepted: int = 0
    unchanged: int = 0
    rejected: int = 0
    batches: int = 0
    streams: int = 0
    rejects: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    decisions: list[str] = dataclasses.field(default_factory=list)
    next_batch: int = 0

    def to_json(self, seconds: float) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "sent": self.sent,
            "accepted": self.accepted,
            "unchanged": self.unchanged,
            "rejected": self.rejected,
            "batches": self.batches,
            "streams": self.streams,
            "seconds": round(seconds, 3),
            "rate_per_s": round(self.rows / seconds, 1) if seconds > 0 else 0.0,
            "decision_ids": self.decisions,
            "rejects": self.rejects,
        }


class Progress:
    """One progress line on stderr: acknowledged rows, rate and ETA (redrawn on a terminal)."""

    def __init__(self, total: int | None, stream: TextIO, *, enabled: bool) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.last = 0.0
        self.shown = -1

    def update(self, done: int, *, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and not self.tty and now - self.last < 2.0:
            return
        if final and not self.tty and done == self.shown:
            return  # already said
        self.last, self.shown = now, done
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        text = f"rows {done:,}"
        if self.total:
            text += f"/{self.total:,} ({100.0 * done / self.total:.0f}%)"
        text += f"  {rate:,.0f}/s"
        if self.total and rate > 0 and done < self.total:
            text += f"  ETA {_duration((self.total - done) / rate)}"
        text += f"  elapsed {_duration(elapsed)}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{(whole % 3600) // 60:02d}m"


def _groups(batches: Iterator[FileBatch], per_stream: int) -> Iterator[list[FileBatch]]:
    """Batches grouped per stream, read ahead in a thread (parsing overlaps sending)."""
    out: queue.Queue[list[FileBatch] | BaseException | None] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def put(item: list[FileBatch] | BaseException | None) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            group: list[FileBatch] = []
            for b in batches:
                group.append(b)
                if len(group) == per_stream:
                    if not put(group):
                        return
                    group = []
            if group and not put(group):
                return
            put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    thread = threading.Thread(target=reader, name="registry-import-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _absorb(summary: ImportSummary, group: list[FileBatch], answer: Any) -> None:
    lines = {b.number: b.lines for b in group}
    summary.accepted += answer.accepted
    summary.unchanged += answer.unchanged
    summary.rejected += answer.rejected
    summary.decisions.append(answer.decision.decision_id)
    for r in answer.rejects:
        batch_lines = lines.get(r.batch_number, [])
        line = batch_lines[r.position] if r.position < len(batch_lines) else 0
        summary.rejects.append(
            {
                "line": line,
                "batch": r.batch_number,
                "position": r.position,
                "field": r.field,
                "reason": r.reason,
            }
        )


def _import(args: argparse.Namespace) -> int:
    path = Path(args.file)
    fmt = detect_format(path, args.format)
    if not path.is_file():
        raise InvalidArgument("does not exist or is not a file", field=str(path))
    if not args.reference:
        raise InvalidArgument(
            "is required: cite the Reniec resolution or job id (R15)", field="--reference"
        )
    total = count_rows(path, fmt)
    if total is not None:
        total = max(0, total - args.resume_from_batch * args.batch_size)
    progress = Progress(total, sys.stderr, enabled=not args.quiet)
    summary = ImportSummary(next_batch=args.resume_from_batch)
    start = time.monotonic()
    batches = read_batches(
        path,
        fmt,
        default_model=args.model_id,
        size=args.batch_size,
        start_batch=args.resume_from_batch,
        context=_context(args),
    )
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        try:
            for group in _groups(batches, args.batches_per_stream):
                _send(client, group, summary, args)
                progress.update(summary.rows)
        except ClientError as err:
            code = cc.print_error(f"{PROG} import", err, as_json=args.json)
            _resume_hint(args, summary, err)
            return code
    seconds = time.monotonic() - start
    progress.update(summary.rows, final=True)
    _print_import(args, path, summary, seconds)
    return EXIT_REJECTS if summary.rejected else cc.EXIT_OK


def _send(
    client: CentinelaClient,
    group: list[FileBatch],
    summary: ImportSummary,
    args: argparse.Namespace,
) -> None:
    for b in group:
        for rej in b.local_rejects:
            summary.rejects.append(
                {
                    "line": rej.line,
                    "batch": b.number,
                    "position": -1,
                    "field": rej.field,
                    "reason": rej.reason,
                }
            )
        summary.rejected += len(b.local_rejects)
    messages = [b.message for b in group if len(b.message.records)]
    if messages:
        timeout = max(float(args.timeout), STREAM_TIMEOUT)
        answer = client.import_templates(messages, timeout=timeout)
        _absorb(summary, group, answer)
        summary.streams += 1
        summary.sent += sum(len(m.records) for m in messages)
    summary.rows += sum(b.rows for b in group)
    summary.batches += len(group)
    summary.next_batch = group[-1].number + 1


def _resume_hint(args: argparse.Namespace, summary: ImportSummary, err: ClientError) -> None:
    if err.code.name in ("PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_ARGUMENT"):
        return
    done = summary.next_batch
    print(
        f"  batches before {done} are durable ({summary.accepted + summary.unchanged:,} "
        f"templates); resume with: centinela registry import {args.file} "
        f"--reference {args.reference} --resume-from-batch {done}",
        file=sys.stderr,
    )


def _print_import(
    args: argparse.Namespace, path: Path, summary: ImportSummary, seconds: float
) -> None:
    if args.json:
        doc = summary.to_json(seconds)
        doc["file"] = str(path)
        doc["exit_code"] = EXIT_REJECTS if summary.rejected else cc.EXIT_OK
        print(json.dumps(doc))
        return
    rate = summary.rows / seconds if seconds > 0 else 0.0
    print(
        f"imported {path.name}: {summary.rows:,} records in {summary.batches:,} batches "
        f"({seconds:.1f} s, {rate:,.0f} records/s)"
    )
    print(
        f"  accepted {summary.accepted:,}  unchanged {summary.unchanged:,}  "
        f"rejected {summary.rejected:,}"
    )
    if summary.rejects:
        shown = sorted(summary.rejects, key=lambda r: (r["batch"], r["line"]))[: args.show_rejects]
        print(f"  rejects (first {len(shown)} of {summary.rejected:,}; never their content):")
        for r in shown:
            print(f"    line {r['line']} (batch {r['batch']}): {r['field']}: {r['reason']}")
        print("  fix those rows and import the file again: stored rows count as unchanged")
    if summary.decisions:
        first, last = summary.decisions[0], summary.decisions[-1]
        more = f" … {last} ({len(summary.decisions)} streams)" if len(summary.decisions) > 1 else ""
        print(f"  audited as {first}{more}")
    print("  the search index catches up in the background: see `centinela registry status`")


# ---- single-subject commands ------------------------------------------------------------


def _require_reference(args: argparse.Namespace, what: str) -> None:
    if not args.reference:
        raise InvalidArgument(f"is required: cite the {what} (R15)", field="--reference")


def _remove(args: argparse.Namespace) -> int:
    _require_reference(args, "Reniec resolution")
    request = rpb.RemoveSubjectRequest(context=_context(args), dni=_read_dni(args.dni))
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        answer = client.remove_subject(request)
    if args.json:
        print(json.dumps(_doc(answer)))
    elif answer.templates_removed:
        print(
            f"removed {answer.templates_removed} template(s) from the registry "
            f"({_decision_text(answer.decision)})"
        )
    else:
        print(f"that DNI has no template in the registry ({_decision_text(answer.decision)})")
    return cc.EXIT_OK


def _object(args: argparse.Namespace) -> int:
    _require_reference(args, "objection filing id")
    request = rpb.RecordObjectionRequest(context=_context(args), dni=_read_dni(args.dni))
    if args.filed_at:
        from centinela.clients.builders import timestamp

        request.filed_at.CopyFrom(timestamp(args.filed_at))
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        answer = client.record_objection(request)
    if args.json:
        print(json.dumps(_doc(answer)))
    else:
        print(
            f"objection recorded for subject {answer.subject_ref}: excluded from registry "
            f"1:N searches where the framework enforces objections (R7) "
            f"({_decision_text(answer.decision)})"
        )
    return cc.EXIT_OK


def _withdraw(args: argparse.Namespace) -> int:
    _require_reference(args, "withdrawal filing id")
    request = rpb.WithdrawObjectionRequest(context=_context(args), dni=_read_dni(args.dni))
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        answer = client.withdraw_objection(request)
    if args.json:
        print(json.dumps(_doc(answer)))
    else:
        print(
            f"objection withdrawn for subject {answer.subject_ref} "
            f"({_decision_text(answer.decision)})"
        )
    return cc.EXIT_OK


def _status(args: argparse.Namespace) -> int:
    request = rpb.GetImportStatusRequest(context=common_pb2.RequestContext())
    deadline = time.monotonic() + args.wait if args.wait else None
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        answer = client.get_import_status(request)
        while deadline is not None and answer.index_lag and time.monotonic() < deadline:
            if not args.json:
                print(f"  index behind by {answer.index_lag:,}…", file=sys.stderr)
            time.sleep(args.poll)
            answer = client.get_import_status(request)
    if args.json:
        doc = {
            "durable": answer.durable,
            "indexed": answer.indexed,
            "index_lag": answer.index_lag,
            "searchable": answer.index_lag == 0,
        }
        print(json.dumps(doc))
    else:
        state = "all searchable" if answer.index_lag == 0 else f"{answer.index_lag:,} behind"
        print(
            f"registry: durable {answer.durable:,}  indexed {answer.indexed:,}  "
            f"index lag {answer.index_lag:,} ({state})"
        )
    if deadline is not None and answer.index_lag:
        print(f"{PROG} status: the index is still behind after {args.wait} s", file=sys.stderr)
        return cc.EXIT_UNAVAILABLE
    return cc.EXIT_OK


# ---- parser -------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, *, reference: str | None) -> None:
    if reference is not None:
        p.add_argument("--reference", default="", help=reference)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    cc.add_connection_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Reniec's registry: import templates, remove subjects, objections (R7).",
        epilog=EXIT_HELP,
    )
    sub = parser.add_subparsers(dest="action", metavar="COMMAND", required=True)

    imp = sub.add_parser(
        "import",
        help="import templates from a CSV or JSON Lines file",
        description=(
            "Import registry templates. CSV: a header naming dni, model_id and vector; the "
            "vector as a JSON list or space-separated floats. JSON Lines: one object per line "
            'with "dni", "model_id" and "vector". Batches of --batch-size rows; resumable.'
        ),
        epilog=EXIT_HELP,
    )
    imp.add_argument("file", metavar="FILE", help="the CSV or JSONL file")
    imp.add_argument("--format", choices=("csv", "jsonl"), help="default: from the file name")
    imp.add_argument("--model-id", default="", help="model id for rows that leave it empty")
    imp.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help=f"rows per message ({BATCH_SIZE})"
    )
    imp.add_argument(
        "--batches-per-stream",
        type=int,
        default=10,
        help="messages per acknowledged stream (10)",
    )
    imp.add_argument(
        "--resume-from-batch", type=int, default=0, metavar="N", help="skip batches before N"
    )
    imp.add_argument(
        "--show-rejects", type=int, default=20, metavar="N", help="rejects listed (20)"
    )
    imp.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    _common(imp, reference="the Reniec resolution or job id this import cites (required)")
    imp.set_defaults(func=_import)

    for name, func, text, ref in (
        ("remove", _remove, "remove every template of one DNI", "the Reniec resolution id"),
        ("object", _object, "record an objection (R7)", "the objection filing id"),
        ("withdraw", _withdraw, "withdraw an objection", "the withdrawal filing id"),
    ):
        p = sub.add_parser(name, help=text, epilog=EXIT_HELP)
        p.add_argument("dni", metavar="DNI", help="8 digits, or - to read it from stdin")
        if name == "object":
            p.add_argument(
                "--filed-at",
                type=_when,
                help="when the objection was filed (ISO 8601, default now)",
            )
        _common(p, reference=f"{ref} (required)")
        p.set_defaults(func=func)

    st = sub.add_parser("status", help="durable and searchable templates", epilog=EXIT_HELP)
    st.add_argument(
        "--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds for lag 0"
    )
    st.add_argument("--poll", type=float, default=1.0, help="seconds between polls (1)")
    _common(st, reference=None)
    st.set_defaults(func=_status)
    return parser


def _when(text: str) -> Any:
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be an ISO 8601 date or time") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``centinela registry``; return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse: --help is 0, a usage error 2
        return int(exc.code or 0)
    if args.action == "import":
        problem = None
        if not 1 <= args.batch_size <= BATCH_SIZE:
            problem = InvalidArgument(f"must lie in 1..{BATCH_SIZE}", field="--batch-size")
        elif args.batches_per_stream < 1:
            problem = InvalidArgument("must be at least 1", field="--batches-per-stream")
        elif args.resume_from_batch < 0:
            problem = InvalidArgument("must be 0 or more", field="--resume-from-batch")
        if problem is not None:
            return cc.print_error(f"{PROG} import", problem, as_json=args.json)
    try:
        result: int = args.func(args)
        return result
    except CentinelaError as err:
        return cc.print_error(f"{PROG} {args.action}", err, as_json=getattr(args, "json", False))
    except KeyboardInterrupt:
        return cc.EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
