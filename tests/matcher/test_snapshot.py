"""Encrypted snapshots: round trip, and truncated, corrupted, foreign or stale ones rejected."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from centinela.matcher import snapshot as snap
from centinela.matcher import synth
from centinela.matcher.gallery import FaceGallery, GalleryItem
from centinela.matcher.snapshot import SnapshotRejected, read_snapshot, write_snapshot

NOW = dt.datetime(2026, 11, 21, tzinfo=dt.UTC)
KEY = bytes(range(32))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    t = synth.identities(600, seed=7)
    return t, synth.genuine_probes(t, seed=8)


@pytest.fixture
def saved(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> tuple[Path, FaceGallery]:
    templates, _ = data
    g = FaceGallery("pnp_watchlist", "model-a", 512, ef_construction=64)
    g.add_batch([f"t{i}" for i in range(600)], [f"s{i}" for i in range(600)], templates)
    g.remove("t3")
    g.set_state("t4", active=False, expires_at=None)
    g.add([GalleryItem("t5", "s5", templates[5], objector=True)])
    g.applied_seq = 42
    path = tmp_path / "pnp_watchlist.snapshot"
    write_snapshot(path, g, owner="pnp", key_id="dek-1", data_key=KEY, store_id="store-1")
    return path, g


def _read(path: Path, **over: Any) -> FaceGallery:
    args: dict[str, Any] = {
        "gallery": "pnp_watchlist",
        "model_id": "model-a",
        "dim": 512,
        "owner": "pnp",
        "store_id": "store-1",
        "store_seq": 100,
        "key_lookup": lambda _kid: KEY,
    }
    args.update(over)
    return read_snapshot(path, **args)


def test_round_trip(saved: tuple[Path, FaceGallery], data: tuple[np.ndarray, np.ndarray]) -> None:
    path, g = saved
    _, probes = data
    seen: list[tuple[int, int]] = []
    loaded = _read(path, progress=lambda d, t: seen.append((d, t)))
    assert seen
    assert seen[-1][0] == seen[-1][1] == path.stat().st_size
    assert loaded.applied_seq == 42
    assert len(loaded) == len(g) == 599
    assert loaded.ef == g.ef
    for i in (0, 10, 599):
        assert loaded.search(probes[i], k=1, min_score=0.4, now=NOW) == g.search(
            probes[i], k=1, min_score=0.4, now=NOW
        )
    assert loaded.search(probes[3], k=3, min_score=0.4, now=NOW) == []
    assert loaded.search(probes[4], k=3, min_score=0.4, now=NOW) == []
    assert loaded.search(probes[5], k=1, min_score=0.4, now=NOW, exclude_objectors=True) == []
    loaded.add([GalleryItem("new", "s-new", probes[3])])
    assert loaded.search(probes[3], k=1, min_score=0.9, now=NOW)[0].template_id == "new"


def test_snapshot_is_private_and_holds_no_clear_vector(
    saved: tuple[Path, FaceGallery], data: tuple[np.ndarray, np.ndarray]
) -> None:
    path, _ = saved
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    templates, _ = data
    assert templates[0].tobytes()[:64] not in raw
    # Ids are stored newline-joined; look for runs long enough that random ciphertext cannot
    # hold them by chance (a 3-byte needle sits in ~7% of 1.2 MB random files).
    assert b"\n".join(f"t{i}".encode() for i in range(10, 14)) not in raw
    assert b"\n".join(f"s{i}".encode() for i in range(10, 14)) not in raw


@pytest.mark.parametrize("keep", [0, 10, 40, 200, -1, -17, -5000])
def test_truncated_snapshot_is_rejected(saved: tuple[Path, FaceGallery], keep: int) -> None:
    path, _ = saved
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])
    with pytest.raises(SnapshotRejected):
        _read(path)


def test_truncation_at_a_chunk_boundary_is_rejected(
    saved: tuple[Path, FaceGallery],
    monkeypatch: pytest.MonkeyPatch,
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    """Dropping whole final chunks (STREAM 'last' flag) is detected."""
    path, g = saved
    monkeypatch.setattr(snap, "CHUNK", 4096)
    write_snapshot(path, g, owner="pnp", key_id="dek-1", data_key=KEY, store_id="store-1")
    _, _, offset = snap.read_header(path)
    raw = path.read_bytes()
    pos = offset + 7
    ends = []
    while pos < len(raw):
        (clen,) = struct.unpack(">I", raw[pos : pos + 4])
        pos += 4 + clen
        ends.append(pos)
    assert len(ends) > 3
    for cut in ends[:-1]:
        path.write_bytes(raw[:cut])
        with pytest.raises(SnapshotRejected):
            _read(path)


def test_flipped_bit_is_rejected(saved: tuple[Path, FaceGallery]) -> None:
    path, _ = saved
    raw = bytearray(path.read_bytes())
    for pos in (len(raw) // 2, len(raw) - 3):
        copy = bytearray(raw)
        copy[pos] ^= 0x10
        path.write_bytes(bytes(copy))
        with pytest.raises(SnapshotRejected):
            _read(path)


def test_edited_header_is_rejected(saved: tuple[Path, FaceGallery]) -> None:
    """Changing the clear high-water mark breaks every chunk's authentication."""
    path, _ = saved
    _info, header, _ = snap.read_header(path)
    doc = json.loads(header)
    doc["applied_seq"] = 7
    new_header = json.dumps(doc, sort_keys=True).encode()
    raw = path.read_bytes()
    tail = raw[len(snap.MAGIC) + 4 + len(header) :]
    path.write_bytes(snap.MAGIC + struct.pack(">I", len(new_header)) + new_header + tail)
    with pytest.raises(SnapshotRejected):
        _read(path)


@pytest.mark.parametrize(
    "over",
    [
        {"store_id": "another-store"},
        {"gallery": "reniec_registry"},
        {"model_id": "model-b"},
        {"dim": 128},
        {"owner": "reniec"},
    ],
)
def test_foreign_snapshot_is_rejected(
    saved: tuple[Path, FaceGallery], over: dict[str, Any]
) -> None:
    with pytest.raises(SnapshotRejected):
        _read(saved[0], **over)


def test_snapshot_ahead_of_store_is_rejected(saved: tuple[Path, FaceGallery]) -> None:
    with pytest.raises(SnapshotRejected):
        _read(saved[0], store_seq=41)


def test_wrong_key_is_rejected(saved: tuple[Path, FaceGallery]) -> None:
    with pytest.raises(SnapshotRejected):
        _read(saved[0], key_lookup=lambda _kid: os.urandom(32))


def test_destroyed_key_is_rejected(saved: tuple[Path, FaceGallery]) -> None:
    def gone(_kid: str) -> bytes:
        raise KeyError("shredded")

    with pytest.raises(SnapshotRejected):
        _read(saved[0], key_lookup=gone)


def test_not_a_snapshot_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.snapshot"
    path.write_bytes(b"hello world" * 10)
    with pytest.raises(SnapshotRejected):
        _read(path)
