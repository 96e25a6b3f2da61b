"""The last good configuration: a copy of the last configuration file that loaded.

An operator who saves the configuration with a mistake should not lose the gateway at the
next restart of one program (a crash, `supervisorctl restart`). Every gateway process, and
`plcbridge run`, saves the text of a file that loaded next to it, as
`.<file name>.last-good`. A process whose configuration then fails to load runs on that
copy and logs the error. `plcbridge run`, `check-config` and `check-credentials` never fall
back: they reject a bad file, so the operator sees the error before a deploy.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.atomic_file import write_atomically
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

    # The four processes start together and write the same text: the last rename wins.
    try:
        write_atomically(copy, data)
    except OSError as exc:
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


