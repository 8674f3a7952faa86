"""Signed checkpoints: C2SP tlog-checkpoint bodies inside C2SP signed notes, Ed25519.

Invariants (c2sp.org/signed-note, c2sp.org/tlog-checkpoint):

* A note is UTF-8 text without ASCII control characters other than newline, ending in a
  newline, then a blank line, then one or more lines ``— <name> <base64(key id || sig)>``.
  The text is everything up to and including the newline before the *last* blank line.
* Key names are non-empty and hold no Unicode space and no ``+``. The key id of an Ed25519 key
  is ``SHA-256(name || 0x0A || 0x01 || public key)[:4]``; a verifier key is written
  ``<name>+<8 hex key id>+<base64(0x01 || public key)>``.
* Verification ignores signatures whose (name, key id) pair is unknown, rejects the whole note
  when a known key's signature fails, and rejects a note with no valid known signature. At most
  100 signature lines are read.
* A checkpoint body is ``<origin>\\n<decimal size>\\n<base64 32-byte root>\\n`` plus optional
  non-empty extension lines. The size has no sign and no leading zeros; the origin is pinned
  by the verifier (a checkpoint of another log signed by the same key is refused).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from centinela.errors import NoteFormatError, SignatureError

ED25519_TYPE = b"\x01"
EM_DASH = "\u2014"
MAX_SIGNATURES = 100
MAX_NOTE_BYTES = 1 << 20
_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")
_HEX8 = re.compile(r"[0-9a-f]{8}")


def _check_name(name: str) -> None:
    if not name or "+" in name or any(c.isspace() for c in name):
        raise NoteFormatError("a key name must be non-empty, without spaces or '+'")


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise NoteFormatError(f"{what} is not valid base64") from None


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte key id of an Ed25519 key: SHA-256(name || 0x0A || 0x01 || key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + ED25519_TYPE + public_key).digest()[:4]


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tlog-checkpoint body: origin, tree size, root hash, extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        """The note text."""
        _check_origin(self.origin)
        if self.size < 0 or len(self.root_hash) != 32:
            raise NoteFormatError("a checkpoint needs a non-negative size and a 32-byte root")
        lines = [self.origin, str(self.size), base64.b64encode(self.root_hash).decode()]
        for ext in self.extensions:
            if not ext or "\n" in ext:
                raise NoteFormatError("extension lines are non-empty single lines")
            lines.append(ext)
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse a checkpoint body strictly.

        Raises:
            NoteFormatError: any deviation from the format.
        """
        if not text.endswith("\n"):
            raise NoteFormatError("checkpoint text must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise NoteFormatError("checkpoint needs origin, size and root lines")
        origin, size_s, root_s, *ext = lines
        _check_origin(origin)
        if not _SIZE.fullmatch(size_s) or int(size_s) >= 1 << 64:
            raise NoteFormatError("checkpoint size is not a canonical decimal")
        root_hash = _b64decode(root_s, "checkpoint root")
        if len(root_hash) != 32 or base64.b64encode(root_hash).decode() != root_s:
            raise NoteFormatError("checkpoint root is not a canonical 32-byte hash")
        if any(not e for e in ext):
            raise NoteFormatError("checkpoint extension lines must be non-empty")
        return cls(origin, int(size_s), root_hash, tuple(ext))


def _check_origin(origin: str) -> None:
    if not origin or "\n" in origin or origin != origin.strip():
        raise NoteFormatError("checkpoint origin must be a non-empty single line")


class Signer:
    """Signs note texts with an Ed25519 key under a key name (the log's origin)."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        _check_name(name)
        self.name = name
        self._key = private_key
        self.public_key = _raw_public(private_key.public_key())
        self.key_id = key_id(name, self.public_key)

    def verifier_key(self) -> str:
        """``<name>+<hex key id>+<base64(0x01 || public key)>``."""
        return (
            f"{self.name}+{self.key_id.hex()}+"
            + base64.b64encode(ED25519_TYPE + self.public_key).decode()
        )

    def sign(self, text: str) -> str:
        """The signed note: ``text``, a blank line, and this key's signature line."""
        _check_text(text)
        sig = self._key.sign(text.encode())
        line = f"{EM_DASH} {self.name} " + base64.b64encode(self.key_id + sig).decode()
        return text + "\n" + line + "\n"


class Verifier:
    """One trusted Ed25519 key, from a verifier-key string."""

    def __init__(self, vkey: str) -> None:
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3:
            raise NoteFormatError("a verifier key is <name>+<hex key id>+<base64 key>")
        name, hex_id, b64 = parts
        _check_name(name)
        if not _HEX8.fullmatch(hex_id):
            raise NoteFormatError("verifier key id must be 8 lowercase hex digits")
        raw = _b64decode(b64, "verifier key")
        if len(raw) != 33 or raw[:1] != ED25519_TYPE:
            raise NoteFormatError("verifier key must be an Ed25519 key (type 0x01, 32 bytes)")
        if key_id(name, raw[1:]) != bytes.fromhex(hex_id):
            raise NoteFormatError("verifier key id does not match the key")
        self.name = name
        self.key_id = bytes.fromhex(hex_id)
        self.public_key = raw[1:]
        self._key = Ed25519PublicKey.from_public_bytes(raw[1:])

    def verify(self, text: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``text``."""
        try:
            self._key.verify(signature, text)
        except InvalidSignature:
            return False
        return True


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteFormatError("note text must end with a newline")
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise NoteFormatError("note holds a control character")


@dataclasses.dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    """A checkpoint and its signed note, verbatim."""

    checkpoint: Checkpoint
    note: str

    @property
    def size(self) -> int:
        return self.checkpoint.size

    @property
    def root_hash(self) -> bytes:
        return self.checkpoint.root_hash

    @property
    def origin(self) -> str:
        return self.checkpoint.origin


def sign_checkpoint(signer: Signer, checkpoint: Checkpoint) -> SignedCheckpoint:
    """Sign a checkpoint body as a note."""
    return SignedCheckpoint(checkpoint, signer.sign(checkpoint.body()))


def open_note(note: bytes | str, verifiers: list[Verifier]) -> tuple[str, list[Verifier]]:
    """Parse a signed note strictly and check its signatures; return (text, keys that signed).

    Raises:
        NoteFormatError: the note is malformed.
        SignatureError: a known key's signature is invalid, or no known key signed it.
    """
    raw = note.encode() if isinstance(note, str) else note
    if len(raw) > MAX_NOTE_BYTES:
        raise NoteFormatError("note is too large")
    try:
        msg = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NoteFormatError("note is not UTF-8") from None
    if any(ord(c) < 0x20 and c != "\n" for c in msg):
        raise NoteFormatError("note holds a control character")
    if not msg.endswith("\n"):
        raise NoteFormatError("note must end with a newline")
    split = msg.rfind("\n\n")
    if split < 0:
        raise NoteFormatError("note has no blank line before its signatures")
    text, sig_block = msg[: split + 1], msg[split + 2 :]
    sig_lines = sig_block[:-1].split("\n")
    if len(sig_lines) > MAX_SIGNATURES:
        raise NoteFormatError("note has too many signatures")
    known = {(v.name, v.key_id): v for v in verifiers}
    good: list[Verifier] = []
    for line in sig_lines:
        if not line.startswith(EM_DASH + " "):
            raise NoteFormatError("malformed signature line")
        fields = line[2:].split(" ")
        if len(fields) != 2:
            raise NoteFormatError("malformed signature line")
        name, b64 = fields
        _check_name(name)
        blob = _b64decode(b64, "signature")
        if len(blob) < 5:
            raise NoteFormatError("signature too short")
        verifier = known.get((name, blob[:4]))
        if verifier is None:
            continue  # unknown key: ignored, as the spec requires
        if not verifier.verify(text.encode(), blob[4:]):
            raise SignatureError(f"invalid signature by known key {name}")
        if verifier not in good:
            good.append(verifier)
    if not good:
        raise SignatureError("no valid signature by a trusted key")
    return text, good


def open_checkpoint(
    note: bytes | str, verifiers: list[Verifier], *, origin: str
) -> SignedCheckpoint:
    """Verify a signed checkpoint note and parse its body, with the origin pinned.

    Raises:
        NoteFormatError, SignatureError: see :func:`open_note`; or the origin differs.
    """
    text, _ = open_note(note, verifiers)
    cp = Checkpoint.parse(text)
    if cp.origin != origin:
        raise SignatureError("checkpoint is for another log origin than the pinned one")
    raw = note if isinstance(note, str) else note.decode("utf-8")
    return SignedCheckpoint(cp, raw)
