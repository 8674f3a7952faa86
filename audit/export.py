"""Export of the audit log for offline verification by someone who does not trust the server.

Invariants:

* ``entries.jsonl`` holds, one per line and in index order from ``from``, exactly the bytes that
  were hashed as leaves (canonical JSON never contains a raw newline, so a line is an entry).
* ``checkpoint`` is the signed note verbatim and ``log.pub`` the log's verifier key
  (``<name>+<hex key id>+<base64(0x01 || key)>``); the verifier never trusts ``log.pub``, it
  checks against the key it was given.
* When the range does not start at 0 or does not end at the checkpoint's size, ``range.json``
  carries what is needed to tie it to the signed root: the compact range of ``[0, from)``
  (the perfect-subtree hashes left of the range, i.e. the inclusion material of its first leaf)
  and the RFC 9162 consistency proof from size ``to`` to the checkpoint size; plus, on request,
  consistency proofs from earlier trusted sizes (``--since``).
* ``leaf-hashes.bin`` (32 bytes a leaf, as stored) is an unauthenticated hint: the verifier
  only uses it, after a root mismatch, to name the first altered entry.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

from centinela.audit.checkpoint import SignedCheckpoint
from centinela.audit.layout import CHECKPOINT, ENTRIES, EXPORT_FORMAT, LEAF_HINTS, PUBKEY, RANGE
from centinela.audit.log import AuditLog
from centinela.errors import AppendOnlyViolation, InvalidArgument


@dataclasses.dataclass(frozen=True, slots=True)
class ExportSummary:
    """What an export wrote."""

    out_dir: Path
    start: int
    end: int
    tree_size: int
    root_hash: str


def _b64(items: Iterable[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in items]


def _fresh_checkpoint(log: AuditLog) -> SignedCheckpoint:
    try:
        return log.checkpoint()
    except AppendOnlyViolation:
        # A running server signed a larger checkpoint meanwhile: catch up and use the latest.
        log.load()
        cp = log.latest_checkpoint()
        if cp is None:
            raise
        return cp


def export_log(
    log: AuditLog,
    out_dir: Path,
    *,
    start: int = 0,
    end: int | None = None,
    since: Iterable[int] = (),
    new_checkpoint: bool = True,
) -> ExportSummary:
    """Write an export of entries ``[start, end)`` under the latest (or a fresh) checkpoint.

    Raises:
        InvalidArgument: bad range, no checkpoint, or ``out_dir`` exists and is not empty.
        StorageError, VerificationError: the store failed or is inconsistent.
        OSError: the directory could not be written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InvalidArgument("the output directory is not empty", field="out")
    cp = _fresh_checkpoint(log) if new_checkpoint else log.latest_checkpoint()
    if cp is None:
        raise InvalidArgument("the log has no signed checkpoint yet", field="checkpoint")
    n = cp.size
    end = n if end is None else end
    if not 0 <= start <= end <= n:
        raise InvalidArgument(f"the range must satisfy 0 <= from <= to <= {n}", field="range")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ENTRIES, "wb") as f:
        for entry in log.store.iter_entries(start, end):
            f.write(entry)
            f.write(b"\n")
    (out_dir / CHECKPOINT).write_text(cp.note, encoding="utf-8", newline="")
    (out_dir / PUBKEY).write_text(log.verifier_key() + "\n", encoding="utf-8")
    (out_dir / LEAF_HINTS).write_bytes(log.packed_leaf_hashes(start, end))
    if start > 0 or end < n:
        material = {
            "format": EXPORT_FORMAT,
            "from": start,
            "to": end,
            "tree_size": n,
            "prefix": _b64(log.compact_range(start)),
            "consistency": _b64(log.consistency_proof(end, n)) if 0 < end < n else [],
            "since": {
                str(t): _b64(log.consistency_proof(t, n)) for t in sorted(set(since)) if 0 < t < n
            },
        }
        (out_dir / RANGE).write_text(json.dumps(material, indent=1) + "\n", encoding="utf-8")
    return ExportSummary(out_dir, start, end, n, cp.root_hash.hex())
