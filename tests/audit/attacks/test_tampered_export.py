"""Attacks on an export in the compliance officer's hands: each must make verify exit 1."""

from __future__ import annotations

import base64
import shutil

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from centinela.audit.checkpoint import Checkpoint, Signer, sign_checkpoint

from .conftest import Exported


def test_truncation_of_the_entries(exported: Exported, capsys: pytest.CaptureFixture[str]) -> None:
    exported.write_lines(exported.lines()[:45])
    assert exported.verify() == 1
    assert "missing from index 45" in capsys.readouterr().err


def test_truncation_mid_line(exported: Exported, capsys: pytest.CaptureFixture[str]) -> None:
    path = exported.dir / "entries.jsonl"
    path.write_bytes(path.read_bytes()[:-10])
    assert exported.verify() == 1
    assert "entry 49" in capsys.readouterr().err


def test_edited_entry(exported: Exported, capsys: pytest.CaptureFixture[str]) -> None:
    lines = exported.lines()
    lines[17] = lines[17].replace(b"NO_HIT", b"ALLOW_")
    exported.write_lines(lines)
    assert exported.verify() == 1
    err = capsys.readouterr().err
    assert "index 17" in err
    assert "expected root" in err


def test_edited_entry_and_forged_hints(
    exported: Exported, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rewriting leaf-hashes.bin to match does not help: the signed root still differs."""
    from centinela.audit.merkle import leaf_hash

    lines = exported.lines()
    lines[3] = lines[3].replace(b"NO_HIT", b"ALLOW_")
    exported.write_lines(lines)
    (exported.dir / "leaf-hashes.bin").write_bytes(b"".join(leaf_hash(x) for x in lines))
    assert exported.verify() == 1
    assert "differs from the signed root" in capsys.readouterr().err


def test_deleted_row(exported: Exported, capsys: pytest.CaptureFixture[str]) -> None:
    lines = exported.lines()
    del lines[20]
    exported.write_lines(lines)
    assert exported.verify() == 1
    assert "index 20" in capsys.readouterr().err


def test_reordered_entries(exported: Exported, capsys: pytest.CaptureFixture[str]) -> None:
    lines = exported.lines()
    lines[30], lines[31] = lines[31], lines[30]
    exported.write_lines(lines)
    assert exported.verify() == 1
    assert "index 30" in capsys.readouterr().err


def test_appended_entry(exported: Exported) -> None:
    exported.write_lines([*exported.lines(), exported.lines()[0]])
    assert exported.verify() == 1


def test_forged_signature(exported: Exported, capsys: pytest.CaptureFixture[str]) -> None:
    note = (exported.dir / "checkpoint").read_text()
    body, sig_line = note.rsplit("\n\n", 1)
    name, b64 = sig_line.rstrip("\n").split(" ")[1:]
    blob = bytearray(base64.b64decode(b64))
    blob[10] ^= 0x01  # keep the key id, break the signature
    (exported.dir / "checkpoint").write_text(
        f"{body}\n\n\u2014 {name} {base64.b64encode(bytes(blob)).decode()}\n"
    )
    assert exported.verify() == 1
    assert "SignatureError" in capsys.readouterr().err


def test_checkpoint_signed_by_an_impostor_key_with_the_same_name(exported: Exported) -> None:
    """Someone without the log key re-signs a rewritten checkpoint under the log's name."""
    impostor = Signer(exported.log.origin, Ed25519PrivateKey.generate())
    cp = Checkpoint(exported.log.origin, 50, b"\x00" * 32)
    (exported.dir / "checkpoint").write_text(sign_checkpoint(impostor, cp).note)
    assert exported.verify() == 1


def test_unknown_key_signature_ignored(exported: Exported) -> None:
    """A co-signature by a key the verifier does not know is ignored, not fatal."""
    note = (exported.dir / "checkpoint").read_text()
    text = note[: note.rindex("\n\n") + 1]
    witness = Signer("witness.example/w1", Ed25519PrivateKey.generate())
    extra = witness.sign(text)[len(text) + 1 :]
    (exported.dir / "checkpoint").write_text(note + extra)
    assert exported.verify() == 0
    # ... but a note signed only by unknown keys is refused.
    (exported.dir / "checkpoint").write_text(text + "\n" + extra)
    assert exported.verify() == 1


def test_checkpoint_for_another_origin(
    exported: Exported, capsys: pytest.CaptureFixture[str]
) -> None:
    """The right key signs a checkpoint of another log (another origin): refused."""
    log = exported.log
    signer = Signer(log.origin, log._signer._key)
    cp = Checkpoint("another.example/log", 50, log.root(50))
    (exported.dir / "checkpoint").write_text(sign_checkpoint(signer, cp).note)
    assert exported.verify() == 1
    assert "origin" in capsys.readouterr().err


def test_rollback(exported: Exported, capsys: pytest.CaptureFixture[str]) -> None:
    from centinela.audit.export import export_log

    from ..conftest import sample_entry

    older = exported.tmp / "older"
    shutil.copytree(exported.dir, older)
    for i in range(50, 60):
        exported.log.append_blocking(sample_entry(i))
    newer = exported.tmp / "newer"
    export_log(exported.log, newer)
    state = str(exported.tmp / "state.json")
    assert exported.verify("--state", state, target=newer) == 0
    capsys.readouterr()
    assert exported.verify("--state", state, target=older) == 1
    assert "rollback" in capsys.readouterr().err


def test_split_view(exported: Exported, capsys: pytest.CaptureFixture[str]) -> None:
    """Two checkpoints of one size, both validly signed by the log key, different roots."""
    log = exported.log
    state = str(exported.tmp / "state.json")
    assert exported.verify("--state", state) == 0
    lines = exported.lines()
    lines[49] = lines[49].replace(b"NO_HIT", b"ALLOW_")
    from centinela.audit.merkle import MerkleTree, leaf_hash

    forked_root = MerkleTree(leaf_hash(x) for x in lines).root()
    signer = Signer(log.origin, log._signer._key)
    fork = exported.tmp / "fork"
    shutil.copytree(exported.dir, fork)
    (fork / "entries.jsonl").write_bytes(b"".join(x + b"\n" for x in lines))
    (fork / "checkpoint").write_text(
        sign_checkpoint(signer, Checkpoint(log.origin, 50, forked_root)).note
    )
    assert exported.verify(target=fork) == 0  # on its own the fork looks fine...
    capsys.readouterr()
    assert exported.verify("--state", state, target=fork) == 1  # ...but not to a stateful verifier
    assert "split view" in capsys.readouterr().err


def test_fork_at_a_larger_size(exported: Exported, capsys: pytest.CaptureFixture[str]) -> None:
    """A later checkpoint whose tree rewrote history already trusted is refused."""
    log = exported.log
    state = str(exported.tmp / "state.json")
    assert exported.verify("--state", state) == 0
    lines = exported.lines()
    lines[2] = lines[2].replace(b"NO_HIT", b"ALLOW_")
    lines.append(lines[0])
    from centinela.audit.merkle import MerkleTree, leaf_hash

    tree = MerkleTree(leaf_hash(x) for x in lines)
    signer = Signer(log.origin, log._signer._key)
    fork = exported.tmp / "fork"
    fork.mkdir()
    (fork / "entries.jsonl").write_bytes(b"".join(x + b"\n" for x in lines))
    (fork / "checkpoint").write_text(
        sign_checkpoint(signer, Checkpoint(log.origin, 51, tree.root())).note
    )
    assert exported.verify("--state", state, target=fork) == 1
    assert "fork" in capsys.readouterr().err
