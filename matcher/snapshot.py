"""Encrypted snapshots of a face gallery's HNSW index, with the store's high-water mark.

Invariants (DESIGN.md §4; the chunked AEAD follows the STREAM construction of Hoang, Reyhanitabar,
Rogaway and Vizár, "Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", 2015):

* A snapshot is never in clear on disk: the payload (index, labels, entry state) is cut into
  chunks, each AES-256-GCM encrypted under a key derived with HKDF-SHA256 from the gallery
  owner's data key. The nonce of chunk ``i`` is ``prefix ‖ i ‖ last``: chunks cannot be
  reordered, dropped, or the file cut at a chunk boundary, without failing authentication.
* The clear header (gallery, model, dimension, owner, data-key id, store id, high-water mark)
  is the associated data of every chunk: editing it breaks every chunk.
* A snapshot is trusted only if it authenticates, names the expected gallery, model,
  dimension and store, uses a data key the owner still has, and its high-water mark does not
  exceed the store's. Anything else raises :class:`SnapshotRejected` and the caller rebuilds
  from the store. Crypto-shredding an owner makes its snapshots unreadable by construction.
* Snapshots are written to a temporary file (mode 0600), fsynced, then renamed: a crash
  leaves the previous snapshot or the new one, never a mix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from centinela.errors import DecryptionError
from centinela.matcher.gallery import FaceGallery

MAGIC = b"CENTINELA-SNAPSHOT\x00v1\n"
CHUNK = 16 * 1024 * 1024
_TAG = 16
_INFO = b"centinela/matcher/snapshot/v1"

Progress = Callable[[int, int], None]


class SnapshotRejected(DecryptionError):
    """A snapshot is corrupted, truncated, foreign or stale; rebuild from the store."""


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot holds (the clear header)."""

    gallery: str
    model_id: str
    dim: int
    owner: str
    key_id: str
    store_id: str
    applied_seq: int
    entries: int


def _snapshot_key(data_key: bytes, header: bytes) -> AESGCM:
    # The header is the salt: two snapshots never share a chunk key unless they share it all.
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=header, info=_INFO)
    return AESGCM(hkdf.derive(data_key))


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if last else 0)


def _payload(
    meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]
) -> Iterator[bytes | memoryview]:
    raw = json.dumps(meta, sort_keys=True).encode()
    yield struct.pack(">I", len(raw)) + raw
    yield struct.pack(">I", len(arrays))
    for name, arr in arrays.items():
        flat = np.ascontiguousarray(arr).ravel()
        dtype = flat.dtype.str.encode()
        bname = name.encode()
        yield struct.pack(">H", len(bname)) + bname + struct.pack(">H", len(dtype)) + dtype
        yield struct.pack(">Q", flat.nbytes)
        yield memoryview(flat.view(np.uint8))  # type: ignore[arg-type]


def _rechunk(pieces: Iterator[bytes | memoryview], size: int) -> Iterator[bytes]:
    buf = bytearray()
    for piece in pieces:
        view = memoryview(piece)
        while len(view):
            take = min(size - len(buf), len(view))
            buf += view[:take]
            view = view[take:]
            if len(buf) == size:
                yield bytes(buf)
                buf.clear()
    yield bytes(buf)


def write_snapshot(
    path: Path,
    gallery: FaceGallery,
    *,
    owner: str,
    key_id: str,
    data_key: bytes,
    store_id: str,
) -> SnapshotInfo:
    """Write an encrypted snapshot of ``gallery`` to ``path`` atomically."""
    with gallery.changes():
        meta, arrays = gallery.export_state()
        info = SnapshotInfo(
            gallery=gallery.name,
            model_id=gallery.model_id,
            dim=gallery.dim,
            owner=owner,
            key_id=key_id,
            store_id=store_id,
            applied_seq=int(meta["applied_seq"]),
            entries=len(gallery),
        )
    header = json.dumps(dataclasses.asdict(info), sort_keys=True).encode()
    aead = _snapshot_key(data_key, header)
    prefix = secrets.token_bytes(7)
    tmp = path.with_name(path.name + f".tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(MAGIC + struct.pack(">I", len(header)) + header + prefix)
            chunks = _rechunk(_payload(meta, arrays), CHUNK)
            current = next(chunks)
            index = 0
            for following in chunks:
                _write_chunk(fh, aead, prefix, index, current, header, last=False)
                current, index = following, index + 1
            _write_chunk(fh, aead, prefix, index, current, header, last=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return info


def _write_chunk(
    fh: BinaryIO, aead: AESGCM, prefix: bytes, index: int, data: bytes, header: bytes, *, last: bool
) -> None:
    ct = aead.encrypt(_nonce(prefix, index, last), data, header)
    fh.write(struct.pack(">I", len(ct)))
    fh.write(ct)


def read_header(path: Path) -> tuple[SnapshotInfo, bytes, int]:
    """The clear header of a snapshot, its raw bytes, and the offset of the first chunk.

    Raises:
        SnapshotRejected: not a snapshot, or a malformed header.
    """
    try:
        with path.open("rb") as fh:
            magic = fh.read(len(MAGIC))
            if magic != MAGIC:
                raise SnapshotRejected("not a Centinela snapshot")
            (hlen,) = struct.unpack(">I", fh.read(4))
            if hlen > 1 << 16:
                raise SnapshotRejected("snapshot header is malformed")
            header = fh.read(hlen)
            info = SnapshotInfo(**json.loads(header))
    except (OSError, struct.error, ValueError, TypeError) as exc:
        raise SnapshotRejected(f"snapshot header is unreadable: {exc.__class__.__name__}") from None
    return info, header, len(MAGIC) + 4 + hlen


def read_snapshot(
    path: Path,
    *,
    gallery: str,
    model_id: str,
    dim: int,
    owner: str,
    store_id: str,
    store_seq: int,
    key_lookup: Callable[[str], bytes],
    progress: Progress | None = None,
    num_threads: int = -1,
) -> FaceGallery:
    """Load and authenticate a snapshot; the returned gallery's ``applied_seq`` is its mark.

    ``key_lookup(key_id)`` returns the owner's data key with that id (raising if it is gone).
    ``progress(done_bytes, total_bytes)`` is called as chunks are decrypted.

    Raises:
        SnapshotRejected: corrupted, truncated, foreign (other gallery, model, store or
            owner), stale (mark beyond the store's) or unreadable (data key destroyed).
    """
    info, header, offset = read_header(path)
    expected = (gallery, model_id, dim, owner, store_id)
    found = (info.gallery, info.model_id, info.dim, info.owner, info.store_id)
    if found != expected:
        raise SnapshotRejected("snapshot belongs to another gallery, model, owner or store")
    if info.applied_seq > store_seq:
        raise SnapshotRejected("snapshot is ahead of the store (restored or foreign database)")
    try:
        aead = _snapshot_key(key_lookup(info.key_id), header)
    except Exception as exc:  # any failure to get the key means: cannot trust, rebuild
        raise SnapshotRejected(f"snapshot key unavailable: {exc.__class__.__name__}") from None
    total = path.stat().st_size
    plain = bytearray()
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            prefix = fh.read(7)
            index = 0
            done = False
            while not done:
                raw_len = fh.read(4)
                if len(raw_len) < 4:
                    raise SnapshotRejected("snapshot is truncated")
                (clen,) = struct.unpack(">I", raw_len)
                if clen > CHUNK + _TAG:
                    raise SnapshotRejected("snapshot chunk is malformed")
                ct = fh.read(clen)
                if len(ct) < clen:
                    raise SnapshotRejected("snapshot is truncated")
                try:
                    plain += aead.decrypt(_nonce(prefix, index, False), ct, header)
                except InvalidTag:
                    try:
                        plain += aead.decrypt(_nonce(prefix, index, True), ct, header)
                    except InvalidTag:
                        raise SnapshotRejected("snapshot failed authentication") from None
                    done = True
                index += 1
                if progress is not None:
                    progress(fh.tell(), total)
            if fh.read(1):
                raise SnapshotRejected("snapshot has trailing data")
    except OSError as exc:
        raise SnapshotRejected(f"snapshot unreadable: {exc.__class__.__name__}") from None
    try:
        meta, arrays = _parse(memoryview(plain))
        if meta.get("applied_seq") != info.applied_seq or meta.get("name") != gallery:
            raise SnapshotRejected("snapshot payload disagrees with its header")
        return FaceGallery.from_state(meta, arrays, num_threads=num_threads)
    except SnapshotRejected:
        raise
    except Exception as exc:
        raise SnapshotRejected(f"snapshot payload is malformed: {exc.__class__.__name__}") from None


def _parse(view: memoryview) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        if pos + n > len(view):
            raise ValueError("payload too short")
        out = view[pos : pos + n]
        pos += n
        return out

    (mlen,) = struct.unpack(">I", take(4))
    meta = json.loads(bytes(take(mlen)))
    (count,) = struct.unpack(">I", take(4))
    arrays: dict[str, npt.NDArray[Any]] = {}
    for _ in range(count):
        (nlen,) = struct.unpack(">H", take(2))
        name = bytes(take(nlen)).decode()
        (dlen,) = struct.unpack(">H", take(2))
        dtype = np.dtype(bytes(take(dlen)).decode())
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        (nbytes,) = struct.unpack(">Q", take(8))
        arrays[name] = np.frombuffer(take(nbytes), dtype=dtype)
    if pos != len(view):
        raise ValueError("payload has trailing bytes")
    return meta, arrays
