"""Permission checks on the token server's key and secret files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from common.errors import ConfigError


def check_private_file(path: Path, key: str) -> None:
    """Raise ConfigError unless path is a regular file that only its owner can access.

    The owner must be the server's user or root. A file that the group or other users can
    read would expose a device key to every account on the host, and one they can write
    would let them swap the key.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: {key} not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot check {key}: {exc.strerror or exc}") from exc

    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: {key} is not a regular file")
    if info.st_mode & 0o077:
        raise ConfigError(
            f"{path}: {key} has mode {stat.S_IMODE(info.st_mode):04o}, so other users can "
            f"access it; run `chmod 600 {path}`"
        )
    if info.st_uid not in (os.geteuid(), 0):
        raise ConfigError(
            f"{path}: {key} belongs to user id {info.st_uid}, not to the token server's user "
            f"({os.geteuid()}) or root; change its owner"
        )
