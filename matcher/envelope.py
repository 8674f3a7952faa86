"""AES-256-GCM envelope encryption of templates, DNIs and plates, bound to where they belong.

Invariants (DESIGN.md §4; NIST SP 800-38D for GCM):

* Every ciphertext is AES-256-GCM under a 256-bit data key, with a fresh random 96-bit nonce
  per encryption (at most 2³² encryptions per key keeps the nonce-collision risk below 2⁻³²;
  rotation of data keys is how an owner stays below that).
* The associated data binds the ciphertext to its record: kind, record id, subject, gallery,
  model and data-key id, each length-prefixed so no two different bindings encode alike. A
  ciphertext copied into another row, gallery or model, or relabelled with another key id,
  fails authentication and raises :class:`~centinela.errors.DecryptionError`.
* Error messages never contain plaintext, keys or the bound identifiers' values.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from centinela.errors import DecryptionError, KeyManagementError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_DOMAIN = b"centinela/matcher/envelope/v1"


@dataclasses.dataclass(frozen=True)
class Binding:
    """What a ciphertext belongs to; encoded as the GCM associated data."""

    kind: str
    record_id: str
    subject_ref: str
    gallery: str
    model_id: str
    key_id: str

    def encode(self) -> bytes:
        """Canonical, injective encoding: a domain tag then length-prefixed UTF-8 fields."""
        parts = [_DOMAIN]
        fields = (self.kind, self.record_id, self.subject_ref, self.gallery, self.model_id)
        for field in (*fields, self.key_id):
            raw = field.encode()
            parts.append(struct.pack(">I", len(raw)))
            parts.append(raw)
        return b"".join(parts)


def _prefixed(field: str) -> bytes:
    raw = field.encode()
    return struct.pack(">I", len(raw)) + raw


def encode_bindings(
    kind: str,
    record_ids: Sequence[str],
    subject_refs: Sequence[str],
    gallery: str,
    model_id: str,
    key_id: str,
) -> list[bytes]:
    """``Binding(kind, record_ids[i], subject_refs[i], gallery, model_id, key_id).encode()``
    for every ``i``, without building a :class:`Binding` per record (bulk writes and reads)."""
    head = _DOMAIN + _prefixed(kind)
    tail = _prefixed(gallery) + _prefixed(model_id) + _prefixed(key_id)
    out = []
    for r, s in zip(record_ids, subject_refs, strict=True):
        rb, sb = r.encode(), s.encode()
        size_r, size_s = len(rb).to_bytes(4, "big"), len(sb).to_bytes(4, "big")
        out.append(b"".join((head, size_r, rb, size_s, sb, tail)))
    return out


def new_key() -> bytes:
    """A fresh random 256-bit key."""
    return AESGCM.generate_key(bit_length=256)


def _cipher(key: bytes) -> AESGCM:
    if len(key) != KEY_BYTES:
        raise KeyManagementError("data key has the wrong length")
    return AESGCM(key)


def seal(key: bytes, plaintext: bytes, binding: Binding) -> tuple[bytes, bytes]:
    """Encrypt ``plaintext`` bound to ``binding``; return ``(nonce, ciphertext_with_tag)``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, _cipher(key).encrypt(nonce, plaintext, binding.encode())


def open_sealed(key: bytes, nonce: bytes, ciphertext: bytes, binding: Binding) -> bytes:
    """Decrypt and authenticate a ciphertext made by :func:`seal` for the same binding.

    Raises:
        DecryptionError: wrong key, another record's binding, or any altered byte.
    """
    if len(nonce) != NONCE_BYTES or len(ciphertext) < TAG_BYTES:
        raise DecryptionError("ciphertext is malformed")
    try:
        return _cipher(key).decrypt(nonce, ciphertext, binding.encode())
    except InvalidTag:
        raise DecryptionError(
            f"{binding.kind} ciphertext failed authentication (wrong key, wrong row or tampered)"
        ) from None


class Sealer:
    """A data key kept in memory with its id: seals and opens records bound to that id."""

    def __init__(self, key_id: str, key: bytes) -> None:
        self.key_id = key_id
        self._aead = _cipher(key)

    def seal(self, plaintext: bytes, binding: Binding) -> tuple[bytes, bytes]:
        """As :func:`seal`; ``binding.key_id`` must be this key's id."""
        if binding.key_id != self.key_id:
            raise KeyManagementError("binding names another data key")
        nonce = os.urandom(NONCE_BYTES)
        return nonce, self._aead.encrypt(nonce, plaintext, binding.encode())

    def seal_many(
        self, plaintexts: Sequence[bytes | memoryview], aads: Sequence[bytes]
    ) -> list[tuple[bytes, bytes]]:
        """Seal each plaintext with its associated data (from :func:`encode_bindings` with
        this key's id); one call to the random source for all the nonces."""
        count = len(plaintexts)
        if len(aads) != count:
            raise ValueError("one associated data per plaintext")
        pool = os.urandom(NONCE_BYTES * count)
        encrypt = self._aead.encrypt
        out = []
        for i in range(count):
            nonce = pool[i * NONCE_BYTES : (i + 1) * NONCE_BYTES]
            out.append((nonce, encrypt(nonce, plaintexts[i], aads[i])))
        return out

    def open_aad(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """As :meth:`open`, with the associated data already encoded (bulk reads).

        Raises:
            DecryptionError: the ciphertext does not authenticate under this data.
        """
        if len(nonce) != NONCE_BYTES or len(ciphertext) < TAG_BYTES:
            raise DecryptionError("ciphertext is malformed")
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise DecryptionError(
                "ciphertext failed authentication (wrong key, wrong row or tampered)"
            ) from None

    def open(self, nonce: bytes, ciphertext: bytes, binding: Binding) -> bytes:
        """As :func:`open_sealed` with this key.

        Raises:
            DecryptionError: the ciphertext does not authenticate under this binding.
        """
        if len(nonce) != NONCE_BYTES or len(ciphertext) < TAG_BYTES:
            raise DecryptionError("ciphertext is malformed")
        try:
            return self._aead.decrypt(nonce, ciphertext, binding.encode())
        except InvalidTag:
            raise DecryptionError(
                f"{binding.kind} ciphertext failed authentication "
                "(wrong key, wrong row or tampered)"
            ) from None
