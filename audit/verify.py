"""Offline verification of an audit export: the compliance officer's side, trusting no server.

Invariants (RFC 9162 §2.1; c2sp.org/signed-note; c2sp.org/tlog-checkpoint):

* Trust comes only from the verifier key the officer supplies (``--trusted-key``), never from
  ``log.pub`` in the export. The note is parsed strictly; unknown-key signatures are ignored;
  a note without a valid signature by a trusted key, or for another origin than the pinned one
  (by default the trusted key's name), is rejected.
* Every entry line is re-hashed (SHA-256(0x00 || line)) and the tree rebuilt; the resulting
  root (or, for a partial range, the root reached through the exported prefix and consistency
  proof) must equal the signed root. Entry counts must match the checkpoint exactly.
* With a state file, the last verified checkpoint is kept; a smaller checkpoint is a rollback,
  an equal size with another root is a split view, and a larger one must be consistent with it
  (recomputed from the entries or proved by an RFC 9162 consistency proof). The state is only
  updated after a fully successful verification, atomically.
* Reports name entry indexes and hashes, never entry contents.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from centinela.audit.checkpoint import SignedCheckpoint, Verifier, open_checkpoint
from centinela.audit.layout import CHECKPOINT, ENTRIES, LEAF_HINTS, RANGE
from centinela.audit.merkle import EMPTY_ROOT, fold_compact_range, verify_consistency
from centinela.errors import (
    InconsistentCheckpointError,
    NoteFormatError,
    ProofError,
    RollbackError,
    RootMismatchError,
    VerificationError,
)

STATE_FORMAT = "centinela-audit-state/1"


class UsageError(Exception):
    """The verifier was called wrongly or could not read its inputs (exit code 2)."""


@dataclasses.dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of a successful verification."""

    origin: str
    tree_size: int
    root_hash: str
    start: int
    end: int
    entries: int
    previous_size: int | None


def load_trusted_keys(path: Path) -> list[Verifier]:
    """Read verifier keys, one per line (blank lines and ``#`` comments skipped).

    Raises:
        UsageError: the file is unreadable, empty or holds a malformed key.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read trusted key file {path}: {exc.__class__.__name__}") from exc
    keys: list[Verifier] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.append(Verifier(line))
        except NoteFormatError as exc:
            raise UsageError(f"trusted key file {path}: {exc.message}") from exc
    if not keys:
        raise UsageError(f"trusted key file {path} holds no key")
    return keys


def _b64list(value: Any, what: str) -> list[bytes]:
    if not isinstance(value, list):
        raise ProofError(f"range.json: {what} is not a list")
    out = []
    for item in value:
        try:
            raw = base64.b64decode(str(item), validate=True)
        except (binascii.Error, ValueError):
            raise ProofError(f"range.json: {what} holds invalid base64") from None
        if len(raw) != 32:
            raise ProofError(f"range.json: {what} holds a hash that is not 32 bytes")
        out.append(raw)
    return out


@dataclasses.dataclass
class _Range:
    start: int
    end: int
    prefix: list[bytes]
    consistency: list[bytes]
    since: dict[int, list[bytes]]


def _read_range(export_dir: Path, tree_size: int) -> _Range:
    path = export_dir / RANGE
    if not path.exists():
        return _Range(0, tree_size, [], [], {})
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        start, end = int(data["from"]), int(data["to"])
        declared = int(data["tree_size"])
        prefix = _b64list(data.get("prefix", []), "prefix")
        consistency = _b64list(data.get("consistency", []), "consistency")
        since = {int(k): _b64list(v, f"since.{k}") for k, v in dict(data.get("since", {})).items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise ProofError(f"range.json is malformed: {exc.__class__.__name__}") from exc
    if declared != tree_size:
        raise ProofError(f"range.json is for tree size {declared}, checkpoint has {tree_size}")
    if not 0 <= start <= end <= tree_size:
        raise ProofError(f"range [{start}, {end}) does not fit tree size {tree_size}")
    if len(prefix) != start.bit_count():
        raise ProofError(f"prefix of a range starting at {start} must hold {start.bit_count()}")
    return _Range(start, end, prefix, consistency, since)


def _hash_entries(path: Path, rng: _Range, want_size: int | None) -> tuple[int, bytes, bytes, Any]:
    """Stream entries; return (count, root at rng.start+count, packed leaf hashes, root@state)."""
    sha = hashlib.sha256
    stack = list(rng.prefix)
    n = rng.start
    leaves = bytearray()
    state_root: bytes | None = None
    if want_size is not None and want_size == n:
        state_root = fold_compact_range(stack)
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            for line in f:
                if line[-1:] != b"\n":
                    raise VerificationError(
                        f"entry {n} is not terminated by a newline: the file was truncated"
                    )
                h = sha(b"\x00" + line[:-1]).digest()
                leaves += h
                stack.append(h)
                n += 1
                k = n
                while not k & 1:
                    right = stack.pop()
                    stack[-1] = sha(b"\x01" + stack[-1] + right).digest()
                    k >>= 1
                if n == want_size:
                    state_root = fold_compact_range(stack)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.__class__.__name__}") from exc
    return n - rng.start, fold_compact_range(stack), bytes(leaves), state_root


def _root_through(rng: _Range, tree_size: int, root_end: bytes, root_n: bytes) -> None:
    """Check that the range's root at ``rng.end`` leads to the signed root."""
    if rng.end == tree_size:
        if root_end != root_n:
            raise RootMismatchError(
                f"recomputed root of tree size {tree_size} differs from the signed root",
                expected=root_n.hex(),
                found=root_end.hex(),
            )
        return
    if rng.end == 0:
        return  # an empty prefix: nothing to tie beyond the checkpoint's signature
    verify_consistency(rng.end, tree_size, root_end, root_n, rng.consistency)


def _locate(export_dir: Path, rng: _Range, tree_size: int, root_n: bytes, leaves: bytes) -> str:
    """After a root mismatch, name the first entry whose hash differs from the signed tree's."""
    try:
        hints = (export_dir / LEAF_HINTS).read_bytes()
    except OSError:
        return ""
    if len(hints) != (rng.end - rng.start) * 32:
        return ""
    stack = list(rng.prefix)
    for i in range(0, len(hints), 32):
        stack.append(hints[i : i + 32])
        k = rng.start + i // 32 + 1
        while not k & 1:
            right = stack.pop()
            stack[-1] = hashlib.sha256(b"\x01" + stack[-1] + right).digest()
            k >>= 1
    try:
        _root_through(rng, tree_size, fold_compact_range(stack), root_n)
    except VerificationError:
        return ""  # the hints are not those of the signed tree either
    for i in range(0, min(len(hints), len(leaves)), 32):
        if hints[i : i + 32] != leaves[i : i + 32]:
            idx = rng.start + i // 32
            return (
                f"; first differing entry: index {idx} (its leaf hash is "
                f"{leaves[i : i + 32].hex()}, the signed tree holds {hints[i : i + 32].hex()})"
            )
    if len(leaves) < len(hints):
        return f"; entries missing from index {rng.start + len(leaves) // 32}"
    if len(leaves) > len(hints):
        return f"; extra entries from index {rng.start + len(hints) // 32}"
    return ""


def _read_state(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        state: dict[str, Any] = {
            "origin": str(data["origin"]),
            "size": int(data["size"]),
            "root": base64.b64decode(data["root"], validate=True),
        }
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise UsageError(f"cannot read state file {path}: {exc.__class__.__name__}") from exc
    if len(state["root"]) != 32 or state["size"] < 0:
        raise UsageError(f"state file {path} is malformed")
    return state


def _write_state(path: Path, cp: SignedCheckpoint) -> None:
    data = {
        "format": STATE_FORMAT,
        "origin": cp.origin,
        "size": cp.size,
        "root": base64.b64encode(cp.root_hash).decode(),
        "checkpoint": cp.note,
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"cannot write state file {path}: {exc.__class__.__name__}") from exc


def _check_state(state: dict[str, Any], cp: SignedCheckpoint, rng: _Range, root_t: Any) -> None:
    t, root_trusted = int(state["size"]), bytes(state["root"])
    if state["origin"] != cp.origin:
        raise InconsistentCheckpointError("the state file is for another log origin")
    if t > cp.size:
        raise RollbackError(
            f"rollback: checkpoint size {cp.size} is older than the trusted size {t}"
        )
    if t == cp.size:
        if root_trusted != cp.root_hash:
            raise InconsistentCheckpointError(
                f"split view: two signed checkpoints of size {t} with different roots "
                f"(trusted {root_trusted.hex()}, now {cp.root_hash.hex()})"
            )
        return
    if t == 0:
        if root_trusted != EMPTY_ROOT:
            raise InconsistentCheckpointError("the trusted empty tree has a wrong root")
        return
    if root_t is not None:
        if root_t != root_trusted:
            raise InconsistentCheckpointError(
                f"fork: the log's root at trusted size {t} is {root_t.hex()}, "
                f"the trusted checkpoint had {root_trusted.hex()}"
            )
        return
    proof = rng.since.get(t)
    if proof is None:
        raise UsageError(
            f"the export cannot be tied to the trusted size {t}: re-export with --from <= {t} "
            f"or --since {t}"
        )
    try:
        verify_consistency(t, cp.size, root_trusted, cp.root_hash, proof)
    except VerificationError as exc:
        raise InconsistentCheckpointError(
            f"fork: checkpoint size {cp.size} is not consistent with trusted size {t}"
        ) from exc


def verify_export(
    export_dir: Path,
    trusted: list[Verifier],
    *,
    origin: str | None = None,
    state_path: Path | None = None,
) -> VerifyReport:
    """Verify an export directory; update the state file on success.

    Raises:
        VerificationError: tampering or a failed check (the message says what and where).
        UsageError: unreadable inputs.
    """
    export_dir = Path(export_dir)
    pinned = origin or trusted[0].name
    try:
        note = (export_dir / CHECKPOINT).read_bytes()
    except OSError as exc:
        raise UsageError(
            f"cannot read {export_dir / CHECKPOINT}: {exc.__class__.__name__}"
        ) from exc
    cp = open_checkpoint(note, trusted, origin=pinned)
    rng = _read_range(export_dir, cp.size)
    state = _read_state(state_path) if state_path is not None else None
    want = int(state["size"]) if state is not None else None
    if want is not None and not rng.start <= want <= rng.end:
        want = None
    count, root_end, leaves, root_t = _hash_entries(export_dir / ENTRIES, rng, want)
    expected = rng.end - rng.start
    if count != expected:
        what = "missing" if count < expected else "extra"
        where = _locate(export_dir, rng, cp.size, cp.root_hash, leaves)
        if not where:
            where = f"; entries {what} from index {rng.start + min(count, expected)}"
        raise VerificationError(
            f"entries.jsonl holds {count} entries, the signed range [{rng.start}, {rng.end}) "
            f"needs {expected}{where}"
        )
    try:
        _root_through(rng, cp.size, root_end, cp.root_hash)
    except VerificationError as exc:
        where = _locate(export_dir, rng, cp.size, cp.root_hash, leaves)
        if isinstance(exc, RootMismatchError):
            raise RootMismatchError(
                f"recomputed root of tree size {cp.size} differs from the signed root{where}",
                expected=exc.expected,
                found=exc.found,
            ) from exc
        raise type(exc)(f"{exc.message}{where}") from exc
    previous = None
    if state is not None and state_path is not None:
        _check_state(state, cp, rng, root_t)
        previous = int(state["size"])
    if state_path is not None:
        _write_state(state_path, cp)
    return VerifyReport(cp.origin, cp.size, cp.root_hash.hex(), rng.start, rng.end, count, previous)
