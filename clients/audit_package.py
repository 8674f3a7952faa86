"""Audit export directories and evidence packages written from AuditService answers.

Invariants (docs/audit.md "export directory"; RFC 9162 §2.1.3; c2sp.org/tlog-checkpoint):

* The directory format is exactly the offline exporter's (``centinela.audit.layout``):
  ``entries.jsonl`` holds the entry bytes as received, one per line, in index order;
  ``checkpoint`` the signed note verbatim; ``log.pub`` the verifier key; ``leaf-hashes.bin`` the
  leaf hashes the server sent (an unauthenticated hint); ``range.json`` the material tying a
  partial range to the signed root. So ``centinela audit verify`` checks an online export or an
  evidence package offline, with nothing from the server but these files.
* The Merkle material of a partial range is derived, not trusted: the compact range of
  ``[0, from)`` is read off the left siblings of an inclusion proof of leaf ``from`` (in an
  RFC 9162 path the left siblings are exactly the perfect subtrees left of the leaf); if the
  server lied, the offline verifier's recomputed root does not match the signed one.
* Nothing is written into a non-empty directory. Entry contents are never printed.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from centinela.audit.layout import CHECKPOINT, ENTRIES, EXPORT_FORMAT, LEAF_HINTS, PUBKEY, RANGE
from centinela.errors import InvalidArgument

#: Extra files of an evidence package (beside the export layout).
INCLUSION = "inclusion-proof.json"
EVIDENCE = "evidence.json"
EVIDENCE_FORMAT = "centinela-evidence/1"


def _b64(items: Iterable[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in items]


def _split(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


def left_siblings(index: int, size: int, proof: Sequence[bytes]) -> list[bytes]:
    """The compact range of ``[0, index)`` (largest subtree first) out of an RFC 9162 inclusion
    proof of leaf ``index`` in the tree of ``size``.

    Raises:
        InvalidArgument: the proof has the wrong length for (index, size).
    """
    lefts: list[bool] = []
    start, end = 0, size
    while end - start > 1:
        mid = start + _split(end - start)
        if index < mid:
            lefts.append(False)
            end = mid
        else:
            lefts.append(True)
            start = mid
    if len(lefts) != len(proof):
        raise InvalidArgument("the inclusion proof has the wrong length", field="proof")
    top_down = list(reversed(proof))
    return [h for h, is_left in zip(top_down, lefts, strict=True) if is_left]


def ensure_empty(out_dir: Path) -> None:
    """Create ``out_dir``; refuse one that exists and is not empty.

    Raises:
        InvalidArgument: the directory is not empty.
    """
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InvalidArgument("the output directory is not empty", field="--out")
    out_dir.mkdir(parents=True, exist_ok=True)


@dataclasses.dataclass
class ExportWriter:
    """Writes an export directory as entries arrive; :meth:`finish` writes the rest."""

    out_dir: Path
    start: int

    def __post_init__(self) -> None:
        ensure_empty(self.out_dir)
        self._entries = open(self.out_dir / ENTRIES, "wb")  # noqa: SIM115 (closed in finish)
        self._hints = bytearray()
        self.next_index = self.start

    def add(self, index: int, entry: bytes, leaf_hash: bytes) -> None:
        """Append one entry (indexes must be consecutive).

        Raises:
            InvalidArgument: an entry is out of order or holds a newline.
        """
        if index != self.next_index:
            raise InvalidArgument(
                f"the server sent entry {index} where {self.next_index} was due", field="stream"
            )
        if b"\n" in entry:
            raise InvalidArgument(f"entry {index} holds a newline", field="stream")
        self._entries.write(entry + b"\n")
        self._hints += leaf_hash
        self.next_index += 1

    def finish(
        self,
        signed_note: str,
        verifier_key: str,
        tree_size: int,
        *,
        prefix: Sequence[bytes] = (),
        consistency: Sequence[bytes] = (),
        since: Mapping[int, Sequence[bytes]] | None = None,
    ) -> None:
        """Write the checkpoint, the key, the hints and (for a partial range) range.json."""
        self._entries.close()
        (self.out_dir / CHECKPOINT).write_text(signed_note, encoding="utf-8", newline="")
        (self.out_dir / PUBKEY).write_text(verifier_key + "\n", encoding="utf-8")
        (self.out_dir / LEAF_HINTS).write_bytes(bytes(self._hints))
        end = self.next_index
        if self.start > 0 or end < tree_size:
            material = {
                "format": EXPORT_FORMAT,
                "from": self.start,
                "to": end,
                "tree_size": tree_size,
                "prefix": _b64(prefix),
                "consistency": _b64(consistency),
                "since": {str(t): _b64(p) for t, p in sorted((since or {}).items())},
            }
            (self.out_dir / RANGE).write_text(json.dumps(material, indent=1) + "\n", "utf-8")

    def abort(self) -> None:
        """Close the entries file after a failure (the directory stays for inspection)."""
        self._entries.close()


def write_inclusion(
    out_dir: Path, index: int, tree_size: int, leaf_hash: bytes, proof: Sequence[bytes]
) -> None:
    """``inclusion-proof.json``: the RFC 9162 inclusion proof, for any other verifier."""
    doc = {
        "index": index,
        "tree_size": tree_size,
        "leaf_hash": base64.b64encode(leaf_hash).decode(),
        "hashes": _b64(proof),
        "hash": "SHA-256; leaf = SHA-256(0x00 || line of entries.jsonl); RFC 9162 §2.1.3.2",
    }
    (out_dir / INCLUSION).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def write_evidence_note(out_dir: Path, decision_id: str, index: int, reference: str) -> None:
    """``evidence.json``: what the package is about (ids only) and how to check it."""
    doc = {
        "format": EVIDENCE_FORMAT,
        "decision_id": decision_id,
        "index": index,
        "reference": reference,
        "verify": "centinela audit verify DIR --trusted-key <the log's key obtained out of band>",
    }
    (out_dir / EVIDENCE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
