"""The audit log's Merkle tree kept in the database, in memory bounded at any log size.

Invariants (RFC 9162 §2.1; DESIGN.md §6):

* The tree is the leaf hashes of ``audit_leaves`` and, in ``audit_subtrees``, the hash of every
  perfect subtree at the *stored levels*, the multiples of the tile height ``h`` (8 by
  default: subtrees of 256, 65,536, … leaves). A *tile* is the run of ``2**h`` nodes of one
  stored level that a single node of the next stored level covers. Every perfect subtree
  hash that RFC 9162 roots and proofs need lies inside one tile of the stored level at or
  below it, so a root or a proof costs O(log n / h) tile reads (a bounded LRU cache keeps
  recent tiles, expanded into their inner levels), never a walk over the leaves.
* Memory holds, per stored level, only the nodes of its one open (incomplete) tile, fewer than
  ``2**h`` hashes, and the tile cache: O(2**h · log n) bytes, where the in-memory
  :class:`~centinela.audit.merkle.MerkleTree` took 64 bytes a leaf for the life of the log.
* A subtree row is written in the same transaction as the leaf that completes it:
  :meth:`StoredTree.grow` plans the rows without changing the tree, ``append_batch`` commits
  them with the leaves, and :meth:`StoredTree.apply` publishes the new size only after the
  commit. The table therefore never runs ahead of or behind the leaves, and readers, which
  work on an immutable :class:`TreeView` of a published size, only ever ask the database for
  committed tiles.
* :meth:`StoredTree.open` reads O(log n) rows: each stored level's count (a subtree of leaves
  the store does not have is refused) and its open tile. :meth:`StoredTree.verify` recomputes
  every stored subtree from the leaves (O(n), ~1 s a million) and is what the log runs beside
  the service after each start; :meth:`StoredTree.load` does the same before opening and fills
  in the subtrees that are missing (a log written before the table existed).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Sequence

from centinela.audit.merkle import HASH_SIZE, SubtreeHashes, fold_levels
from centinela.audit.store import LeafStore
from centinela.errors import AppendOnlyViolation
from centinela.logs import get_logger

__all__ = ["DEFAULT_CACHE_TILES", "TILE_HEIGHT", "Growth", "StoredTree", "TreeView"]

#: Levels stored: every 8th (a tile holds 256 nodes, 8 KiB of hashes).
TILE_HEIGHT = 8
#: Complete tiles kept in memory, expanded (~16 KiB each at height 8): about 8 MiB.
DEFAULT_CACHE_TILES = 512
#: Nodes read per query while loading (a multiple of every tile width used).
_LOAD_CHUNK = 1 << 16

_log = get_logger("centinela.audit.stored_tree")


@dataclasses.dataclass(frozen=True, slots=True)
class _State:
    """A published size and, per stored level, the nodes of its open tile."""

    size: int
    #: ``tails[j]``: the nodes of level ``j * h`` after its last complete tile, in order.
    tails: tuple[tuple[bytes, ...], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Growth:
    """What appending some leaves does to the tree, planned but not yet published."""

    base: int
    state: _State
    #: ``(level, index, hash)`` of each stored-level subtree the leaves complete.
    subtrees: list[tuple[int, int, bytes]]


def _split32(packed: bytes) -> tuple[bytes, ...]:
    return tuple(packed[i : i + HASH_SIZE] for i in range(0, len(packed), HASH_SIZE))


class StoredTree:
    """An append-only RFC 9162 tree over a :class:`LeafStore`, with bounded memory.

    One writer calls :meth:`grow` then, after its commit, :meth:`apply`; any thread may take a
    :meth:`view` and ask it for roots and proofs. ``tile_height`` other than the default is for
    tests (small tiles reach many stored levels with few leaves); a store must always be opened
    with the height it was written with.
    """

    def __init__(
        self,
        store: LeafStore,
        *,
        tile_height: int = TILE_HEIGHT,
        cache_tiles: int = DEFAULT_CACHE_TILES,
    ) -> None:
        if not 1 <= tile_height <= 16 or cache_tiles < 1:
            raise ValueError("tile_height must be 1..16 and cache_tiles positive")
        self.store = store
        self.tile_height = tile_height
        self._width = 1 << tile_height
        self._state = _State(0, ())
        self._cache: OrderedDict[tuple[int, int], list[bytes]] = OrderedDict()
        self._cache_max = cache_tiles
        self._cache_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        store: LeafStore,
        *,
        tile_height: int = TILE_HEIGHT,
        cache_tiles: int = DEFAULT_CACHE_TILES,
    ) -> StoredTree:
        """Open the tree the store holds, in O(log n) reads: each stored level's count is
        checked and its open tile read; the leaves are not re-read (:meth:`verify` does that,
        the log runs it beside the service). A store whose subtree table is incomplete (a log
        written before it existed) is opened by :meth:`load`, which fills it in.

        Raises:
            AppendOnlyViolation: the store holds subtrees of leaves it does not have, or an
                index has a gap.
            StorageError: the database failed.
        """
        tree = cls(store, tile_height=tile_height, cache_tiles=cache_tiles)
        size = store.size()
        levels = tree._stored_levels(size)
        if any(stored < count for _, count, stored in levels[1:]):
            return cls.load(store, tile_height=tile_height, cache_tiles=cache_tiles)
        tree._state = _State(size, tree._read_tails(levels))
        return tree

    @classmethod
    def load(
        cls,
        store: LeafStore,
        *,
        tile_height: int = TILE_HEIGHT,
        cache_tiles: int = DEFAULT_CACHE_TILES,
    ) -> StoredTree:
        """Open the tree the store holds, checking every stored subtree against the leaves
        first and filling in those that are missing (O(n): about 1 s a million leaves).

        Raises:
            AppendOnlyViolation: a stored subtree disagrees with the leaves, the store holds
                subtrees of leaves it does not have, or an index has a gap.
            StorageError: the database failed.
        """
        tree = cls(store, tile_height=tile_height, cache_tiles=cache_tiles)
        size = store.size()
        levels = tree._stored_levels(size)
        tree._scan(size, fill=True)
        tree._state = _State(size, tree._read_tails(levels))
        return tree

    def verify(self, size: int, stop: threading.Event | None = None) -> bool:
        """Recompute every stored subtree of the first ``size`` leaves from the leaves.

        Read-only, and safe beside the writer: it reads only tiles complete at ``size``, and
        what the writer stored since is not its business. Returns False if ``stop`` was set
        before the end, True when all agreed.

        Raises:
            AppendOnlyViolation: a stored subtree disagrees with the leaves or is missing.
            StorageError: the database failed.
        """
        return self._scan(size, fill=False, stop=stop)

    def _levels(self, size: int) -> list[tuple[int, int]]:
        """``(level, nodes at that level)`` for every stored level that ``size`` leaves reach,
        then the first level they do not."""
        out = []
        level, count = 0, size
        while True:
            out.append((level, count))
            if count == 0:
                return out
            level += self.tile_height
            count >>= self.tile_height

    def _stored_levels(self, size: int) -> list[tuple[int, int, int]]:
        """:meth:`_levels` with the nodes stored at each level, for opening a store of
        ``size`` leaves: one that holds subtrees beyond them lost leaves."""
        out = []
        for level, count in self._levels(size):
            stored = self.store.count(level) if level else size
            if stored > count:
                raise AppendOnlyViolation(
                    f"the audit store holds subtrees of level {level} beyond its {size} "
                    "leaves: leaves were removed"
                )
            out.append((level, count, stored))
        return out

    def _read_tails(self, levels: list[tuple[int, int, int]]) -> tuple[tuple[bytes, ...], ...]:
        tails = []
        for level, count, _ in levels[:-1]:
            open_at = count - count % self._width
            tail = self.store.packed(level, open_at, count)
            if len(tail) != (count - open_at) * HASH_SIZE:
                raise AppendOnlyViolation(f"stored audit hashes of level {level} end early")
            tails.append(_split32(tail))
        return tuple(tails)

    def _scan(self, size: int, *, fill: bool, stop: threading.Event | None = None) -> bool:
        for level, count in self._levels(size)[:-1]:
            open_at = count - count % self._width
            if open_at and not self._check_next_level(level, open_at, fill=fill, stop=stop):
                return False
        return True

    def _check_next_level(
        self, level: int, end: int, *, fill: bool, stop: threading.Event | None
    ) -> bool:
        """Fold the complete tiles of ``level`` below ``end`` and check them one level up."""
        h, w = self.tile_height, self._width
        up = level + h
        tile_bytes = w * HASH_SIZE
        done = 0
        for n, chunk in enumerate(self.store.iter_packed(level, 0, end, chunk=_LOAD_CHUNK)):
            if stop is not None and stop.is_set():
                return False
            if len(chunk) % tile_bytes:
                break  # ends early: refused below
            first = done // w
            computed = b"".join(
                fold_levels(chunk[i : i + tile_bytes])[-1] for i in range(0, len(chunk), tile_bytes)
            )
            done += len(chunk) // HASH_SIZE
            stored = self.store.packed(up, first, done // w)
            have = len(stored)
            if stored != computed[:have]:
                bad = next(
                    i
                    for i in range(0, have, HASH_SIZE)
                    if stored[i : i + HASH_SIZE] != computed[i : i + HASH_SIZE]
                )
                raise AppendOnlyViolation(
                    f"the stored subtree hash at level {up}, index {first + bad // HASH_SIZE}, "
                    "disagrees with the leaves: the audit store was altered"
                )
            if have < len(computed):
                base = first + have // HASH_SIZE
                if not fill:
                    raise AppendOnlyViolation(
                        f"the stored subtree at level {up}, index {base}, is missing"
                    )
                # Written before the table existed: fill it in.
                self.store.add_subtrees(
                    [(up, base + k, h32) for k, h32 in enumerate(_split32(computed[have:]))]
                )
            if n % 64 == 63:  # every 4M nodes: a long check says how far it is
                _log.info("audit_tree_checking", level=level, nodes=done, of=end)
        if done != end:
            raise AppendOnlyViolation(f"stored audit hashes of level {level} end early")
        return True

    # --- the writer ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of leaves published."""
        return self._state.size

    def grow(self, leaves: Sequence[bytes]) -> Growth:
        """Plan the append of ``leaves`` (32-byte leaf hashes); the tree is not changed."""
        h, w = self.tile_height, self._width
        base = self._state
        tails = [list(t) for t in base.tails]
        out: list[tuple[int, int, bytes]] = []
        size = base.size
        for leaf in leaves:
            if len(leaf) != HASH_SIZE:
                raise ValueError("a leaf hash is 32 bytes")
            size += 1
            node, j = leaf, 0
            while True:
                if j == len(tails):
                    tails.append([])
                tail = tails[j]
                tail.append(node)
                if len(tail) < w:
                    break
                node = fold_levels(b"".join(tail))[-1]
                tail.clear()
                j += 1
                out.append((j * h, (size >> (j * h)) - 1, node))
        return Growth(base.size, _State(size, tuple(tuple(t) for t in tails)), out)

    def apply(self, growth: Growth) -> None:
        """Publish a planned growth once its leaves and subtrees are committed."""
        if growth.base != self._state.size:
            raise RuntimeError("a growth planned on another size cannot be applied")
        self._state = growth.state

    def catch_up(self) -> int:
        """Publish leaves the store holds beyond :attr:`size` (committed, but not answered).

        Their subtrees were committed in the same transactions; they are checked, not written.
        Returns the new size.

        Raises:
            AppendOnlyViolation: a stored subtree is missing or disagrees.
            StorageError: the database failed.
        """
        packed = self.store.packed_leaf_hashes(self.size)
        growth = self.grow(_split32(packed))
        for level, index, node in growth.subtrees:
            if self.store.packed(level, index, index + 1) != node:
                raise AppendOnlyViolation(
                    f"the stored subtree at level {level}, index {index}, is missing or wrong"
                )
        self.apply(growth)
        return self.size

    # --- readers -------------------------------------------------------------------------

    def view(self) -> TreeView:
        """An immutable view of the tree at its published size."""
        return TreeView(self, self._state)

    def _tile(self, level: int, tile: int) -> list[bytes]:
        """The complete tile ``tile`` of stored ``level``, expanded (``out[r]``: level + r)."""
        key = (level, tile)
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        w = self._width
        packed = self.store.packed(level, tile * w, (tile + 1) * w)
        if len(packed) != w * HASH_SIZE:
            raise AppendOnlyViolation(f"a stored tile of audit level {level} is incomplete")
        levels = fold_levels(packed)
        with self._cache_lock:
            self._cache[key] = levels
            while len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        return levels


class TreeView(SubtreeHashes):
    """Roots and proofs of a :class:`StoredTree` at one published size.

    Reads of complete tiles go to the database (through the tree's cache); call from a
    thread that may block.
    """

    __slots__ = ("_state", "_tree")

    def __init__(self, tree: StoredTree, state: _State) -> None:
        self._tree = tree
        self._state = state

    @property
    def size(self) -> int:
        """Number of leaves in this view."""
        return self._state.size

    def _perfect(self, level: int, index: int) -> bytes:
        tree = self._tree
        h = tree.tile_height
        r = level % h
        base = level - r
        first = index << r  # the subtree's first node on the stored level below it
        tile, off = divmod(first, tree._width)
        if tile == (self._state.size >> base) >> h:  # inside the open tile
            nodes = self._state.tails[base // h][off : off + (1 << r)]
            return nodes[0] if r == 0 else fold_levels(b"".join(nodes))[-1]
        node = off >> r
        return tree._tile(base, tile)[r][node * HASH_SIZE : (node + 1) * HASH_SIZE]
