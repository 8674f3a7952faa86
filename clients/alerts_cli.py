"""``centinela alerts``: the live console of a control center (Serenazgo, PNP region, national).

    centinela alerts watch [--site S]... [--cursor C] [--json] [--confirm]
    centinela alerts sightings REF [--json]

``watch`` prints one line per alert as it happens, and one per change of its confirmation
state (R9), within what the policy lets this center see (R10). The last cursor is printed so
an operator can resume after a disconnect without missing an alert (the server keeps a
durable outbox). With ``--confirm`` each new alert asks the operator for a verdict. No line
ever holds a probe, a plate, a DNI or a name: references, sites, categories, score bands.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from centinela.clients.builders import request_context
from centinela.clients.cli_common import (
    EXIT_OK,
    EXIT_USAGE,
    add_connection_options,
    client_from_args,
    print_error,
)
from centinela.errors import CentinelaError
from centinela.v1 import common_pb2
from centinela.v1 import match_service_pb2 as mpb
from centinela.v1 import watchlist_service_pb2 as wpb

STATES = {v: k.removeprefix("ALERT_STATE_") for k, v in mpb.AlertState.items()}
GALLERY = {v: k.removeprefix("GALLERY_") for k, v in common_pb2.Gallery.items()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="centinela alerts", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    watch = sub.add_parser("watch", help="follow alerts as they happen (Ctrl-C to stop)")
    watch.add_argument("--site", action="append", default=[], help="only these sites")
    watch.add_argument("--cursor", default="", help="resume after this cursor")
    watch.add_argument("--json", action="store_true", help="one JSON object per line")
    watch.add_argument("--confirm", action="store_true", help="ask for a verdict on each alert")
    watch.add_argument("--max", type=int, default=0, help="stop after N events (0: never)")
    add_connection_options(watch)
    sight = sub.add_parser("sightings", help="sighting history of a requisitoria or vehicle")
    sight.add_argument("reference", help="requisition id (req_…) or vehicle id (veh_…)")
    sight.add_argument("--json", action="store_true")
    add_connection_options(sight)
    return parser


def _line(ev: mpb.SubscribeAlertsResponse) -> str:
    when = ev.capture_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
    state = STATES.get(ev.state, "?")
    return (
        f"{when}  {state:<19} {GALLERY.get(ev.gallery, '?'):<16} site={ev.site_id:<18} "
        f"ref={ev.reference} {ev.category} score={ev.score_band} "
        f"confirmations={ev.confirmations} alert={ev.alert_id} cursor={ev.cursor}"
    )


def watch(args: argparse.Namespace, out: TextIO, ask: Callable[[str], str] = input) -> int:
    """Follow the alert feed; returns an exit code."""
    with client_from_args(args, default_identity="muni-miraflores") as client:
        req = mpb.SubscribeAlertsRequest(
            context=request_context(operator_id=args.operator),
            cursor=args.cursor,
            site_ids=args.site,
        )
        seen = 0
        try:
            for ev in client.subscribe_alerts(req, timeout=None):
                seen += 1
                if args.json:
                    print(
                        json.dumps(
                            {
                                "cursor": ev.cursor,
                                "alert_id": ev.alert_id,
                                "decision_id": ev.decision_id,
                                "site_id": ev.site_id,
                                "capture_time": ev.capture_time.ToJsonString(),
                                "gallery": GALLERY.get(ev.gallery, ""),
                                "reference": ev.reference,
                                "category": ev.category,
                                "score_band": ev.score_band,
                                "state": STATES.get(ev.state, ""),
                                "confirmations": ev.confirmations,
                            },
                            sort_keys=True,
                        ),
                        file=out,
                        flush=True,
                    )
                else:
                    print(_line(ev), file=out, flush=True)
                if args.confirm and ev.state == mpb.ALERT_STATE_PENDING:
                    _ask_verdict(client, args, ev, out, ask)
                if args.max and seen >= args.max:
                    break
        except KeyboardInterrupt:
            return 130
    return EXIT_OK


def _ask_verdict(
    client: object,
    args: argparse.Namespace,
    ev: mpb.SubscribeAlertsResponse,
    out: TextIO,
    ask: Callable[[str], str],
) -> None:
    if not args.operator:
        print("  (--confirm needs --operator: confirmations count distinct people)", file=out)
        return
    answer = ask(f"  confirm alert {ev.alert_id}? [y]es / [n]o (false alarm) / [s]kip: ")
    verdict = {"y": mpb.ALERT_VERDICT_CONFIRMED, "n": mpb.ALERT_VERDICT_REJECTED}.get(
        answer.strip().lower()[:1]
    )
    if verdict is None:
        return
    resp = client.confirm_alert(  # type: ignore[attr-defined]
        mpb.ConfirmAlertRequest(
            context=request_context(operator_id=args.operator),
            alert_id=ev.alert_id,
            verdict=verdict,
        )
    )
    print(
        f"  -> {STATES.get(resp.state, '?')} ({resp.confirmations}/"
        f"{resp.confirmations_required} confirmations"
        f"{', actionable' if resp.actionable else ''}; decision {resp.decision.decision_id})",
        file=out,
    )


def sightings(args: argparse.Namespace, out: TextIO) -> int:
    """Print the sighting history of one reference, newest first."""
    with client_from_args(args, default_identity="pnp-investigator") as client:
        req = wpb.ListSightingsRequest(
            context=request_context(operator_id=args.operator), reference=args.reference
        )
        resp = client.list_sightings(req)
        rows = [
            {
                "capture_time": s.capture_time.ToJsonString(),
                "site_id": s.site_id,
                "state": s.confirmation_state,
                "alert_id": s.alert_id,
                "decision_id": s.decision_id,
            }
            for s in resp.sightings
        ]
        if args.json:
            print(json.dumps({"reference": args.reference, "sightings": rows}), file=out)
        elif not rows:
            print(f"no sightings of {args.reference} within the retention period", file=out)
        else:
            for r in rows:
                print(
                    f"{r['capture_time']}  site={r['site_id']:<18} {r['state']:<19} "
                    f"alert={r['alert_id']} decision={r['decision_id']}",
                    file=out,
                )
    return EXIT_OK


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of ``centinela alerts``."""
    stream = out or sys.stdout
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else EXIT_USAGE
    try:
        if args.command == "watch":
            return watch(args, stream)
        return sightings(args, stream)
    except CentinelaError as err:
        return print_error(
            "centinela alerts", err, as_json=args.json, out=stream if args.json else None
        )


if __name__ == "__main__":
    raise SystemExit(main())
