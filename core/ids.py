"""Identifiers that sort in creation order and stay unguessable.

A B-tree index on random ids takes each new row at a random page, and SQLite's WAL logs
every page a commit touches, whole (8 KiB here), before the checkpoint writes it once more.
An id that leads with its creation time enters an index at its right edge instead, as the
audit log's own rows do: the commits of one second share that edge's page.
"""

from __future__ import annotations

import secrets
import time

#: Random bits after the time, as many as the plain random ids of the service carry.
RANDOM_BYTES = 10


def ordered_token(*, now_ns: int | None = None) -> str:
    """32 hex digits: 12 of Unix milliseconds, then 80 random bits.

    A token made later sorts after one made earlier, as far as the clock goes forward (a
    clock set back only costs locality, never uniqueness: that is the random part's).
    Whoever sees such a token learns when it was made, which is no news wherever it is used
    here: the caller knows when it asked, and the audit entry that records it has its time.
    """
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    return f"{ms:012x}{secrets.token_hex(RANDOM_BYTES)}"
