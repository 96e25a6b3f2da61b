"""The last good configuration: a copy of the last configuration file that loaded.

An operator who saves the configuration with a mistake should not lose the gateway at the
next restart of one program (a crash, `supervisorctl restart`). Every gateway process, and
`plcbridge run`, saves the text of a file that loaded next to it, as
`.<file name>.last-good`. A process whose configuration then fails to load runs on that
copy and logs the error. `plcbridge run`, `check-config` and `check-credentials` never fall
back: they reject a bad file, so the operator sees the error before a deploy.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from common.config import Config, config_source, load_config, read_config_text
from common.errors import ConfigError, PlcBridgeError

SUFFIX = ".last-good"


def last_good_path(config_path: str | Path) -> Path:
    """Return where the last good copy of the configuration at config_path is kept."""
    source = config_source(config_path)
    return source.with_name(f".{source.name}{SUFFIX}")


def save_last_good(config: Config) -> bool:
    """Write config's text to its last good copy, unless the copy has it already.

    Return whether the copy was written. Raise PlcBridgeError naming the copy when the
    folder is not writable. The write is atomic: a reader sees the old copy or the new one.
    """
    copy = last_good_path(config.path)
    data = config.source_text.encode("utf-8")
    if _read_or_none(copy) == data:
        return False

    # The four processes start together, so each writes its own temporary file, named by
    # its process id. The last rename wins, and all of them write the same text.
    temporary = copy.with_name(f"{copy.name}.{os.getpid()}.tmp")
    try:
        _write_synced(temporary, data)
        os.replace(temporary, copy)
        _sync_folder(copy.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise PlcBridgeError(
            f"{copy}: cannot save the last good configuration: {exc.strerror or exc}"
        ) from exc
    return True


def load_config_or_last_good(config_path: str | Path) -> tuple[Config, ConfigError | None]:
    """Load the configuration, or its last good copy when the file itself is invalid.

    Return the configuration and the error that rejected the file, which is None when the
    file loaded. The copy is parsed as if it were at config_path, so relative paths mean
    what they meant there. Raise the file's ConfigError when there is no usable copy.
    """
    try:
        return load_config(config_path), None
    except ConfigError as exc:
        rejected = exc

    copy = last_good_path(config_path)
    if not os.path.exists(copy):
        raise rejected
    try:
        config = load_config(config_path, text=read_config_text(copy))
    except ConfigError as exc:
        raise ConfigError(
            f"{rejected}; the last good copy {copy} cannot be used either: {exc}"
        ) from exc
    return config, rejected


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _write_synced(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # A leftover temporary file of a crashed writer keeps its old mode, so set it again.
        os.fchmod(descriptor, 0o600)
        view = memoryview(data)
        while view:
            written = os.write(descriptor, view)
            view = view[written:]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_folder(folder: Path) -> None:
    # Without this, a power cut soon after the rename can leave the old copy in place.
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
