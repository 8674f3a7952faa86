"""RFC 9162 Merkle tree: hashes, roots, inclusion and consistency proofs, and their checks.

Invariants (RFC 9162 §2.1):

* A leaf hash is SHA-256(0x00 || entry) and an interior node SHA-256(0x01 || left || right)
  (§2.1.1); the two prefixes keep leaves and nodes in separate domains. The empty tree's root is
  SHA-256 of the empty string.
* Proofs are generated as §2.1.3.1 (PATH) and §2.1.4.1 (SUBPROOF) define them and checked as
  §2.1.3.2 and §2.1.4.2 do, with the same bounds the transparency-dev/merkle verifier applies:
  a proof of the wrong length, an index at or beyond the size, a size1 larger than size2 or a
  non-empty proof between equal sizes is rejected before any hashing.
* Roots and proofs are computed by :class:`SubtreeHashes` from the hashes of perfect subtrees
  alone (every range the §2.1.1 recursion produces is a run of aligned perfect subtrees), so
  any store of those hashes answers them. :class:`MerkleTree` keeps every one in memory (one
  flat ``bytearray`` per level, 32 bytes a node): an append costs amortised O(1) hashes and
  any root or proof at any earlier size O(log n) lookups. It serves the offline verifier and
  the tests; the server's log keeps its tree in the database
  (:mod:`centinela.audit.stored_tree`). Earlier sizes never change: the tree only grows.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence

from centinela.errors import ProofError, RootMismatchError

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


def leaf_hash(entry: bytes) -> bytes:
    """SHA-256(0x00 || entry), RFC 9162 §2.1.1."""
    return _sha256(LEAF_PREFIX + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right), RFC 9162 §2.1.1."""
    return _sha256(NODE_PREFIX + left + right).digest()


def fold_levels(packed: bytes | bytearray) -> list[bytes]:
    """Every level of the perfect tree over ``2**k`` concatenated node hashes, bottom first.

    ``out[0]`` is ``packed`` itself and ``out[k]`` the single root hash; ``out[h]`` holds the
    hashes of the aligned subtrees of ``2**h`` input nodes, 32 bytes each, in order.
    """
    count = len(packed) // HASH_SIZE
    if count == 0 or count & (count - 1) or len(packed) % HASH_SIZE:
        raise ValueError("fold_levels needs a power-of-two number of 32-byte hashes")
    sha = _sha256
    level = bytes(packed)
    out = [level]
    while len(level) > HASH_SIZE:
        level = b"".join(
            [sha(NODE_PREFIX + level[i : i + 64]).digest() for i in range(0, len(level), 64)]
        )
        out.append(level)
    return out


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class SubtreeHashes:
    """Roots and RFC 9162 proofs of a tree known by the hashes of its perfect subtrees.

    A subclass gives :attr:`size` and ``_perfect(level, index)``: the hash of the perfect
    subtree of ``2**level`` leaves that starts at leaf ``index * 2**level`` (it is only asked
    for subtrees that lie wholly below :attr:`size`).
    """

    __slots__ = ()

    @property
    def size(self) -> int:
        """Number of leaves."""
        raise NotImplementedError

    def _perfect(self, level: int, index: int) -> bytes:
        raise NotImplementedError

    def leaf(self, index: int) -> bytes:
        """The leaf hash at ``index``."""
        if not 0 <= index < self.size:
            raise IndexError("leaf index out of range")
        return self._perfect(0, index)

    def range_hash(self, start: int, end: int) -> bytes:
        """MTH of leaves ``[start, end)``; ``start`` must be aligned as RFC 9162 splits are.

        The range is cut into perfect subtrees of decreasing size, each aligned (true for every
        range that the §2.1.1 recursion produces), and folded from the right.
        """
        if start == end:
            return EMPTY_ROOT
        pieces: list[bytes] = []
        pos = start
        remaining = end - start
        while remaining:
            level = remaining.bit_length() - 1
            width = 1 << level
            if pos & (width - 1):
                raise ValueError("range is not aligned to a perfect-subtree boundary")
            pieces.append(self._perfect(level, pos >> level))
            pos += width
            remaining -= width
        acc = pieces[-1]
        for piece in reversed(pieces[:-1]):
            acc = _sha256(NODE_PREFIX + piece + acc).digest()
        return acc

    def root(self, size: int | None = None) -> bytes:
        """The root at ``size`` (default: the whole tree)."""
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise ValueError("tree size out of range")
        return self.range_hash(0, size)

    def compact_range(self, size: int) -> list[bytes]:
        """Hashes of the perfect subtrees covering ``[0, size)``, largest first."""
        if not 0 <= size <= self.size:
            raise ValueError("tree size out of range")
        out: list[bytes] = []
        pos = 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                out.append(self._perfect(level, pos >> level))
                pos += 1 << level
        return out

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """PATH(index, D[size]) of RFC 9162 §2.1.3.1, lowest node first."""
        if not 0 <= index < size <= self.size:
            raise ValueError("inclusion proof needs 0 <= index < size <= tree size")
        top_down: list[bytes] = []
        start, end = 0, size
        while end - start > 1:
            k = _split(end - start)
            mid = start + k
            if index < mid:
                top_down.append(self.range_hash(mid, end))
                end = mid
            else:
                top_down.append(self.range_hash(start, mid))
                start = mid
        top_down.reverse()
        return top_down

    def consistency_proof(self, m: int, n: int) -> list[bytes]:
        """PROOF(m, D[n]) of RFC 9162 §2.1.4.1 (empty when m == n), lowest node first."""
        if not 0 < m <= n <= self.size:
            raise ValueError("consistency proof needs 0 < m <= n <= tree size")
        top_down: list[bytes] = []
        start, end, keep = 0, n, True
        while True:
            width = end - start
            if m == width:
                if not keep:
                    top_down.append(self.range_hash(start, end))
                break
            k = _split(width)
            if m <= k:
                top_down.append(self.range_hash(start + k, end))
                end = start + k
            else:
                top_down.append(self.range_hash(start, start + k))
                start += k
                m -= k
                keep = False
        top_down.reverse()
        return top_down


class MerkleTree(SubtreeHashes):
    """An append-only Merkle tree held in memory, with roots and proofs at any size.

    ``levels[k]`` holds, 32 bytes each, the hashes of the complete subtrees of 2**k leaves in
    order; node ``i`` of level ``k`` covers leaves ``[i * 2**k, (i + 1) * 2**k)``. Not
    thread-safe for concurrent appends: the audit log appends from one writer thread and reads
    sizes it has already published, which only ever cover complete levels' prefixes.
    """

    __slots__ = ("_levels", "_size")

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        self.extend(leaf_hashes)

    @classmethod
    def from_packed(cls, packed: bytes | bytearray) -> MerkleTree:
        """Build a tree from concatenated 32-byte leaf hashes, level by level (fast bulk load)."""
        if len(packed) % HASH_SIZE:
            raise ValueError("packed leaf hashes must be a multiple of 32 bytes")
        tree = cls()
        level = bytearray(packed)
        tree._levels = [level]
        tree._size = len(level) // HASH_SIZE
        sha = _sha256
        while len(level) >= 2 * HASH_SIZE:
            pairs = len(level) // (2 * HASH_SIZE)
            nxt = bytearray()
            for i in range(0, pairs * 64, 64):
                nxt += sha(NODE_PREFIX + level[i : i + 64]).digest()
            tree._levels.append(nxt)
            level = nxt
        return tree

    @property
    def size(self) -> int:
        """Number of leaves."""
        return self._size

    def append(self, leaf: bytes) -> int:
        """Append one leaf hash; return its index."""
        if len(leaf) != HASH_SIZE:
            raise ValueError("a leaf hash is 32 bytes")
        levels = self._levels
        index = self._size
        levels[0] += leaf
        self._size = index + 1
        i, k = index, 0
        while i & 1:
            cur = levels[k]
            off = (i - 1) * HASH_SIZE
            parent = _sha256(NODE_PREFIX + cur[off : off + 64]).digest()
            k += 1
            if k == len(levels):
                levels.append(bytearray())
            levels[k] += parent
            i >>= 1
        return index

    def extend(self, leaves: Iterable[bytes]) -> None:
        """Append leaf hashes in order."""
        for leaf in leaves:
            self.append(leaf)

    def packed_leaves(self, start: int = 0, end: int | None = None) -> bytes:
        """Leaf hashes ``[start, end)`` concatenated."""
        end = self._size if end is None else end
        return bytes(self._levels[0][start * HASH_SIZE : end * HASH_SIZE])

    def _perfect(self, level: int, index: int) -> bytes:
        off = index * HASH_SIZE
        return bytes(self._levels[level][off : off + HASH_SIZE])


# --- pure functions over a list of leaf hashes ---------------------------------------------


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over the given leaf hashes (RFC 9162 §2.1.1)."""
    return MerkleTree(leaf_hashes).root()


def inclusion_proof(index: int, size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """The inclusion proof of leaf ``index`` in the tree of the first ``size`` leaves."""
    if size > len(leaf_hashes):
        raise ValueError("size exceeds the number of leaves")
    return MerkleTree(leaf_hashes[:size]).inclusion_proof(index, size)


def consistency_proof(m: int, n: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """The consistency proof between the trees of the first ``m`` and ``n`` leaves."""
    if n > len(leaf_hashes):
        raise ValueError("size exceeds the number of leaves")
    return MerkleTree(leaf_hashes[:n]).consistency_proof(m, n)


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        if (index >> i) & 1 == 0:
            seed = _sha256(NODE_PREFIX + seed + h).digest()
        else:
            seed = _sha256(NODE_PREFIX + h + seed).digest()
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        if (index >> i) & 1 == 1:
            seed = _sha256(NODE_PREFIX + h + seed).digest()
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    for h in proof:
        seed = _sha256(NODE_PREFIX + h + seed).digest()
    return seed


def _decomp_inclusion(index: int, size: int) -> tuple[int, int]:
    inner = (index ^ (size - 1)).bit_length()
    border = bin(index >> inner).count("1")
    return inner, border


def _check_hashes(proof: Sequence[bytes]) -> None:
    for h in proof:
        if len(h) != HASH_SIZE:
            raise ProofError("a proof node is not 32 bytes")


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root implied by an inclusion proof (RFC 9162 §2.1.3.2).

    Raises:
        ProofError: the index is out of range, or the proof has the wrong shape.
    """
    if index < 0 or index >= size:
        raise ProofError(f"leaf index {index} is not below tree size {size}")
    if len(leaf) != HASH_SIZE:
        raise ProofError("the leaf hash is not 32 bytes")
    _check_hashes(proof)
    inner, border = _decomp_inclusion(index, size)
    if len(proof) != inner + border:
        raise ProofError(f"inclusion proof has {len(proof)} nodes, expected {inner + border}")
    res = _chain_inner(leaf, proof[:inner], index)
    return _chain_border_right(res, proof[inner:])


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root_hash: bytes
) -> None:
    """Check that ``leaf`` is at ``index`` in the tree of ``size`` with ``root_hash``.

    Raises:
        ProofError: the proof is malformed.
        RootMismatchError: the proof leads to another root.
    """
    calc = root_from_inclusion_proof(index, size, leaf, proof)
    if not hmac.compare_digest(calc, root_hash):
        raise RootMismatchError(
            f"inclusion proof of leaf {index} in tree size {size}",
            expected=root_hash.hex(),
            found=calc.hex(),
        )


def verify_consistency(
    m: int, n: int, root_m: bytes, root_n: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of size ``m`` and root ``root_m`` is a prefix of (n, ``root_n``).

    Follows RFC 9162 §2.1.4.2. A consistency check from the empty tree is meaningless and
    rejected, as transparency-dev/merkle does; callers skip it for m == 0.

    Raises:
        ProofError: sizes out of order, or a proof of the wrong shape.
        RootMismatchError: either root does not match what the proof implies.
    """
    _check_hashes(proof)
    if n < m:
        raise ProofError(f"size2 ({n}) is smaller than size1 ({m})")
    if m == n:
        if proof:
            raise ProofError("equal sizes need an empty consistency proof")
        if m == 0 and not hmac.compare_digest(root_m, EMPTY_ROOT):
            raise RootMismatchError(
                "root of the empty tree", expected=EMPTY_ROOT.hex(), found=root_m.hex()
            )
        if not hmac.compare_digest(root_m, root_n):
            raise RootMismatchError(
                f"two roots of tree size {m}", expected=root_m.hex(), found=root_n.hex()
            )
        return
    if m == 0:
        raise ProofError("a consistency proof from the empty tree is meaningless")
    if not proof:
        raise ProofError("empty consistency proof")
    inner, border = _decomp_inclusion(m - 1, n)
    shift = ((m & -m).bit_length()) - 1
    inner -= shift
    if m == 1 << shift:
        seed, start = root_m, 0
    else:
        seed, start = proof[0], 1
    if len(proof) != start + inner + border:
        raise ProofError(
            f"consistency proof has {len(proof)} nodes, expected {start + inner + border}"
        )
    rest = proof[start:]
    mask = (m - 1) >> shift
    hash1 = _chain_border_right(_chain_inner_right(seed, rest[:inner], mask), rest[inner:])
    if not hmac.compare_digest(hash1, root_m):
        raise RootMismatchError(
            f"consistency proof at size1 {m}", expected=root_m.hex(), found=hash1.hex()
        )
    hash2 = _chain_border_right(_chain_inner(seed, rest[:inner], mask), rest[inner:])
    if not hmac.compare_digest(hash2, root_n):
        raise RootMismatchError(
            f"consistency proof at size2 {n}", expected=root_n.hex(), found=hash2.hex()
        )


def fold_compact_range(nodes: Sequence[bytes]) -> bytes:
    """Root of ``[0, size)`` from its compact range (perfect subtrees, largest first)."""
    if not nodes:
        return EMPTY_ROOT
    acc = nodes[-1]
    for node in reversed(nodes[:-1]):
        acc = _sha256(NODE_PREFIX + node + acc).digest()
    return acc
