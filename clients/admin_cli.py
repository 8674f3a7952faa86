"""``centinela admin``: the PNP administrators' command line over the WatchlistService.

Commands (every change cites ``--reference``: the warrant, police report or court order, R15;
where the request already names one — a warrant id, a police report id — it is the default)::

    centinela admin requisition add|update|lift|list
    centinela admin vehicle report|recover|list
    centinela admin authorisation add|revoke|list
    centinela admin site add|deactivate|list
    centinela admin calibrate|galleries  (a face gallery's FPIR, R8: clients/calibrate_cli.py)

Human output by default (tables for lists), ``--json`` for scripts. DNIs and plates go to the
server only: the tool never prints one (the server answers with pseudonymous refs and masked
plates). A DNI or plate may be given as ``-`` to read it from standard input, keeping it out of
the shell history and the process list.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from centinela.clients import calibrate_cli
from centinela.clients import cli_common as cc
from centinela.clients.registry_file import parse_vector
from centinela.errors import CentinelaError, InvalidArgument
from centinela.v1 import common_pb2
from centinela.v1 import watchlist_service_pb2 as wpb

PROG = "centinela admin"
DEFAULT_IDENTITY = "pnp-admin"

REQ_STATES = {
    "active": wpb.REQUISITION_STATE_ACTIVE,
    "lifted": wpb.REQUISITION_STATE_LIFTED,
    "expired": wpb.REQUISITION_STATE_EXPIRED,
    "all": wpb.REQUISITION_STATE_UNSPECIFIED,
}
VEH_STATES = {
    "stolen": wpb.VEHICLE_STATE_STOLEN,
    "recovered": wpb.VEHICLE_STATE_RECOVERED,
    "all": wpb.VEHICLE_STATE_UNSPECIFIED,
}
SITE_KINDS = {"camera": wpb.SITE_KIND_CAMERA, "portico": wpb.SITE_KIND_PORTICO}


# ---- small helpers ----------------------------------------------------------------------


def _doc(message: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return doc


def _when(text: str) -> dt.datetime:
    """An ISO 8601 date or date-time; a naive one is taken as UTC."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "must be an ISO 8601 date or time, e.g. 2027-01-31 or 2027-01-31T18:00:00-05:00"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _ts(when: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when.astimezone(dt.UTC))
    return ts


def _show_ts(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=dt.UTC).strftime("%Y-%m-%d %H:%M")


def _secret(value: str, what: str) -> str:
    """A DNI or plate from the command line, or from stdin when given as ``-``."""
    if value != "-":
        return value
    text = sys.stdin.readline().strip()
    if not text:
        raise InvalidArgument(f"no {what} on standard input", field=what)
    return text


def _context(args: argparse.Namespace, default_reference: str = "") -> common_pb2.RequestContext:
    return common_pb2.RequestContext(reference=args.reference or default_reference)


def _require(args: argparse.Namespace, what: str, default: str = "") -> None:
    if not (args.reference or default):
        raise InvalidArgument(f"is required: cite the {what} (R15)", field="--reference")


def _decision(info: common_pb2.DecisionInfo) -> str:
    return f"decision {info.decision_id}, audit entry #{info.audit_index}"


def _emit(args: argparse.Namespace, answer: Any, text: str) -> int:
    print(json.dumps(_doc(answer)) if args.json else text)
    return cc.EXIT_OK


def _list(
    args: argparse.Namespace,
    name: str,
    request: Any,
    field: str,
    header: list[str],
    row: Callable[[Any], list[str]],
) -> int:
    """One page (or every page with --all) of the List RPC ``name``, as a table or JSON."""
    request.page_size = args.page_size
    request.page_token = args.page_token
    items: list[Any] = []
    token = ""
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        method = getattr(client, name)
        if args.all:
            for page in client.pages(method, request):
                items += list(getattr(page, field))
        else:
            page = method(request)
            items, token = list(getattr(page, field)), page.next_page_token
    if args.json:
        print(json.dumps({field: [_doc(i) for i in items], "next_page_token": token}))
        return cc.EXIT_OK
    if not items:
        print(f"no {field}")
    else:
        print(cc.table([row(i) for i in items], header))
    if token:
        print(f"more: add --page-token {token} (or --all)")
    return cc.EXIT_OK


# ---- requisitorias ------------------------------------------------------------------------


def templates_from(path: Path) -> list[common_pb2.FaceTemplate]:
    """Templates from a JSON list or JSON Lines of {"model_id", "vector"} objects."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot be read ({exc.strerror})", field="--templates") from None
    try:
        doc = json.loads(text)
        items = doc if isinstance(doc, list) else [doc]
    except ValueError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            raise InvalidArgument(
                "must be a JSON list or JSON Lines of {model_id, vector}", field="--templates"
            ) from None
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not item.get("model_id"):
            raise InvalidArgument(f"item {i} needs model_id and vector", field="--templates")
        out.append(
            common_pb2.FaceTemplate(
                model_id=str(item["model_id"]), vector=parse_vector(item.get("vector"))
            )
        )
    return out


def _req_row(r: wpb.Requisition) -> list[str]:
    return [
        r.requisition_id,
        wpb.RequisitionState.Name(r.state).removeprefix("REQUISITION_STATE_"),
        r.warrant_id,
        r.offence_category,
        _show_ts(r.expires_at),
        str(r.template_count),
        "registry" if r.from_registry else "supplied",
    ]


def _req_text(verb: str, r: wpb.Requisition, info: common_pb2.DecisionInfo) -> str:
    state = wpb.RequisitionState.Name(r.state).removeprefix("REQUISITION_STATE_")
    return (
        f"requisitoria {r.requisition_id} {verb}: {state}, warrant {r.warrant_id}, "
        f"{r.offence_category}, expires {_show_ts(r.expires_at)}, "
        f"{r.template_count} template(s) ({_decision(info)})"
    )


def _template_from_photo(path: Path) -> common_pb2.FaceTemplate:
    """Enrol from a photo with the edge encoder, locally: only the embedding is sent.

    Raises:
        InvalidArgument: the edge extra is missing, or the photo has no face or several.
    """
    try:
        from centinela.clients.encoder import encode_single_face
    except ImportError as exc:  # the edge extra (onnxruntime, insightface) is optional
        raise InvalidArgument(
            "needs the edge extra: pip install 'centinela[edge]'", field="--image"
        ) from exc
    vector, model_id = encode_single_face(path)
    return common_pb2.FaceTemplate(model_id=model_id, vector=[float(x) for x in vector])


def _req_add(args: argparse.Namespace) -> int:
    _require(args, "warrant", args.warrant)
    if not args.dni and not args.templates and not args.image:
        raise InvalidArgument(
            "give --dni (templates taken from the registry), --templates FILE or --image PHOTO",
            field="--dni",
        )
    request = wpb.CreateRequisitionRequest(
        context=_context(args, args.warrant),
        warrant_id=args.warrant,
        issuing_court=args.court,
        offence_category=args.offence,
        issued_at=_ts(args.issued),
        expires_at=_ts(args.expires),
        dni=_secret(args.dni, "DNI") if args.dni else "",
    )
    if args.templates:
        request.templates.templates.extend(templates_from(Path(args.templates)))
    for image in args.image:
        request.templates.templates.append(_template_from_photo(Path(image)))
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        answer = client.create_requisition(request)
    return _emit(args, answer, _req_text("created", answer.requisition, answer.decision))


def _req_update(args: argparse.Namespace) -> int:
    _require(args, "order that changes the requisitoria")
    req = wpb.Requisition()
    paths: list[str] = []
    if args.court:
        req.issuing_court, paths = args.court, [*paths, "issuing_court"]
    if args.offence:
        req.offence_category, paths = args.offence, [*paths, "offence_category"]
    if args.expires:
        req.expires_at.CopyFrom(_ts(args.expires))
        paths.append("expires_at")
    if not paths:
        raise InvalidArgument("give at least one of --court, --offence, --expires", field="--court")
    request = wpb.UpdateRequisitionRequest(
        context=_context(args), requisition_id=args.requisition_id, requisition=req
    )
    request.update_mask.paths.extend(paths)
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        answer = client.update_requisition(request)
    return _emit(args, answer, _req_text("updated", answer.requisition, answer.decision))


def _req_lift(args: argparse.Namespace) -> int:
    _require(args, "lifting order")
    request = wpb.LiftRequisitionRequest(
        context=_context(args), requisition_id=args.requisition_id, reason=args.reason
    )
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        answer = client.lift_requisition(request)
    text = _req_text("lifted", answer.requisition, answer.decision) + "; it no longer matches (R6)"
    return _emit(args, answer, text)


def _req_list(args: argparse.Namespace) -> int:
    request = wpb.ListRequisitionsRequest(
        context=common_pb2.RequestContext(), state=REQ_STATES[args.state]
    )
    header = ["id", "state", "warrant", "offence", "expires", "templates", "source"]
    return _list(args, "list_requisitions", request, "requisitions", header, _req_row)


# ---- vehicles -----------------------------------------------------------------------------


def _veh_row(v: wpb.StolenVehicle) -> list[str]:
    return [
        v.vehicle_id,
        wpb.VehicleState.Name(v.state).removeprefix("VEHICLE_STATE_"),
        v.plate_masked,
        v.police_report_id,
        v.report_category,
        _show_ts(v.reported_at),
        _show_ts(v.recovered_at),
    ]


def _veh_report(args: argparse.Namespace) -> int:
    _require(args, "police report", args.police_report)
    request = wpb.ReportStolenVehicleRequest(
        context=_context(args, args.police_report),
        plate=_secret(args.plate, "plate"),
        police_report_id=args.police_report,
        report_category=args.category,
    )
    if args.reported_at:
        request.reported_at.CopyFrom(_ts(args.reported_at))
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        answer = client.report_stolen_vehicle(request)
    v = answer.vehicle
    text = (
        f"vehicle {v.vehicle_id} reported stolen: plate {v.plate_masked}, report "
        f"{v.police_report_id}, {v.report_category} ({_decision(answer.decision)})"
    )
    return _emit(args, answer, text)


def _veh_recover(args: argparse.Namespace) -> int:
    _require(args, "recovery report")
    request = wpb.RecoverVehicleRequest(context=_context(args), vehicle_id=args.vehicle_id)
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        answer = client.recover_vehicle(request)
    v = answer.vehicle
    text = (
        f"vehicle {v.vehicle_id} recovered: plate {v.plate_masked} no longer matches (R6) "
        f"({_decision(answer.decision)})"
    )
    return _emit(args, answer, text)


def _veh_list(args: argparse.Namespace) -> int:
    request = wpb.ListStolenVehiclesRequest(
        context=common_pb2.RequestContext(), state=VEH_STATES[args.state]
    )
    header = ["id", "state", "plate", "report", "category", "reported", "recovered"]
    return _list(args, "list_stolen_vehicles", request, "vehicles", header, _veh_row)


# ---- judicial authorisations --------------------------------------------------------------


def _auth_row(a: wpb.JudicialAuthorisation) -> list[str]:
    return [
        a.authorisation_id,
        "revoked" if a.revoked else "in force",
        a.court,
        ",".join(a.site_ids) or "-",
        ",".join(a.offence_categories) or "-",
        f"{_show_ts(a.not_before)} → {_show_ts(a.not_after)}",
        str(len(a.subject_refs)),
    ]


def _auth_add(args: argparse.Namespace) -> int:
    _require(args, "court order", args.id)
    auth = wpb.JudicialAuthorisation(
        authorisation_id=args.id,
        court=args.court,
        site_ids=args.site,
        offence_categories=args.offence,
        not_before=_ts(args.not_before),
        not_after=_ts(args.not_after),
    )
    request = wpb.RegisterAuthorisationRequest(
        context=_context(args, args.id),
        authorisation=auth,
        named_dnis=[_secret(d, "DNI") for d in args.named_dni],
    )
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        answer = client.register_authorisation(request)
    a = answer.authorisation
    text = (
        f"authorisation {a.authorisation_id} registered: {a.court}; sites "
        f"{', '.join(a.site_ids) or 'none'}; offences {', '.join(a.offence_categories) or 'none'}"
        f"; {_show_ts(a.not_before)} → {_show_ts(a.not_after)}; {len(a.subject_refs)} named "
        f"subject(s) ({_decision(answer.decision)})"
    )
    return _emit(args, answer, text)


def _auth_revoke(args: argparse.Namespace) -> int:
    _require(args, "revoking order")
    request = wpb.RevokeAuthorisationRequest(
        context=_context(args), authorisation_id=args.authorisation_id
    )
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        answer = client.revoke_authorisation(request)
    text = (
        f"authorisation {answer.authorisation.authorisation_id} revoked: it no longer allows "
        f"registry searches ({_decision(answer.decision)})"
    )
    return _emit(args, answer, text)


def _auth_list(args: argparse.Namespace) -> int:
    request = wpb.ListAuthorisationsRequest(
        context=common_pb2.RequestContext(), include_revoked=args.include_revoked
    )
    header = ["id", "state", "court", "sites", "offences", "window", "named"]
    return _list(args, "list_authorisations", request, "authorisations", header, _auth_row)


# ---- sites --------------------------------------------------------------------------------


def _site_row(s: wpb.Site) -> list[str]:
    kind = wpb.SiteKind.Name(s.kind).removeprefix("SITE_KIND_").lower()
    state = "active" if s.active else "inactive"
    return [s.site_id, state, kind, s.municipality, s.region, s.description or "-"]


def _site_add(args: argparse.Namespace) -> int:
    _require(args, "resolution that registers the site")
    site = wpb.Site(
        site_id=args.id,
        municipality=args.municipality,
        region=args.region,
        kind=SITE_KINDS[args.kind],
        description=args.description,
    )
    request = wpb.RegisterSiteRequest(context=_context(args), site=site)
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        answer = client.register_site(request)
    s = answer.site
    text = (
        f"site {s.site_id} registered to {s.municipality} ({s.region}), "
        f"{_site_row(s)[2]} ({_decision(answer.decision)})"
    )
    return _emit(args, answer, text)


def _site_deactivate(args: argparse.Namespace) -> int:
    _require(args, "resolution that deactivates the site")
    request = wpb.DeactivateSiteRequest(context=_context(args), site_id=args.site_id)
    with cc.client_from_args(args, default_identity=DEFAULT_IDENTITY) as client:
        answer = client.deactivate_site(request)
    text = (
        f"site {answer.site.site_id} deactivated: its probes are refused (R5) "
        f"({_decision(answer.decision)})"
    )
    return _emit(args, answer, text)


def _site_list(args: argparse.Namespace) -> int:
    request = wpb.ListSitesRequest(
        context=common_pb2.RequestContext(), municipality=args.municipality
    )
    header = ["id", "state", "kind", "municipality", "region", "description"]
    return _list(args, "list_sites", request, "sites", header, _site_row)


def _sightings(args: argparse.Namespace) -> int:
    from centinela.clients.alerts_cli import sightings

    if args.identity is None and not args.cert:
        args.identity = "pnp-investigator"
    return sightings(args, sys.stdout)


# ---- parser -------------------------------------------------------------------------------


def _opts(p: argparse.ArgumentParser, reference: str | None) -> None:
    if reference is not None:
        p.add_argument("--reference", default="", help=reference)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    cc.add_connection_options(p)


def _list_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--page-size", type=int, default=50, help="1-500 (50)")
    p.add_argument("--page-token", default="", help="from the previous page")
    p.add_argument("--all", action="store_true", help="follow every page")
    _opts(p, None)


def _group(
    sub: Any, name: str, text: str
) -> Any:  # argparse's _SubParsersAction is private; typed loosely
    group = sub.add_parser(name, help=text, epilog=cc.EXIT_CODES_HELP)
    return group.add_subparsers(dest="verb", metavar="ACTION", required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="PNP administration: requisitorias, stolen vehicles, judicial "
        "authorisations and sites. Every change cites --reference (R15) and is audited.",
        epilog=cc.EXIT_CODES_HELP,
    )
    sub = parser.add_subparsers(dest="action", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "sightings",
        help="sighting history (rastreo) of a requisitoria or stolen vehicle, newest first",
        epilog=cc.EXIT_CODES_HELP,
    )
    p.add_argument("reference", metavar="REF", help="requisition id (req_…) or vehicle id (veh_…)")
    _opts(p, None)
    p.set_defaults(func=_sightings, verb="")

    calibrate_cli.add_parser(sub)
    calibrate_cli.add_status_parser(sub)

    req = _group(sub, "requisition", "requisitorias (wanted persons)")
    p = req.add_parser("add", help="create a requisitoria from a DNI or supplied templates")
    p.add_argument("--warrant", required=True, help="warrant id (orden de captura)")
    p.add_argument("--court", required=True, help="issuing court")
    p.add_argument("--offence", required=True, help="offence category, e.g. ROBO_AGRAVADO")
    p.add_argument("--issued", type=_when, required=True, help="issue date (ISO 8601)")
    p.add_argument("--expires", type=_when, required=True, help="expiry (ISO 8601)")
    p.add_argument("--dni", default="", help="DNI (templates from the registry), or - for stdin")
    p.add_argument("--templates", help="JSON/JSONL file of {model_id, vector} templates")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        help="photo of the wanted person (repeatable): encoded here with the edge encoder, "
        "only the embedding is sent",
    )
    _opts(p, "warrant or order id (default: --warrant)")
    p.set_defaults(func=_req_add)
    p = req.add_parser("update", help="change court, offence category or expiry")
    p.add_argument("requisition_id", metavar="REQUISITION_ID")
    p.add_argument("--court", default="")
    p.add_argument("--offence", default="")
    p.add_argument("--expires", type=_when)
    _opts(p, "order id (required)")
    p.set_defaults(func=_req_update)
    p = req.add_parser("lift", help="lift a requisitoria: it stops matching at once")
    p.add_argument("requisition_id", metavar="REQUISITION_ID")
    p.add_argument("--reason", default="", help='e.g. "captured"; no personal data')
    _opts(p, "lifting order id (required)")
    p.set_defaults(func=_req_lift)
    p = req.add_parser("list", help="list requisitorias")
    p.add_argument("--state", choices=sorted(REQ_STATES), default="all")
    _list_opts(p)
    p.set_defaults(func=_req_list)

    veh = _group(sub, "vehicle", "stolen vehicles")
    p = veh.add_parser("report", help="report a stolen vehicle")
    p.add_argument("--plate", required=True, help="the plate, or - to read it from stdin")
    p.add_argument("--police-report", required=True, help="police report (denuncia) id")
    p.add_argument("--category", required=True, help="report category, e.g. ROBO, HURTO")
    p.add_argument("--reported-at", type=_when, help="when reported (default now)")
    _opts(p, "police report id (default: --police-report)")
    p.set_defaults(func=_veh_report)
    p = veh.add_parser("recover", help="mark a vehicle recovered: it stops matching at once")
    p.add_argument("vehicle_id", metavar="VEHICLE_ID")
    _opts(p, "recovery report id (required)")
    p.set_defaults(func=_veh_recover)
    p = veh.add_parser("list", help="list stolen-vehicle reports")
    p.add_argument("--state", choices=sorted(VEH_STATES), default="all")
    _list_opts(p)
    p.set_defaults(func=_veh_list)

    auth = _group(sub, "authorisation", "judicial authorisations for registry searches (R3)")
    p = auth.add_parser("add", help="register a judicial authorisation")
    p.add_argument("--id", required=True, help="the court's id for the order")
    p.add_argument("--court", required=True)
    p.add_argument("--site", action="append", default=[], help="allowed site (repeat)")
    p.add_argument("--offence", action="append", default=[], help="offence category (repeat)")
    p.add_argument("--not-before", type=_when, required=True, help="window start (ISO 8601)")
    p.add_argument("--not-after", type=_when, required=True, help="window end (ISO 8601)")
    p.add_argument(
        "--named-dni", action="append", default=[], help="DNI the order names (repeat; - stdin)"
    )
    _opts(p, "court order id (default: --id)")
    p.set_defaults(func=_auth_add)
    p = auth.add_parser("revoke", help="revoke an authorisation")
    p.add_argument("authorisation_id", metavar="AUTHORISATION_ID")
    _opts(p, "revoking order id (required)")
    p.set_defaults(func=_auth_revoke)
    p = auth.add_parser("list", help="list authorisations")
    p.add_argument("--include-revoked", action="store_true")
    _list_opts(p)
    p.set_defaults(func=_auth_list)

    site = _group(sub, "site", "cameras and porticos of municipalities (R5)")
    p = site.add_parser("add", help="register a site to a municipality")
    p.add_argument("--id", required=True, help="site id, e.g. mira-portico-07")
    p.add_argument("--municipality", required=True, help="org id, e.g. muni-miraflores")
    p.add_argument("--region", required=True, help="PNP region, e.g. lima")
    p.add_argument("--kind", choices=sorted(SITE_KINDS), required=True)
    p.add_argument("--description", default="", help="e.g. Av. Larco / Benavides")
    _opts(p, "resolution id (required)")
    p.set_defaults(func=_site_add)
    p = site.add_parser("deactivate", help="deactivate a site: its probes are refused")
    p.add_argument("site_id", metavar="SITE_ID")
    _opts(p, "resolution id (required)")
    p.set_defaults(func=_site_deactivate)
    p = site.add_parser("list", help="list sites")
    p.add_argument("--municipality", default="", help="only this municipality's sites")
    _list_opts(p)
    p.set_defaults(func=_site_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``centinela admin``; return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse: --help is 0, a usage error 2
        return int(exc.code or 0)
    what = f"{PROG} {args.action} {args.verb}".rstrip()
    if getattr(args, "page_size", 50) not in range(1, 501):
        err = InvalidArgument("must lie in 1..500", field="--page-size")
        return cc.print_error(what, err, as_json=args.json)
    try:
        result: int = args.func(args)
        return result
    except CentinelaError as err:
        return cc.print_error(what, err, as_json=getattr(args, "json", False))
    except KeyboardInterrupt:
        return cc.EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
