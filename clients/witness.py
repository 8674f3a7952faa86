"""A witness of the audit log: keeps the last checkpoint it saw and refuses any other history.

Invariants (RFC 9162 §2.1.4; c2sp.org/tlog-checkpoint; c2sp.org/tlog-witness, in spirit):

* Trust comes from a pinned verifier key: ``--trusted-key``, else the key recorded in the state
  file at first use (trust on first use, said out loud). A checkpoint not validly signed by it
  for the pinned origin is refused.
* A newer checkpoint is accepted only with an RFC 9162 consistency proof from the kept size,
  checked here against the *kept* root and the *signed* new root (the roots the server sends
  beside the proof are ignored). A smaller size is a rollback; the same size with another
  root, or a failed proof, is a fork. None of these updates the state.
* The state is written atomically (temp file, fsync, rename) and only after success, in the
  offline verifier's state format, so ``centinela audit verify --state`` can share it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from centinela.audit.checkpoint import SignedCheckpoint, Verifier, open_checkpoint
from centinela.audit.merkle import verify_consistency
from centinela.audit.verify import STATE_FORMAT
from centinela.clients.client import CentinelaClient
from centinela.errors import (
    ConfigError,
    InconsistentCheckpointError,
    NoteFormatError,
    RollbackError,
    VerificationError,
)
from centinela.v1 import audit_service_pb2 as apb


@dataclasses.dataclass(frozen=True)
class WitnessState:
    """The checkpoint a witness keeps."""

    origin: str
    size: int
    root: bytes
    note: str
    verifier_key: str


@dataclasses.dataclass(frozen=True)
class WitnessResult:
    """What one witness run saw: ``status`` is ``first``, ``same`` or ``extended``."""

    status: str
    previous_size: int | None
    size: int
    root_hash: str
    origin: str
    trust_on_first_use: bool = False


def read_state(path: Path) -> WitnessState | None:
    """The kept checkpoint, or None when the file does not exist.

    Raises:
        ConfigError: the file is unreadable or malformed.
    """
    if not path.exists():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        root = base64.b64decode(data["root"], validate=True)
        state = WitnessState(
            origin=str(data["origin"]),
            size=int(data["size"]),
            root=root,
            note=str(data.get("checkpoint", "")),
            verifier_key=str(data.get("verifier_key", "")),
        )
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ConfigError(f"cannot read witness state {path}: {exc.__class__.__name__}") from exc
    if len(state.root) != 32 or state.size < 0:
        raise ConfigError(f"witness state {path} is malformed")
    return state


def write_state(path: Path, cp: SignedCheckpoint, verifier_key: str) -> None:
    """Store ``cp`` as the kept checkpoint, atomically.

    Raises:
        ConfigError: the file cannot be written.
    """
    data = {
        "format": STATE_FORMAT,
        "origin": cp.origin,
        "size": cp.size,
        "root": base64.b64encode(cp.root_hash).decode(),
        "checkpoint": cp.note,
        "verifier_key": verifier_key,
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
        raise ConfigError(f"cannot write witness state {path}: {exc.strerror}") from exc


def _trusted(
    keys: list[Verifier] | None, state: WitnessState | None, served_key: str
) -> tuple[list[Verifier], bool]:
    if keys:
        return keys, False
    if state is not None and state.verifier_key:
        return [Verifier(state.verifier_key)], False
    return [Verifier(served_key)], True


def witness(
    client: CentinelaClient, state_path: Path, trusted_keys: list[Verifier] | None = None
) -> WitnessResult:
    """Fetch the latest checkpoint, check it against the kept one, keep it.

    Raises:
        SignatureError, NoteFormatError: the checkpoint is not signed by the trusted key.
        RollbackError: the log shows a smaller tree than the kept one.
        InconsistentCheckpointError: a fork or split view (another history).
        ConfigError: the state file is unreadable or unwritable.
        ClientError: the server could not be asked.
    """
    state = read_state(state_path)
    resp = client.get_checkpoint(apb.GetCheckpointRequest())
    try:
        keys, tofu = _trusted(trusted_keys, state, resp.verifier_key)
    except NoteFormatError as exc:
        raise NoteFormatError(f"the log's verifier key is malformed: {exc.message}") from exc
    origin = state.origin if state is not None else keys[0].name
    cp = open_checkpoint(resp.signed_note, keys, origin=origin)
    key_text = state.verifier_key if state is not None and state.verifier_key else ""
    if not key_text:
        key_text = resp.verifier_key if tofu else _key_text(keys[0])
    if state is None:
        write_state(state_path, cp, key_text)
        return WitnessResult("first", None, cp.size, cp.root_hash.hex(), cp.origin, tofu)
    if cp.size < state.size:
        raise RollbackError(
            f"rollback: the log's checkpoint has size {cp.size}, the witness kept size {state.size}"
        )
    if cp.size == state.size:
        if cp.root_hash != state.root:
            raise InconsistentCheckpointError(
                f"fork (split view): two signed checkpoints of size {cp.size} with different "
                f"roots (kept {state.root.hex()}, now {cp.root_hash.hex()})"
            )
        write_state(state_path, cp, key_text)
        return WitnessResult("same", state.size, cp.size, cp.root_hash.hex(), cp.origin)
    if state.size > 0:
        proof = client.get_consistency_proof(
            apb.GetConsistencyProofRequest(first_size=state.size, second_size=cp.size)
        )
        try:
            verify_consistency(state.size, cp.size, state.root, cp.root_hash, list(proof.hashes))
        except VerificationError as exc:
            raise InconsistentCheckpointError(
                f"fork: the signed tree of size {cp.size} does not extend the kept tree of "
                f"size {state.size} (root {state.root.hex()})"
            ) from exc
    write_state(state_path, cp, key_text)
    return WitnessResult("extended", state.size, cp.size, cp.root_hash.hex(), cp.origin)


def _key_text(v: Verifier) -> str:
    return f"{v.name}+{v.key_id.hex()}+" + base64.b64encode(b"\x01" + v.public_key).decode()
