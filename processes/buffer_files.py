"""Checks of the buffer's LMDB data file before it is mapped, and moving a bad store aside.

LMDB maps data.mdb into memory. A page that the meta page points to but that lies beyond the
end of a truncated file raises SIGBUS on first access, which Python cannot catch, so the
buffer would die at every start. check_data_file reads the two meta pages with plain reads
and compares the file size with the last page that the committed meta page uses.
"""

from __future__ import annotations

import os
import stat
import struct
import time
from pathlib import Path

DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"

# The meta page layout of 64-bit LMDB 0.9 builds, data version 1: a 16-byte page header
# (mp_pgno, mp_pad, mp_flags, mp_lower, mp_upper), then MDB_meta: mm_magic, mm_version,
# mm_address, mm_mapsize, two 48-byte MDB_db records, mm_last_pg and mm_txnid. The page
# size is stored in the md_pad field of the first MDB_db record (the free list database).
PAGE_HEADER = struct.Struct("=QHHHH")
META = struct.Struct("=IIQQ")
PAGE_SIZE_FIELD = struct.Struct("=I")
LAST_PAGE_AND_TXNID = struct.Struct("=QQ")
META_OFFSET = PAGE_HEADER.size
DBS_OFFSET = META_OFFSET + META.size
LAST_PAGE_OFFSET = DBS_OFFSET + 2 * 48
META_BYTES = LAST_PAGE_OFFSET + LAST_PAGE_AND_TXNID.size

MDB_MAGIC = 0xBEEFC0DE
MDB_DATA_VERSION = 1
P_META = 0x08
MIN_PAGE_SIZE = 256
MAX_PAGE_SIZE = 0x8000


class DataFileInvalid(Exception):
    """The data file cannot be opened by LMDB without risking a crash."""


def check_data_file(folder: Path) -> None:
    """Raise DataFileInvalid when folder/data.mdb is not a complete LMDB 0.9 data file.

    A missing or empty file passes, because LMDB creates a new store then.
    """
    path = folder / DATA_FILE
    _check_regular_file(path)
    try:
        with path.open("rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            if size == 0:
                return
            first = stream.read(META_BYTES)
            page_size = _page_size(first)
            stream.seek(page_size)
            second = stream.read(META_BYTES)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DataFileInvalid(f"cannot read it: {exc.strerror or exc}") from exc

    metas = [_parse_meta(0, first), _parse_meta(1, second)]

    # LMDB uses the meta page with the higher transaction id. Its last page must be in the
    # file, because otherwise reading the B-tree can reach past the end.
    last_page, _txnid = max(metas, key=lambda meta: meta[1])
    needed = (last_page + 1) * page_size
    if size < needed:
        _verify_short_file(folder, size, needed)


def _check_regular_file(path: Path) -> None:
    """Raise DataFileInvalid when path exists but is not a regular file, or is a symbolic
    link to nothing.

    Opening a FIFO would block the buffer for ever, and LMDB would create a new, empty
    store at the target of a dangling link, for example on a card that is not mounted.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DataFileInvalid(f"cannot read it: {exc.strerror or exc}") from exc
    if stat.S_ISLNK(mode):
        target = os.readlink(path)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise DataFileInvalid(
                f"it is a symbolic link to {target}, which does not exist, so the storage "
                "that contains it may not be mounted"
            ) from None
        except OSError as exc:
            raise DataFileInvalid(f"cannot read its link target {target}: "
                                  f"{exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        raise DataFileInvalid("it is not a regular file")


def check_lock_file(folder: Path) -> None:
    """Raise DataFileInvalid when folder/lock.mdb exists but is not a regular file.

    LMDB rebuilds the lock file's contents when no process has it open, so only its type
    can keep LMDB from opening the store.
    """
    path = folder / LOCK_FILE
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DataFileInvalid(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        raise DataFileInvalid(f"{path} is not a regular file")


def _page_size(first: bytes) -> int:
    if len(first) < META_BYTES:
        raise DataFileInvalid(f"{len(first)} bytes are too short for an LMDB meta page")
    (page_size,) = PAGE_SIZE_FIELD.unpack_from(first, DBS_OFFSET)
    if page_size & (page_size - 1) or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
        raise DataFileInvalid(f"meta page 0 has an invalid page size {page_size}")
    return page_size


def _parse_meta(number: int, data: bytes) -> tuple[int, int]:
    """Return the last page number and the transaction id of one meta page."""
    if len(data) < META_BYTES:
        raise DataFileInvalid(f"meta page {number} is cut off by the end of the file")
    _pgno, _pad, flags, _lower, _upper = PAGE_HEADER.unpack_from(data)
    magic, version, _address, _map_size = META.unpack_from(data, META_OFFSET)
    if not flags & P_META or magic != MDB_MAGIC:
        raise DataFileInvalid(f"page {number} is not an LMDB meta page")
    if version != MDB_DATA_VERSION:
        raise DataFileInvalid(
            f"meta page {number} has LMDB data version {version}, but this LMDB reads "
            f"version {MDB_DATA_VERSION}"
        )
    last_page, txnid = LAST_PAGE_AND_TXNID.unpack_from(data, LAST_PAGE_OFFSET)
    return last_page, txnid


def _verify_short_file(folder: Path, size: int, needed: int) -> None:
    """Walk a file that is shorter than its meta page records, without mapping it.

    LMDB may leave pages at the end unwritten when a transaction freed them again, so a
    short file can still be sound. lmdb.verify (py-lmdb 3.0 and newer) reads every page
    that the B-trees reach and reports those beyond the end of the file.
    """
    try:
        from lmdb import verify
    except ImportError:
        raise DataFileInvalid(
            f"the file has {size} bytes, but its meta page uses {needed}"
        ) from None
    try:
        problems = verify.verify(str(folder))
    except (verify.VerifyError, OSError) as exc:
        raise DataFileInvalid(str(exc)) from exc
    if problems:
        raise DataFileInvalid(
            f"the file has {size} bytes, but its meta page uses {needed}, and "
            f"{len(problems)} problems were found, the first: {problems[0]}"
        )


def move_aside(
    folder: Path, names: tuple[str, ...] = (DATA_FILE, LOCK_FILE)
) -> list[tuple[Path, Path]]:
    """Rename the files names in folder with a UTC timestamp, and return the renames.

    The files are never deleted, so an operator can still copy data out of them.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for name in names:
        source = folder / name
        if not os.path.lexists(source):
            continue
        target = folder / f"{name}.unreadable-{stamp}"
        suffix = 1
        while os.path.lexists(target):
            target = folder / f"{name}.unreadable-{stamp}-{suffix}"
            suffix += 1
        os.rename(source, target)
        moved.append((source, target))
    return moved
