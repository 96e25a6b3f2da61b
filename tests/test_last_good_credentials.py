"""The last good credential store: private copies, whole-set saves, damaged sets rejected."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import CredentialSettings
from common.last_good_credentials import (
    MANIFEST_FILE,
    STORE_FOLDER,
    LastGoodError,
    LastGoodStore,
    changed_roles,
    read_snapshot,
)
from tests.gateway_files import REPO


def credential_files(folder: Path, key: str = "old") -> CredentialSettings:
    folder.mkdir(exist_ok=True)
    connection = folder / "connection-string.txt"
    connection.write_text(f"HostName=hub;DeviceId=gw;SharedAccessKey={key}\n")
    ca = folder / "ca.pem"
    ca.write_text(f"-----BEGIN CERTIFICATE-----\n{key}\n-----END CERTIFICATE-----\n")
    return CredentialSettings(
        connection_string_file=connection, ca_file=ca, client_cert_file=None,
        client_key_file=None, password_file=None, check_interval_s=1.0,
        rehash_interval_s=60.0, sas_warning_days=7.0,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_store_save_copies_every_file_private(tmp_path: Path) -> None:
    settings = credential_files(tmp_path / "etc")
    store = LastGoodStore(tmp_path / "state")

    saved = store.save(read_snapshot(settings))

    stored = store.load()
    assert saved
    assert stored is not None
    assert sorted(stored.files) == ["ca_file", "connection_string_file"]
    for role, source in (("ca_file", settings.ca_file),
                         ("connection_string_file", settings.connection_string_file)):
        copy = stored.files[role].copy
        assert source is not None
        assert copy.read_bytes() == source.read_bytes()
        assert mode(copy) == 0o600
        assert stored.files[role].source == source
        assert stored.files[role].sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert mode(store.folder) == 0o700
    assert mode(stored.folder) == 0o700
    assert mode(store.manifest) == 0o600


def test_store_settings_point_at_copies(tmp_path: Path) -> None:
    settings = credential_files(tmp_path / "etc")
    store = LastGoodStore(tmp_path / "state")
    store.save(read_snapshot(settings))
    stored = store.load()
    assert stored is not None

    fallback = stored.settings(settings)

    assert fallback.ca_file == stored.folder / "ca.pem"
    assert fallback.connection_string_file == stored.folder / "connection-string"
    assert fallback.sas_warning_days == settings.sas_warning_days


def test_store_same_set_not_rewritten(tmp_path: Path) -> None:
    settings = credential_files(tmp_path / "etc")
    store = LastGoodStore(tmp_path / "state")
    store.save(read_snapshot(settings))
    before = store.manifest.stat()

    saved = store.save(read_snapshot(settings))

    after = store.manifest.stat()
    assert not saved
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_store_new_set_replaces_old_whole(tmp_path: Path) -> None:
    settings = credential_files(tmp_path / "etc", key="old")
    store = LastGoodStore(tmp_path / "state")
    store.save(read_snapshot(settings))
    old = store.load()
    assert old is not None
    credential_files(tmp_path / "etc", key="new")

    saved = store.save(read_snapshot(settings))

    new = store.load()
    assert saved
    assert new is not None
    assert new.folder != old.folder
    assert not old.folder.exists()
    assert b"new" in new.files["connection_string_file"].copy.read_bytes()
    assert b"new" in new.files["ca_file"].copy.read_bytes()
    assert sorted(entry.name for entry in store.folder.iterdir()) == [
        MANIFEST_FILE, new.folder.name]


def test_store_changed_copy_rejected(tmp_path: Path) -> None:
    """A copy from another set, as a half-finished manual restore would leave, is refused."""
    settings = credential_files(tmp_path / "etc")
    store = LastGoodStore(tmp_path / "state")
    store.save(read_snapshot(settings))
    stored = store.load()
    assert stored is not None
    stored.files["ca_file"].copy.write_text("another CA\n")

    with pytest.raises(LastGoodError) as caught:
        store.load()

    assert str(caught.value) == (
        f"{stored.files['ca_file'].copy}: copy of {settings.ca_file} does not match the "
        f"SHA-256 recorded in {store.manifest}")


def test_store_missing_copy_rejected(tmp_path: Path) -> None:
    settings = credential_files(tmp_path / "etc")
    store = LastGoodStore(tmp_path / "state")
    store.save(read_snapshot(settings))
    stored = store.load()
    assert stored is not None
    stored.files["connection_string_file"].copy.unlink()

    with pytest.raises(LastGoodError) as caught:
        store.load()

    assert str(caught.value).startswith(
        f"{stored.files['connection_string_file'].copy}: copy of "
        f"{settings.connection_string_file} cannot be read: ")


# Saves a new set in a process that SIGKILLs itself just before the manifest is replaced,
# the one moment when the new set is complete on disk but not yet the last good set.
KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
import common.last_good_credentials as module
from tests.test_last_good_credentials import credential_files

def killed(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

module.write_atomically = killed
settings = credential_files(Path(sys.argv[1]) / "etc", key="new")
module.LastGoodStore(Path(sys.argv[1]) / "state").save(module.read_snapshot(settings))
"""


def test_store_killed_save_keeps_old_set(tmp_path: Path) -> None:
    settings = credential_files(tmp_path / "etc", key="old")
    store = LastGoodStore(tmp_path / "state")
    store.save(read_snapshot(settings))

    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], cwd=REPO,
                            capture_output=True, timeout=60, check=False)

    assert result.returncode == -signal.SIGKILL, result.stderr
    stored = store.load()
    assert stored is not None
    assert b"old" in stored.files["connection_string_file"].copy.read_bytes()
    assert b"old" in stored.files["ca_file"].copy.read_bytes()
    # The killed save did write its whole set folder, which the next save replaces.
    assert len([entry for entry in store.folder.iterdir() if entry.is_dir()]) == 2


def test_store_crash_leftovers_removed_next_save(tmp_path: Path) -> None:
    settings = credential_files(tmp_path / "etc", key="old")
    store = LastGoodStore(tmp_path / "state")
    store.save(read_snapshot(settings))
    leftover = store.folder / ".set-0123456789abcdef.999999.tmp"
    leftover.mkdir()
    (leftover / "connection-string").write_text("half written")
    credential_files(tmp_path / "etc", key="new")

    store.save(read_snapshot(settings))

    assert not leftover.exists()


def test_store_manifest_written_atomically(tmp_path: Path) -> None:
    """The manifest is replaced by a rename, so a reader holding it open keeps the old one."""
    settings = credential_files(tmp_path / "etc", key="old")
    store = LastGoodStore(tmp_path / "state")
    store.save(read_snapshot(settings))
    with store.manifest.open("rb") as old_manifest:
        old_inode = os.fstat(old_manifest.fileno()).st_ino
        credential_files(tmp_path / "etc", key="new")

        store.save(read_snapshot(settings))

        assert store.manifest.stat().st_ino != old_inode
        assert json.loads(old_manifest.read())["set"] != json.loads(
            store.manifest.read_bytes())["set"]


def test_store_empty_returns_none(tmp_path: Path) -> None:
    assert LastGoodStore(tmp_path / "state").load() is None


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"version": 1}',
                                     b'{"version": 1, "set": "../etc", "saved_ms": 0, '
                                     b'"files": {}}'])
def test_store_invalid_manifest_rejected(tmp_path: Path, content: bytes) -> None:
    store = LastGoodStore(tmp_path / "state")
    store.folder.mkdir(parents=True)
    store.manifest.write_bytes(content)

    with pytest.raises(LastGoodError) as caught:
        store.load()

    assert str(caught.value).startswith(f"{store.manifest}: invalid content: ")


def test_store_unwritable_raises_naming_folder(tmp_path: Path) -> None:
    settings = credential_files(tmp_path / "etc")
    state = tmp_path / "state"
    state.mkdir()
    # A file where the folder should be makes the save fail, even for root.
    (state / STORE_FOLDER).write_text("not a folder")

    with pytest.raises(LastGoodError) as caught:
        LastGoodStore(state).save(read_snapshot(settings))

    assert str(caught.value).startswith(
        f"{state / STORE_FOLDER}: cannot save the last good credentials: ")


def test_store_errors_never_quote_secrets(tmp_path: Path) -> None:
    settings = credential_files(tmp_path / "etc", key="SECRETKEY")
    store = LastGoodStore(tmp_path / "state")
    store.save(read_snapshot(settings))
    stored = store.load()
    assert stored is not None
    stored.files["connection_string_file"].copy.write_text("SECRETKEY2")

    with pytest.raises(LastGoodError) as caught:
        store.load()

    assert "SECRETKEY" not in str(caught.value)
    assert "SECRETKEY" not in store.manifest.read_text()


def test_changed_roles_names_differing_files() -> None:
    current = {"connection_string_file": "a", "ca_file": "b"}
    stored = {"connection_string_file": "a", "ca_file": "c", "client_key_file": "d"}

    assert changed_roles(current, stored) == ["ca_file", "client_key_file"]
