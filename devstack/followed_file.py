"""A small JSON or TOML file that an emulator follows while it runs, keeping the last good parse.

The file is checked with a stat call at every use and parsed again when its modification
time, size or inode changes. A missing file gives the default value. A file that fails to
parse is logged once and the previous value stays in force.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from common.logs import fields

Value = TypeVar("Value")

# The files followed here are a few kilobytes. A larger one is a mistake and is not read.
MAX_FOLLOWED_BYTES = 1024 * 1024


class FollowedFile(Generic[Value]):
    """The current parse of a file that may change at any time."""

    def __init__(self, path: Path | None, parse: Callable[[bytes], Value], default: Value,
                 name: str, logger: logging.Logger) -> None:
        self._path = path
        self._parse = parse
        self._default = default
        self._name = name
        self._logger = logger
        self._signature: tuple[int, int, int] | None = None
        self._value = default
        # Grows at each change of the value, so a user can reset state tied to the old one.
        self.generation = 0

    def current(self) -> Value:
        """Return the value in force, parsing the file again if it has changed."""
        if self._path is None:
            return self._value
        try:
            status = os.stat(self._path)
        except FileNotFoundError:
            if self._signature is not None or self._value is not self._default:
                self._set(None, self._default)
            return self._value
        except OSError as exc:
            self._logger.error("%s_unreadable %s", self._name,
                               fields(file=self._path, error=exc))
            return self._value

        signature = (status.st_mtime_ns, status.st_size, status.st_ino)
        if signature != self._signature:
            self._reload(signature)
        return self._value

    def _reload(self, signature: tuple[int, int, int]) -> None:
        assert self._path is not None
        self._signature = signature
        try:
            value = self._parse(_read_regular_file(self._path))
        except (OSError, ValueError, RecursionError) as exc:
            self._logger.error("%s_invalid %s; the previous %s stay in force", self._name,
                               fields(file=self._path, error=str(exc) or repr(exc)), self._name)
            return
        self._set(signature, value)

    def _set(self, signature: tuple[int, int, int] | None, value: Value) -> None:
        self._signature = signature
        self._value = value
        self.generation += 1
        self._logger.info("%s_loaded %s", self._name, fields(file=self._path, value=value))


def _read_regular_file(path: Path) -> bytes:
    """Read a small regular file; O_NONBLOCK keeps open() of a FIFO from stalling the loop."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as stream:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError("not a regular file")
        data = stream.read(MAX_FOLLOWED_BYTES + 1)
    if len(data) > MAX_FOLLOWED_BYTES:
        raise ValueError(f"larger than {MAX_FOLLOWED_BYTES} bytes")
    return data
