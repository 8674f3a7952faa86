"""``centinela admin calibrate``: measure a face gallery's FPIR with a non-mated set (R8).

The data owner (PNP administrators for the watchlist, Reniec for the registry) sends
templates of people known *not* to be in the gallery; the server searches each against the
live gallery and answers with aggregates only: the threshold that meets the target FPIR, the
FPIR at the bundle's floor with its 95 % interval, and a short curve. The output ends with
the two data.json values to adopt (``threshold_floor``, ``calibrated_size``); adopting them is
a bundle change, reviewed and tested like any other (README, "Changing the policy")::

    centinela admin calibrate --templates strangers.npy --reference CAL-2026-07
    centinela admin calibrate --gallery registry --identity reniec --templates set.jsonl

Templates: a ``.npy`` matrix (one L2-normalised row per template, of the gallery's model,
which the server reports) or a JSON list / JSON Lines file of ``{model_id, vector}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format

from centinela.clients import cli_common as cc
from centinela.errors import InvalidArgument
from centinela.matcher.calibration import MIN_FALSE_POSITIVES, floor_for, outgrown
from centinela.v1 import common_pb2
from centinela.v1 import match_service_pb2 as mpb

GALLERIES = {
    "watchlist": (common_pb2.GALLERY_PNP_WATCHLIST, "pnp_watchlist", "pnp-admin"),
    "registry": (common_pb2.GALLERY_RENIEC_REGISTRY, "reniec_registry", "reniec"),
}
#: Templates per stream message: 512 floats each, ~1 MB a message (the limit is 4 MB).
BATCH = 500
#: A calibration of a large set takes minutes: the deadline unless --timeout says otherwise.
DEFAULT_TIMEOUT_S = 900.0
#: Sets up to this size are held whole and re-sent on UNAVAILABLE; larger ones stream as read.
REPLAYABLE = 50_000


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure a face gallery's FPIR with people known not to be in it (R8)",
        description=__doc__.split("\n\n")[1].replace("::", "."),
        epilog=cc.EXIT_CODES_HELP,
    )
    p.add_argument("--gallery", choices=sorted(GALLERIES), default="watchlist", help="(watchlist)")
    p.add_argument(
        "--templates",
        type=Path,
        required=True,
        help=".npy matrix, or JSON / JSON Lines of {model_id, vector}",
    )
    p.add_argument(
        "--target-fpir",
        type=float,
        default=0.0,
        help="target false-positive identification rate in (0, 1); default: the bundle's",
    )
    p.add_argument("--reference", default="", help="the calibration study's id, for the audit")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    cc.add_connection_options(p)
    p.set_defaults(func=run, verb="", timeout=DEFAULT_TIMEOUT_S)


def add_status_parser(sub: Any) -> None:
    p = sub.add_parser(
        "galleries",
        help="each gallery's size, floor, and whether it outgrew its calibration (R8)",
        epilog=cc.EXIT_CODES_HELP,
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    cc.add_connection_options(p)
    p.set_defaults(func=status, verb="")


def _state(g: mpb.GalleryInfo) -> str:
    if not g.model_id:
        return "-"  # plates: matched by edit distance, not calibrated for an FPIR
    if not g.calibrated_size:
        return "size not declared"
    if outgrown(g.active, g.calibrated_size):
        return "OUTGREW: recalibrate"
    return "ok"


def status(args: argparse.Namespace) -> int:
    with cc.client_from_args(args, default_identity="pnp-admin") as client:
        info = client.server_info()
    if args.json:
        doc = json_format.MessageToDict(
            info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        print(json.dumps({"galleries": doc["galleries"], "policy_bundle": info.policy_bundle}))
        return cc.EXIT_OK
    header = [
        "gallery",
        "entries",
        "active",
        "floor",
        "target fpir",
        "calibrated at",
        "expected",
        "state",
    ]
    rows = []
    for g in info.galleries:
        face = bool(g.model_id)
        rows.append(
            [
                common_pb2.Gallery.Name(g.gallery).removeprefix("GALLERY_").lower(),
                f"{g.size:,}",
                f"{g.active:,}" if face else "-",
                f"{g.threshold:.3f}",
                f"{g.target_fpir:g}" if face else "-",
                f"{g.calibrated_size:,}" if g.calibrated_size else "-",
                f"{g.expected_fpir:.4f}" if g.calibrated_size else "-",
                _state(g),
            ]
        )
    print(cc.table(rows, header))
    print(f"policy bundle {info.policy_bundle}")
    return cc.EXIT_OK


class TemplateSource:
    """The templates of a ``--templates`` file, read a message's worth at a time.

    A ``.npy`` matrix is memory-mapped, so a million-row set never sits in memory as protobuf
    messages (about 2 GB); JSON is parsed whole (prefer .npy for large sets).

    Raises:
        InvalidArgument: unreadable, not a 2-D float matrix, or no template.
    """

    def __init__(self, path: Path, model_id: str) -> None:
        self.model_id = model_id
        self.matrix: np.ndarray | None = None
        self.items: list[common_pb2.FaceTemplate] = []
        if path.suffix == ".npy":
            try:
                self.matrix = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InvalidArgument(
                    f"cannot be read as .npy ({exc})", field="--templates"
                ) from None
            if self.matrix.ndim != 2 or not np.issubdtype(self.matrix.dtype, np.floating):
                raise InvalidArgument("must be a 2-D float matrix", field="--templates")
        else:
            from centinela.clients.admin_cli import templates_from

            self.items = templates_from(path)
        if len(self) == 0:
            raise InvalidArgument("holds no template", field="--templates")

    def __len__(self) -> int:
        return len(self.matrix) if self.matrix is not None else len(self.items)

    def batches(self) -> Iterator[list[common_pb2.FaceTemplate]]:
        if self.matrix is not None:
            yield from matrix_batches(self.matrix, self.model_id)
            return
        for start in range(0, len(self.items), BATCH):
            yield self.items[start : start + BATCH]


def matrix_batches(matrix: np.ndarray, model_id: str) -> Iterator[list[common_pb2.FaceTemplate]]:
    """A matrix's rows as templates of ``model_id``, ``BATCH`` at a time (read as they go, so
    a memory-mapped file stays on disk)."""
    for start in range(0, len(matrix), BATCH):
        rows = np.asarray(matrix[start : start + BATCH], dtype=np.float32)
        yield [common_pb2.FaceTemplate(model_id=model_id, vector=r.tolist()) for r in rows]


def messages(
    gallery: common_pb2.Gallery.ValueType,
    target: float,
    reference: str,
    batches: Iterable[list[common_pb2.FaceTemplate]],
    progress: Callable[[int], None] | None = None,
) -> Iterator[mpb.CalibrateGalleryRequest]:
    """The call's stream: the first message names gallery, target and reference. With
    ``progress``, it is told how many templates have gone once each message is taken (gRPC
    takes the next as the server reads on, which it does once the one before is searched)."""
    sent = 0
    for i, chunk in enumerate(batches):
        msg = mpb.CalibrateGalleryRequest(templates=chunk)
        if i == 0:
            msg.gallery = gallery
            msg.target_fpir = target
            msg.context.reference = reference
        yield msg
        sent += len(chunk)
        if progress is not None:
            progress(sent)


def render(answer: mpb.CalibrateGalleryResponse, gallery: str) -> str:
    low, high = answer.fpir_at_floor_low, answer.fpir_at_floor_high
    lines = [
        f"{gallery}: {answer.templates:,} non-mated templates against "
        f"{answer.gallery_size:,} active entries",
        f"  target FPIR {answer.target_fpir:g}: threshold {answer.threshold:.4f}"
        + ("" if answer.resolved else "  UNRESOLVED"),
        f"  bundle floor {answer.threshold_floor:.3f}: FPIR {answer.fpir_at_floor:.4f} "
        f"(95 % {low:.4f}-{high:.4f})",
        "",
        "  threshold   FPIR",
    ]
    lines += [f"  {p.threshold:9.3f}   {p.fpir:.4f}" for p in answer.curve]
    lines.append("")
    if not answer.resolved:
        need = math.ceil(MIN_FALSE_POSITIVES / answer.target_fpir)
        lines.append(
            f"  too few templates to resolve {answer.target_fpir:g}: send at least {need:,} "
            f"({MIN_FALSE_POSITIVES} may then score above the threshold)"
        )
    else:
        lines.append(
            f'  to adopt, in the bundle\'s data.json, galleries.{gallery}: "threshold_floor": '
            f'{floor_for(answer.threshold):.3f}, "calibrated_size": {answer.gallery_size}'
        )
        lines.append("  (alert_threshold may not stay below the floor; run the bundle's tests)")
    lines.append(
        f"  decision {answer.decision.decision_id}, audit entry #{answer.decision.audit_index}"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    enum, name, identity = GALLERIES[args.gallery]
    if not (args.target_fpir == 0.0 or 0.0 < args.target_fpir < 1.0):
        raise InvalidArgument("must lie in (0, 1)", field="--target-fpir")
    with cc.client_from_args(args, default_identity=identity) as client:
        info = client.server_info()
        model = next((g.model_id for g in info.galleries if g.gallery == enum), "")
        source = TemplateSource(args.templates, model)
        total = len(source)
        print(f"searching {total:,} templates against {name}...", file=sys.stderr, flush=True)
        if total > REPLAYABLE:
            # Too large to hold for a retry: sent as read, with progress (not retried).
            every = max(BATCH, total // 20 // BATCH * BATCH)

            def progress(sent: int) -> None:
                if sent % every == 0 and sent < total:
                    print(f"  {sent:,} / {total:,} sent", file=sys.stderr, flush=True)

            answer = client.calibrate_gallery(
                messages(enum, args.target_fpir, args.reference, source.batches(), progress)
            )
        else:  # held whole, so the client library may send it again on UNAVAILABLE
            answer = client.calibrate_gallery(
                list(messages(enum, args.target_fpir, args.reference, source.batches()))
            )
    if args.json:
        doc = json_format.MessageToDict(
            answer, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        doc["suggested_floor"] = floor_for(answer.threshold) if answer.resolved else None
        print(json.dumps(doc))
    else:
        print(render(answer, name))
    return cc.EXIT_OK
