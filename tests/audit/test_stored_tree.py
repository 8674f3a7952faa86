"""The Merkle tree on disk answers exactly what the in-memory tree answers, in bounded memory,
and refuses a store whose subtree hashes disagree with its leaves."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import tempfile
import time
import tracemalloc
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from centinela.audit.log import AuditLog
from centinela.audit.merkle import MerkleTree, verify_consistency, verify_inclusion
from centinela.audit.store import LeafStore
from centinela.audit.stored_tree import StoredTree
from centinela.errors import AppendOnlyViolation, AuditUnavailable, VerificationError
from centinela.storage import make_engine

from .conftest import ORIGIN, rewrite_leaf_hash, sample_entry


def _leaf(i: int) -> bytes:
    return hashlib.sha256(b"leaf-%d" % i).digest()


def _fresh_store(engine: Engine) -> LeafStore:
    store = LeafStore(engine)
    store.migrate()
    return store


def _grow(tree: StoredTree, first: int, count: int, *, subtrees: bool = True) -> None:
    """Append ``count`` leaves as the log's writer does: plan, commit, publish."""
    leaves = [_leaf(i) for i in range(first, first + count)]
    growth = tree.grow(leaves)
    with tree.store.engine.connect() as conn:
        tree.store.append_batch(
            conn,
            first,
            [(b"{}", leaf) for leaf in leaves],
            subtrees=growth.subtrees if subtrees else (),
        )
    tree.apply(growth)


def _same_answers(tree: StoredTree, reference: MerkleTree, sizes: list[int]) -> None:
    v = tree.view()
    assert v.size == reference.size
    assert v.root() == reference.root()
    for size in sizes:
        assert v.root(size) == reference.root(size), size
        assert v.compact_range(size) == reference.compact_range(size), size
        for index in {0, size // 3, size - 1} if size else set():
            proof = v.inclusion_proof(index, size)
            assert proof == reference.inclusion_proof(index, size), (index, size)
            verify_inclusion(index, size, reference.leaf(index), proof, reference.root(size))
            assert v.leaf(index) == reference.leaf(index)
        for m in {1, size // 2, size} if size else set():
            if m:
                proof = v.consistency_proof(m, size)
                assert proof == reference.consistency_proof(m, size), (m, size)
                verify_consistency(m, size, reference.root(m), reference.root(size), proof)


@settings(max_examples=15, deadline=None)
@given(
    batches=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    height=st.sampled_from([1, 2, 3]),
)
def test_every_root_and_proof_matches_the_in_memory_tree(batches: list[int], height: int) -> None:
    """Small tiles (2..8 nodes) reach four or more stored levels with a few hundred leaves;
    batches of random sizes cross tile boundaries inside and between commits. (SQLite, a
    fresh file per example; the tests below run on both databases.)"""
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{tmp}/t.db")
        try:
            store = _fresh_store(engine)
            tree = StoredTree(store, tile_height=height, cache_tiles=2)  # evicts often
            reference = MerkleTree()
            size = 0
            for count in batches:
                _grow(tree, size, count)
                reference.extend(_leaf(i) for i in range(size, size + count))
                size += count
                _same_answers(tree, reference, sorted({1, size // 2, size - 1, size}))
            sizes = [*range(1, size + 1, max(1, size // 17)), size]
            _same_answers(StoredTree.load(store, tile_height=height), reference, sizes)
            opened = StoredTree.open(store, tile_height=height)  # the tails only, no scan
            _same_answers(opened, reference, sizes)
            assert opened.verify(size)
        finally:
            engine.dispose()


def test_default_tiles_across_two_stored_levels(engine: Engine) -> None:
    """70,000 leaves at the default height: subtrees of 256 and 65,536 leaves are stored."""
    store = _fresh_store(engine)
    tree = StoredTree(store)
    size = 70_000
    for first in range(0, size, 10_000):
        _grow(tree, first, 10_000)
    assert store.count(8) == size >> 8
    assert store.count(16) == 1
    reference = MerkleTree.from_packed(b"".join(_leaf(i) for i in range(size)))
    _same_answers(tree, reference, [65_535, 65_536, 65_537, 69_999, 70_000])
    _same_answers(StoredTree.load(store), reference, [256, 65_536, 70_000])


def test_a_log_written_before_the_table_is_filled_in(engine: Engine) -> None:
    """Leaves without their subtree rows (a log from before migration 3): load computes and
    stores them, and the answers are right."""
    store = _fresh_store(engine)
    tree = StoredTree(store, tile_height=2)
    _grow(tree, 0, 100, subtrees=False)
    assert store.count(2) == 0
    with pytest.raises(AppendOnlyViolation, match="missing"):
        tree.verify(100)  # the check beside the service never writes
    loaded = StoredTree.open(store, tile_height=2)  # sees the gap: loads in full, fills in
    assert [store.count(level) for level in (2, 4, 6, 8)] == [25, 6, 1, 0]
    reference = MerkleTree(_leaf(i) for i in range(100))
    _same_answers(loaded, reference, [1, 64, 99, 100])
    # Appends go on from the filled-in state.
    _grow(loaded, 100, 30)
    reference.extend(_leaf(i) for i in range(100, 130))
    _same_answers(StoredTree.load(store, tile_height=2), reference, [100, 128, 130])


def test_a_wrong_subtree_hash_is_refused_at_load(engine: Engine) -> None:
    """Someone inserts a forged subtree row where none was yet: the leaves disagree."""
    store = _fresh_store(engine)
    tree = StoredTree(store, tile_height=2)
    _grow(tree, 0, 40, subtrees=False)
    store.add_subtrees([(2, 0, hashlib.sha256(b"forged").digest())])
    with pytest.raises(AppendOnlyViolation, match="level 2, index 0"):
        StoredTree.load(store, tile_height=2)


def test_subtrees_beyond_the_leaves_are_refused(engine: Engine) -> None:
    """Subtree rows for leaves the store does not hold: leaves were removed."""
    store = _fresh_store(engine)
    tree = StoredTree(store, tile_height=2)
    _grow(tree, 0, 16)
    store.add_subtrees([(2, 4, hashlib.sha256(b"ahead").digest())])
    with pytest.raises(AppendOnlyViolation, match="beyond"):
        StoredTree.load(store, tile_height=2)


def test_subtree_rows_cannot_be_changed_or_removed(engine: Engine) -> None:
    store = _fresh_store(engine)
    _grow(StoredTree(store, tile_height=2), 0, 8)
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
        conn.exec_driver_sql("UPDATE audit_subtrees SET hash = hash WHERE level = 2")
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM audit_subtrees")
    assert store.count(2) == 2


def test_a_rewritten_leaf_below_a_stored_subtree_faults_the_log(
    engine: Engine, signing_key: Ed25519PrivateKey
) -> None:
    """A DBA drops the trigger and rewrites a leaf that a stored subtree already covers (the
    signed root, read from the stored subtrees, still matches). With ``verify_at_open`` the
    log does not open; by default it opens at once and the check beside the service faults
    it: every append is then refused."""
    log = AuditLog.open(engine, signing_key, ORIGIN)

    async def fill() -> None:
        await asyncio.gather(*(log.append(sample_entry(i)) for i in range(600)))

    asyncio.run(fill())
    _wait_for(lambda: log.history_verified is True)
    log.close()
    rewrite_leaf_hash(engine, 3, hashlib.sha256(b"\x00{}").digest())
    with pytest.raises(VerificationError, match="level 8, index 0"):
        AuditLog.open(engine, signing_key, ORIGIN, verify_at_open=True)
    log = AuditLog.open(engine, signing_key, ORIGIN)
    try:
        _wait_for(lambda: log.history_verified is False)
        with pytest.raises(AuditUnavailable, match="altered"):
            log.append_blocking(sample_entry(700), timeout=30)
    finally:
        log.close()


def _wait_for(cond: Callable[[], bool], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_the_log_holds_no_memory_per_entry(engine: Engine, signing_key: Ed25519PrivateKey) -> None:
    """Python memory the log holds after 20,000 more entries, traced: the in-memory tree it
    replaces kept 64 bytes an entry (1.3 MB here) for the life of the process. What remains
    is constant (asyncio's task set, a few cached tiles: ~150 KB measured), hence a bound of
    12 bytes an entry. The tile cache is bounded by its count (below) and capped at 4 tiles
    here so that its filling up to the bound is not mistaken for growth."""
    log = AuditLog.open(engine, signing_key, ORIGIN, checkpoint_every_seconds=3600)
    log._tree._cache_max = 4

    async def fill(first: int, count: int) -> None:
        for start in range(first, first + count, 500):
            await asyncio.gather(*(log.append(sample_entry(i)) for i in range(start, start + 500)))

    def held(index: int) -> int:
        # One lone append first: the writer's frame keeps its last batch until the next.
        log.append_blocking(sample_entry(index))
        log.checkpoint()
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    try:
        asyncio.run(fill(0, 2_000))  # warm: statement caches, pools, one checkpoint
        tracemalloc.start()
        before = held(2_000)
        asyncio.run(fill(2_001, 20_000))
        grown = held(22_001) - before
        tracemalloc.stop()
        assert log.size == 22_002
        assert grown < 20_000 * 12, f"the log kept {grown / 20_000:.1f} bytes an entry"
    finally:
        log.close()


def test_the_tile_cache_is_bounded(engine: Engine) -> None:
    store = _fresh_store(engine)
    tree = StoredTree(store, tile_height=2, cache_tiles=5)
    _grow(tree, 0, 300)
    view = tree.view()
    for index in range(0, 300, 7):
        view.inclusion_proof(index, 300)
        assert len(tree._cache) <= 5
    assert len(tree._cache) == 5


def test_the_check_beside_the_writer_ignores_what_came_after_it_started(engine: Engine) -> None:
    """The log checks the tree as opened while the writer goes on: subtrees the writer has
    stored since are not 'beyond the leaves' of the size being checked."""
    store = _fresh_store(engine)
    tree = StoredTree(store, tile_height=2)
    _grow(tree, 0, 40)
    opened = StoredTree.open(store, tile_height=2)
    _grow(opened, 40, 100)  # the writer goes on: new subtrees at every stored level
    assert opened.verify(40)
    assert opened.verify(140)
