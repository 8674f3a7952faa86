"""``centinela audit export`` (through the service) and ``centinela audit evidence``.

Both write the offline exporter's directory format (``centinela.clients.audit_package``) and
then verify what they wrote with the offline verifier before saying it is done, so a package
that leaves this tool is known to verify against the signed checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from centinela.audit.checkpoint import Verifier
from centinela.audit.merkle import verify_inclusion
from centinela.audit.verify import UsageError, verify_export
from centinela.clients import cli_common as cc
from centinela.clients.audit_package import (
    ExportWriter,
    ensure_empty,
    left_siblings,
    write_evidence_note,
    write_inclusion,
)
from centinela.clients.compliance_common import client, context, open_signed, trusted
from centinela.errors import InvalidArgument, VerificationError
from centinela.v1 import audit_service_pb2 as apb


def _self_check(out: Path, keys: list[Verifier]) -> str:
    try:
        report = verify_export(out, keys, origin=keys[0].name)
    except UsageError as exc:
        raise InvalidArgument(str(exc), field="--out") from None
    return (
        f"verified offline: {report.entries} entries [{report.start}, {report.end}) against "
        f"tree size {report.tree_size}, root {report.root_hash}"
    )


def export_command(args: argparse.Namespace) -> int:
    out: Path = args.out
    writer = ExportWriter(out, args.start)
    note = vkey = ""
    with client(args) as conn:
        try:
            for chunk in conn.export_entries(
                apb.ExportEntriesRequest(start=args.start, end=args.end or 0)
            ):
                for ev in chunk.events:
                    writer.add(ev.index, ev.entry, ev.leaf_hash)
                if chunk.signed_note:
                    note, vkey = chunk.signed_note, chunk.verifier_key
        except BaseException:
            writer.abort()
            raise
        if not note:
            writer.abort()
            raise VerificationError("the export stream ended without a signed checkpoint")
        keys, source = trusted(args, vkey)
        n = open_signed(note, keys).size
        end = writer.next_index
        prefix: list[bytes] = []
        if args.start > 0:
            inc = conn.get_inclusion_proof(
                apb.GetInclusionProofRequest(index=args.start, tree_size=n)
            )
            prefix = left_siblings(args.start, n, list(inc.hashes))
        consistency: list[bytes] = []
        if 0 < end < n:
            consistency = list(
                conn.get_consistency_proof(
                    apb.GetConsistencyProofRequest(first_size=end, second_size=n)
                ).hashes
            )
        since = {
            t: list(
                conn.get_consistency_proof(
                    apb.GetConsistencyProofRequest(first_size=t, second_size=n)
                ).hashes
            )
            for t in sorted(set(args.since))
            if 0 < t < n
        }
    writer.finish(note, vkey, n, prefix=prefix, consistency=consistency, since=since)
    check = _self_check(out, keys)
    if args.json:
        print(json.dumps({"out": str(out), "from": args.start, "to": end, "tree_size": n}))
    else:
        print(f"exported entries [{args.start}, {end}) of tree size {n} to {out}\n{check}")
        print(f"signature checked with {source}")
    return cc.EXIT_OK


def evidence_command(args: argparse.Namespace) -> int:
    out: Path = args.out
    ensure_empty(out)
    with client(args) as conn:
        ev = conn.create_evidence(
            apb.CreateEvidenceRequest(context=context(args.reference), decision_id=args.decision)
        )
        keys, source = trusted(args, ev.verifier_key)
        cp = open_signed(ev.signed_note, keys)
        i, n = int(ev.event.index), int(ev.tree_size)
        if cp.size != n:
            raise VerificationError("the evidence's tree size is not its checkpoint's")
        leaf = hashlib.sha256(b"\x00" + ev.event.entry).digest()
        verify_inclusion(i, n, leaf, list(ev.inclusion_proof), cp.root_hash)
        consistency: list[bytes] = []
        if i + 1 < n:
            consistency = list(
                conn.get_consistency_proof(
                    apb.GetConsistencyProofRequest(first_size=i + 1, second_size=n)
                ).hashes
            )
    writer = ExportWriter(out, i)
    writer.add(i, ev.event.entry, leaf)
    prefix = left_siblings(i, n, list(ev.inclusion_proof))
    writer.finish(ev.signed_note, ev.verifier_key, n, prefix=prefix, consistency=consistency)
    write_inclusion(out, i, n, leaf, list(ev.inclusion_proof))
    write_evidence_note(out, args.decision, i, args.reference)
    check = _self_check(out, keys)
    if args.json:
        print(json.dumps({"out": str(out), "index": i, "tree_size": n, "verified": True}))
    else:
        print(
            f"evidence for decision {args.decision} (audit entry {i}) written to {out}\n"
            f"inclusion proof verified against the checkpoint of size {n} "
            f"(root {cp.root_hash.hex()})\n{check}\nsignature checked with {source}\n"
            f"the package's creation is itself in the audit log (EVIDENCE_EXPORT)"
        )
    return cc.EXIT_OK
