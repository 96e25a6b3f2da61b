"""The last good configuration copy: saved atomically when it changes, used when a file fails."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from common.config import load_config
from common.errors import ConfigError, PlcBridgeError
from common.last_good import last_good_path, load_config_or_last_good, save_last_good
from tests.test_config import MINIMAL, replace_once

TYPO = "colour = 'red'\n"


def write_config(folder: Path, text: str = MINIMAL) -> Path:
    path = folder / "plcbridge.toml"
    path.write_text(text)
    return path


def test_last_good_path_next_to_config(tmp_path: Path) -> None:
    assert last_good_path(tmp_path / "plcbridge.toml") == tmp_path / ".plcbridge.toml.last-good"


def test_last_good_path_stays_next_to_symlink(tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    releases.mkdir()
    real = write_config(releases)
    link = tmp_path / "current.toml"
    link.symlink_to(real)

    # Switching the link to another release must not lose the copy.
    assert last_good_path(link) == tmp_path / ".current.toml.last-good"


def test_last_good_save_writes_exact_text(tmp_path: Path) -> None:
    text = "# saved by an editor\r\n" + MINIMAL
    config = load_config(write_config(tmp_path, text))

    saved = save_last_good(config)

    copy = last_good_path(config.path)
    assert saved
    assert copy.read_bytes() == text.encode()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".plcbridge.toml.last-good", "plcbridge.toml",
    ]


def test_last_good_save_skips_same_content(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    save_last_good(config)
    before = last_good_path(config.path).stat()

    saved = save_last_good(config)

    after = last_good_path(config.path).stat()
    assert not saved
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_last_good_save_replaces_changed_content(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    save_last_good(load_config(path))
    changed = replace_once(MINIMAL, 'host = "127.0.0.1"', 'host = "10.0.0.9"')
    path.write_text(changed)

    saved = save_last_good(load_config(path))

    assert saved
    assert last_good_path(path).read_text() == changed


def test_last_good_save_failure_raises_and_cleans_up(tmp_path: Path) -> None:
    # Tests run as root, which writes into any folder, so a non-empty folder in the copy's
    # place is what makes the rename fail here.
    config = load_config(write_config(tmp_path))
    copy = last_good_path(config.path)
    copy.mkdir()
    (copy / "keep").write_text("x")

    with pytest.raises(PlcBridgeError) as caught:
        save_last_good(config)

    assert str(caught.value).startswith(f"{copy}: cannot save the last good configuration: ")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".plcbridge.toml.last-good", "plcbridge.toml",
    ]


def test_last_good_unused_for_valid_file(tmp_path: Path) -> None:
    path = write_config(tmp_path)

    config, rejected = load_config_or_last_good(path)

    assert rejected is None
    assert config.path == path


def test_last_good_used_for_invalid_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = write_config(folder)
    save_last_good(load_config(path))
    path.write_text(MINIMAL + TYPO)

    config, rejected = load_config_or_last_good(path)

    assert rejected is not None
    assert str(rejected).startswith(f"{path}: unknown key credentials.colour")
    assert config.path == path
    assert config.source_text == MINIMAL
    # Relative paths in the copy mean what they meant in the original file.
    assert config.credentials.ca_file == folder / "ca.pem"
    assert config.gateway.runtime_dir == folder / "run"


def test_last_good_used_for_missing_file(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    save_last_good(load_config(path))
    path.unlink()

    config, rejected = load_config_or_last_good(path)

    assert str(rejected) == f"{path}: configuration file not found"
    assert config.plc.host == "127.0.0.1"


def test_last_good_missing_raises_file_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + TYPO)

    with pytest.raises(ConfigError) as caught:
        load_config_or_last_good(path)

    assert str(caught.value) == (
        f"{path}: unknown key credentials.colour; check the spelling against "
        "docs/configuration.md"
    )


def test_last_good_invalid_copy_raises_both(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + TYPO)
    copy = last_good_path(path)
    copy.write_text(MINIMAL + "speed = 1\n")
    os.chmod(copy, 0o600)

    with pytest.raises(ConfigError) as caught:
        load_config_or_last_good(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: unknown key credentials.colour")
    assert f"; the last good copy {copy} cannot be used either: {path}: unknown key " \
        "credentials.speed" in message
