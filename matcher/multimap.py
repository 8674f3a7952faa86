"""Key -> several values, held as tuples.

The matcher's per-subject and per-plate tables have one entry per enrolled person or listed
plate, a million of them in a national watchlist. A ``set`` per entry is one object the
cyclic garbage collector tracks, and every full collection walks them all with the event
loop stopped (with the watchlist view's records: 110-128 ms at 100,000 entries, 411 ms at
a million). A tuple of strings or ints is untracked by the collector once it has seen it,
and an entry holds a handful of values at most, so the linear updates cost nothing.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def add(table: dict[K, tuple[V, ...]], key: K, value: V) -> None:
    """Add ``value`` under ``key`` unless it is there already."""
    have = table.get(key, ())
    if value not in have:
        table[key] = (*have, value)


def discard(table: dict[K, tuple[V, ...]], key: K, value: V) -> None:
    """Remove ``value`` from under ``key``; the key goes with its last value."""
    kept = tuple(v for v in table.get(key, ()) if v != value)
    if kept:
        table[key] = kept
    else:
        table.pop(key, None)
