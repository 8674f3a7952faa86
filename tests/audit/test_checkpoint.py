"""C2SP signed notes and tlog checkpoints, against the golang.org/x/mod sumdb/note vector."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from centinela.audit.checkpoint import (
    Checkpoint,
    Signer,
    Verifier,
    key_id,
    open_checkpoint,
    open_note,
    sign_checkpoint,
)
from centinela.errors import NoteFormatError, SignatureError

# Published example of golang.org/x/mod/sumdb/note (note.go documentation and note_test.go).
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT
    + "\n\u2014 PeterNeumann "
    + "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNX"
    + "gKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
ROOT = hashlib.sha256(b"root").digest()


def _go_private_key() -> Ed25519PrivateKey:
    raw = base64.b64decode(GO_SKEY.split("+", 4)[4])
    assert raw[0] == 1
    return Ed25519PrivateKey.from_private_bytes(raw[1:])


def test_go_reference_note_signs_and_verifies_byte_for_byte() -> None:
    signer = Signer("PeterNeumann", _go_private_key())
    assert signer.verifier_key() == GO_VKEY
    assert signer.sign(GO_TEXT) == GO_NOTE
    text, keys = open_note(GO_NOTE, [Verifier(GO_VKEY)])
    assert text == GO_TEXT
    assert keys[0].name == "PeterNeumann"
    with pytest.raises(SignatureError):
        open_note(GO_NOTE.replace("cryptography", "cryptographY"), [Verifier(GO_VKEY)])


def test_key_id_follows_the_spec() -> None:
    pub = Verifier(GO_VKEY).public_key
    assert key_id("PeterNeumann", pub).hex() == "c74f20a3"
    assert key_id("PeterNeumann", pub) == hashlib.sha256(b"PeterNeumann\n\x01" + pub).digest()[:4]


@pytest.mark.parametrize(
    "vkey",
    [
        "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # wrong id
        "PeterNeumann+c74f20a3+AhpjZ2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # wrong type
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+c74f20a3",
        "PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ],
)
def test_malformed_verifier_keys_are_refused(vkey: str) -> None:
    with pytest.raises(NoteFormatError):
        Verifier(vkey)


def test_checkpoint_round_trip_and_origin_pinning() -> None:
    signer = Signer("example.org/log", Ed25519PrivateKey.generate())
    cp = Checkpoint("example.org/log", 42, ROOT, ("ext line",))
    signed = sign_checkpoint(signer, cp)
    assert signed.note.startswith(
        f"example.org/log\n42\n{base64.b64encode(ROOT).decode()}\next line\n\n"
        "\u2014 example.org/log "
    )
    got = open_checkpoint(signed.note, [Verifier(signer.verifier_key())], origin="example.org/log")
    assert got.checkpoint == cp
    with pytest.raises(SignatureError, match="origin"):
        open_checkpoint(signed.note, [Verifier(signer.verifier_key())], origin="other.org/log")


@pytest.mark.parametrize(
    "body",
    [
        "o\n042\n{root}\n",
        "o\n-1\n{root}\n",
        "o\n+1\n{root}\n",
        "o\n1\n{root}",
        "o\n1\n\n",
        "o\n1\n{root}\n\n",
        "\n1\n{root}\n",
        "o\n1 \n{root}\n",
        "o\n18446744073709551616\n{root}\n",
        "o\n1\nAAAA\n",
    ],
)
def test_checkpoint_bodies_are_parsed_strictly(body: str) -> None:
    with pytest.raises(NoteFormatError):
        Checkpoint.parse(body.format(root=base64.b64encode(ROOT).decode()))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda n: n.replace("\n\n", "\n"),  # no blank line
        lambda n: n[:-1],  # no final newline
        lambda n: n.replace("\u2014 ", "- "),  # not an em dash
        lambda n: n.replace("\u2014 ", "\u2014  "),
        lambda n: n + "junk\n",
        lambda n: n.replace("\n42", "\r\n42"),  # control character
        lambda n: n.rsplit(" ", 1)[0] + " !!notbase64!!\n",
    ],
)
def test_malformed_notes_are_refused(mutate: object) -> None:
    signer = Signer("o.org/log", Ed25519PrivateKey.generate())
    note = sign_checkpoint(signer, Checkpoint("o.org/log", 42, ROOT)).note
    bad = mutate(note)  # type: ignore[operator]
    with pytest.raises((NoteFormatError, SignatureError)):
        open_checkpoint(bad, [Verifier(signer.verifier_key())], origin="o.org/log")
