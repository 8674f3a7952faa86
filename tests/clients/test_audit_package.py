"""The export writer's Merkle material, checked against the log's own tree (property tests)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from centinela.audit.checkpoint import Checkpoint, Signer, Verifier, sign_checkpoint
from centinela.audit.merkle import MerkleTree
from centinela.audit.verify import verify_export
from centinela.clients.audit_package import ExportWriter, left_siblings
from centinela.errors import InvalidArgument, VerificationError


def leaves(n: int) -> list[bytes]:
    return [hashlib.sha256(b"\x00" + b'{"i":%d}' % i).digest() for i in range(n)]


@given(
    st.integers(min_value=1, max_value=300).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, n - 1))
    )
)
def test_left_siblings_are_the_compact_range(case: tuple[int, int]) -> None:
    size, index = case
    tree = MerkleTree(leaves(size))
    proof = tree.inclusion_proof(index, size)
    assert left_siblings(index, size, proof) == tree.compact_range(index)


def test_a_proof_of_the_wrong_length_is_refused() -> None:
    tree = MerkleTree(leaves(9))
    with pytest.raises(InvalidArgument):
        left_siblings(3, 9, tree.inclusion_proof(3, 9)[:-1])


@pytest.mark.parametrize(("start", "end", "size"), [(0, 9, 9), (3, 7, 12), (8, 9, 9), (5, 6, 6)])
def test_writer_output_verifies_offline(tmp_path: Path, start: int, end: int, size: int) -> None:
    entries = [b'{"i":%d}' % i for i in range(size)]
    tree = MerkleTree(leaves(size))
    signer = Signer("test.local/log", Ed25519PrivateKey.generate())
    cp = sign_checkpoint(signer, Checkpoint("test.local/log", size, tree.root()))
    writer = ExportWriter(tmp_path / "x", start)
    for i in range(start, end):
        writer.add(i, entries[i], tree.leaf(i))
    prefix = left_siblings(start, size, tree.inclusion_proof(start, size)) if start else []
    consistency = tree.consistency_proof(end, size) if end < size else []
    writer.finish(cp.note, signer.verifier_key(), size, prefix=prefix, consistency=consistency)
    report = verify_export(tmp_path / "x", [Verifier(signer.verifier_key())])
    assert (report.start, report.end, report.tree_size) == (start, end, size)
    # The server lying about the prefix is caught offline.
    if prefix:
        writer2 = ExportWriter(tmp_path / "y", start)
        for i in range(start, end):
            writer2.add(i, entries[i], tree.leaf(i))
        bad = [hashlib.sha256(p).digest() for p in prefix]
        writer2.finish(cp.note, signer.verifier_key(), size, prefix=bad, consistency=consistency)
        with pytest.raises(VerificationError):
            verify_export(tmp_path / "y", [Verifier(signer.verifier_key())])


def test_writer_refuses_gaps(tmp_path: Path) -> None:
    writer = ExportWriter(tmp_path / "x", 0)
    writer.add(0, b"{}", b"\x00" * 32)
    with pytest.raises(InvalidArgument):
        writer.add(2, b"{}", b"\x00" * 32)
    writer.abort()
