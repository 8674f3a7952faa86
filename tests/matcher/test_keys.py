"""The embedded key provider: file permissions, wrapping, rotation, retirement, destruction."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from centinela.errors import DecryptionError, InsecureKeyFile, KeyManagementError, KeyNotFound
from centinela.matcher.keys import FileKeyProvider, KeyProvider, WrappedKey

DEK = bytes(range(32))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_files_are_created_private(tmp_path: Path) -> None:
    kp = FileKeyProvider(tmp_path / "keys")
    assert _mode(tmp_path / "keys") == 0o700
    files = sorted((tmp_path / "keys").iterdir())
    ids = [kp.current_kek_id("pnp"), kp.current_kek_id("reniec")]
    assert [f.name for f in files] == [f"{i}.kek" for i in ids]
    assert all(_mode(f) == 0o600 for f in files)
    assert FileKeyProvider(tmp_path / "keys").current_kek_id("pnp") == ids[0]  # created once


def test_provider_satisfies_protocol(keys: FileKeyProvider) -> None:
    assert isinstance(keys, KeyProvider)


def test_group_readable_key_file_is_refused(tmp_path: Path) -> None:
    kp = FileKeyProvider(tmp_path / "keys")
    kek_id = kp.current_kek_id("pnp")
    os.chmod(tmp_path / "keys" / f"{kek_id}.kek", 0o640)
    with pytest.raises(InsecureKeyFile):
        FileKeyProvider(tmp_path / "keys")
    with pytest.raises(InsecureKeyFile):
        kp.wrap("pnp", DEK)


def test_world_writable_key_file_is_refused(tmp_path: Path) -> None:
    kp = FileKeyProvider(tmp_path / "keys")
    kek_id = kp.current_kek_id("reniec")
    os.chmod(tmp_path / "keys" / f"{kek_id}.kek", 0o602)  # noqa: S103 - the attack under test
    with pytest.raises(InsecureKeyFile):
        kp.wrap("reniec", DEK)


def test_open_key_directory_is_refused(tmp_path: Path) -> None:
    FileKeyProvider(tmp_path / "keys").current_kek_id("pnp")
    os.chmod(tmp_path / "keys", 0o755)  # noqa: S103 - the attack under test
    with pytest.raises(InsecureKeyFile):
        FileKeyProvider(tmp_path / "keys")


def test_wrap_unwrap_round_trip(keys: FileKeyProvider) -> None:
    w = keys.wrap("pnp", DEK)
    assert DEK not in w.blob
    assert keys.unwrap("pnp", w) == DEK


def test_wrapped_key_bound_to_owner(keys: FileKeyProvider) -> None:
    w = keys.wrap("pnp", DEK)
    with pytest.raises(KeyNotFound):
        keys.unwrap("reniec", w)  # the KEK id names another owner


def test_wrong_key_unwrap_fails(tmp_path: Path) -> None:
    """A wrapped key presented to another installation's KEK of the same id fails."""
    a = FileKeyProvider(tmp_path / "a")
    w = a.wrap("pnp", DEK)
    b_dir = tmp_path / "b"
    b = FileKeyProvider(b_dir)
    (b_dir / f"{w.kek_id}.kek").write_text(os.urandom(32).hex())
    os.chmod(b_dir / f"{w.kek_id}.kek", 0o600)
    with pytest.raises(DecryptionError):
        b.unwrap("pnp", w)
    tampered = WrappedKey(w.kek_id, w.blob[:-1] + bytes([w.blob[-1] ^ 1]))
    with pytest.raises(DecryptionError):
        a.unwrap("pnp", tampered)


def test_rotation_keeps_old_keys_until_retired(keys: FileKeyProvider) -> None:
    old = keys.wrap("pnp", DEK)
    new_id = keys.rotate_kek("pnp")
    assert keys.current_kek_id("pnp") == new_id != old.kek_id
    assert keys.unwrap("pnp", old) == DEK
    assert keys.wrap("pnp", DEK).kek_id == new_id
    with pytest.raises(KeyManagementError):
        keys.retire_kek("pnp", new_id)
    keys.retire_kek("pnp", old.kek_id)
    with pytest.raises(KeyNotFound):
        keys.unwrap("pnp", old)


def test_destroy_owner_makes_keys_unrecoverable(keys: FileKeyProvider) -> None:
    w = keys.wrap("pnp", DEK)
    other = keys.wrap("reniec", DEK)
    keys.destroy_owner("pnp")
    with pytest.raises(KeyNotFound):
        keys.unwrap("pnp", w)
    assert keys.unwrap("reniec", other) == DEK
    assert keys.current_kek_id("pnp") != w.kek_id  # a later use starts afresh


def test_owner_names_are_checked(keys: FileKeyProvider) -> None:
    with pytest.raises(KeyManagementError):
        keys.current_kek_id("../etc")
