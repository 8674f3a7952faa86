"""AES-256-GCM envelopes: round trip, bit flips, wrong key, a ciphertext moved to another row."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from centinela.errors import DecryptionError, KeyManagementError
from centinela.matcher import envelope
from centinela.matcher.envelope import Binding, Sealer

KEY = bytes(range(32))
BINDING = Binding("template", "tpl_1", "sub_1", "pnp_watchlist", "arcface", "dek-pnp-1")


@given(st.binary(max_size=4096))
@settings(max_examples=50)
def test_round_trip(plaintext: bytes) -> None:
    nonce, ct = envelope.seal(KEY, plaintext, BINDING)
    assert envelope.open_sealed(KEY, nonce, ct, BINDING) == plaintext


@given(st.binary(min_size=1, max_size=512), st.data())
@settings(max_examples=50)
def test_one_bit_flip_is_rejected(plaintext: bytes, data: st.DataObject) -> None:
    nonce, ct = envelope.seal(KEY, plaintext, BINDING)
    which = data.draw(st.sampled_from(["nonce", "ct"]))
    blob = bytearray(nonce if which == "nonce" else ct)
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    bad_nonce, bad_ct = (bytes(blob), ct) if which == "nonce" else (nonce, bytes(blob))
    with pytest.raises(DecryptionError):
        envelope.open_sealed(KEY, bad_nonce, bad_ct, BINDING)


def test_wrong_key_is_rejected() -> None:
    nonce, ct = envelope.seal(KEY, b"vector", BINDING)
    with pytest.raises(DecryptionError):
        envelope.open_sealed(envelope.new_key(), nonce, ct, BINDING)


@pytest.mark.parametrize(
    "field", ["kind", "record_id", "subject_ref", "gallery", "model_id", "key_id"]
)
def test_ciphertext_moved_to_another_binding_is_rejected(field: str) -> None:
    nonce, ct = envelope.seal(KEY, b"vector", BINDING)
    other = dataclasses.replace(BINDING, **{field: "other"})
    with pytest.raises(DecryptionError):
        envelope.open_sealed(KEY, nonce, ct, other)


def test_binding_encoding_is_injective() -> None:
    a = Binding("t", "ab", "c", "", "", "k")
    b = Binding("t", "a", "bc", "", "", "k")
    assert a.encode() != b.encode()


def test_error_message_carries_no_identifiers() -> None:
    nonce, ct = envelope.seal(KEY, b"12345678", BINDING)
    with pytest.raises(DecryptionError) as info:
        envelope.open_sealed(KEY, nonce, ct, dataclasses.replace(BINDING, subject_ref="sub_2"))
    text = str(info.value)
    assert "sub_" not in text
    assert "12345678" not in text
    assert "tpl_" not in text


def test_sealer_refuses_binding_of_another_key() -> None:
    s = Sealer("dek-pnp-1", KEY)
    nonce, ct = s.seal(b"x", BINDING)
    assert s.open(nonce, ct, BINDING) == b"x"
    with pytest.raises(KeyManagementError):
        s.seal(b"x", dataclasses.replace(BINDING, key_id="dek-pnp-2"))
    with pytest.raises(DecryptionError):
        s.open(nonce[:5], ct, BINDING)


def test_key_length_is_checked() -> None:
    with pytest.raises(KeyManagementError):
        envelope.seal(b"short", b"x", BINDING)
