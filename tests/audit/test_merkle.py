"""RFC 9162 Merkle tree against the transparency-dev known-answer vectors and properties."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from centinela.audit import merkle
from centinela.errors import ProofError, RootMismatchError, VerificationError

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "merkle" / "testdata"

# The RFC 6962 reference leaves (PROVENANCE.md) and their published roots.
REF_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
REF_HASHES = [merkle.leaf_hash(x) for x in REF_LEAVES]


def _vector_files(kind: str) -> list[Path]:
    folder = VECTORS / kind
    if not folder.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"Merkle vectors missing at {folder} (required in CI)")
        pytest.skip(f"Merkle vectors not found at {folder}")
    files = sorted(folder.rglob("*.json"))
    assert files, f"no vectors under {folder}"
    return files


def _b64(value: Any) -> bytes:
    return base64.b64decode(value) if value else b""


def _proof(value: Any) -> list[bytes]:
    return [_b64(p) for p in value or []]


def _ids(files: list[Path]) -> list[str]:
    return [str(f.relative_to(VECTORS)) for f in files]


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_every_vector_file_is_exercised() -> None:
    inc = _vector_files("inclusion")
    con = _vector_files("consistency")
    assert len(inc) > 50
    assert len(con) > 50
    assert any(_load(f)["wantErr"] for f in inc)
    assert any(not _load(f)["wantErr"] for f in con)


def test_inclusion_vectors() -> None:
    failures = []
    for path in _vector_files("inclusion"):
        v = _load(path)
        args = (v["leafIdx"], v["treeSize"], _b64(v["leafHash"]), _proof(v["proof"]))
        try:
            merkle.verify_inclusion(*args, _b64(v["root"]))
            accepted = True
        except VerificationError:
            accepted = False
        if accepted == v["wantErr"]:
            failures.append(path.relative_to(VECTORS))
        if not v["wantErr"] and v["treeSize"] <= len(REF_HASHES):
            # Our generator produces exactly the published proof.
            assert merkle.inclusion_proof(v["leafIdx"], v["treeSize"], REF_HASHES) == _proof(
                v["proof"]
            ), path
    assert failures == []


def test_consistency_vectors() -> None:
    failures = []
    for path in _vector_files("consistency"):
        v = _load(path)
        try:
            merkle.verify_consistency(
                v["size1"], v["size2"], _b64(v["root1"]), _b64(v["root2"]), _proof(v["proof"])
            )
            accepted = True
        except VerificationError:
            accepted = False
        if accepted == v["wantErr"]:
            failures.append(path.relative_to(VECTORS))
        if not v["wantErr"] and v["size1"] > 0 and v["size2"] <= len(REF_HASHES):
            assert merkle.consistency_proof(v["size1"], v["size2"], REF_HASHES) == _proof(
                v["proof"]
            ), path
    assert failures == []


def test_roots_of_reference_leaves_match_vectors() -> None:
    roots: dict[int, bytes] = {}
    for path in _vector_files("consistency"):
        v = _load(path)
        if v["desc"] == "happy path":
            roots[v["size1"]] = _b64(v["root1"])
            roots[v["size2"]] = _b64(v["root2"])
    assert roots
    for size, want in roots.items():
        assert merkle.root(REF_HASHES[:size]) == want, size


def test_empty_tree_root_and_leaf_domain_separation() -> None:
    assert merkle.root([]) == hashlib.sha256(b"").digest()
    assert merkle.leaf_hash(b"ab") == hashlib.sha256(b"\x00ab").digest()
    assert (
        merkle.node_hash(b"a" * 32, b"b" * 32)
        == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    )


def test_bulk_load_equals_incremental() -> None:
    hashes = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(1000)]
    inc = merkle.MerkleTree(hashes)
    bulk = merkle.MerkleTree.from_packed(b"".join(hashes))
    for size in (0, 1, 2, 3, 511, 512, 513, 999, 1000):
        assert inc.root(size) == bulk.root(size)
    bulk.append(merkle.leaf_hash(b"x"))
    inc.append(merkle.leaf_hash(b"x"))
    assert inc.root() == bulk.root()
    assert bulk.compact_range(1001)
    assert merkle.fold_compact_range(bulk.compact_range(1001)) == bulk.root()


def test_malformed_inputs_are_proof_errors() -> None:
    h = REF_HASHES[0]
    with pytest.raises(ProofError):
        merkle.verify_inclusion(5, 5, h, [], h)
    with pytest.raises(ProofError):
        merkle.verify_inclusion(0, 2, h, [b"short"], h)
    with pytest.raises(ProofError):
        merkle.verify_consistency(3, 2, h, h, [])
    with pytest.raises(RootMismatchError):
        merkle.verify_consistency(2, 2, h, REF_HASHES[1], [])


# --- properties ---------------------------------------------------------------------------

_leaves = st.lists(st.binary(max_size=16), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(_leaves)
def test_every_leaf_proves_inclusion_at_every_size(leaves: list[bytes]) -> None:
    hashes = [merkle.leaf_hash(x) for x in leaves]
    tree = merkle.MerkleTree(hashes)
    for size in range(1, len(hashes) + 1):
        root = tree.root(size)
        assert root == merkle.root(hashes[:size])
        for index in range(size):
            merkle.verify_inclusion(
                index, size, hashes[index], tree.inclusion_proof(index, size), root
            )


@settings(max_examples=60, deadline=None)
@given(_leaves)
def test_every_smaller_size_is_consistent(leaves: list[bytes]) -> None:
    tree = merkle.MerkleTree(merkle.leaf_hash(x) for x in leaves)
    n = tree.size
    for m in range(1, n + 1):
        merkle.verify_consistency(m, n, tree.root(m), tree.root(n), tree.consistency_proof(m, n))


@settings(max_examples=80, deadline=None)
@given(_leaves, st.data())
def test_one_bit_flip_is_rejected(leaves: list[bytes], data: st.DataObject) -> None:
    hashes = [merkle.leaf_hash(x) for x in leaves]
    tree = merkle.MerkleTree(hashes)
    n = tree.size
    m = data.draw(st.integers(1, n))
    index = data.draw(st.integers(0, n - 1))
    inc = tree.inclusion_proof(index, n)
    con = tree.consistency_proof(m, n)
    root_n, root_m = tree.root(n), tree.root(m)
    bit = data.draw(st.integers(0, 255))

    def flip(b: bytes) -> bytes:
        arr = bytearray(b)
        arr[bit // 8] ^= 1 << (bit % 8)
        return bytes(arr)

    with pytest.raises(VerificationError):
        merkle.verify_inclusion(index, n, hashes[index], inc, flip(root_n))
    with pytest.raises(VerificationError):
        merkle.verify_inclusion(index, n, flip(hashes[index]), inc, root_n)
    if inc:
        k = data.draw(st.integers(0, len(inc) - 1))
        with pytest.raises(VerificationError):
            merkle.verify_inclusion(
                index, n, hashes[index], [*inc[:k], flip(inc[k]), *inc[k + 1 :]], root_n
            )
    if m < n:
        with pytest.raises(VerificationError):
            merkle.verify_consistency(m, n, flip(root_m), root_n, con)
        with pytest.raises(VerificationError):
            merkle.verify_consistency(m, n, root_m, flip(root_n), con)
        k = data.draw(st.integers(0, len(con) - 1))
        with pytest.raises(VerificationError):
            merkle.verify_consistency(m, n, root_m, root_n, [*con[:k], flip(con[k]), *con[k + 1 :]])
