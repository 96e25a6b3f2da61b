"""The buffer's LMDB store: pages, unsealed batches, gap records and counters on disk.

The LMDB environment at <state_dir>/buffer/ has five named databases:

    pages  page_seq (8-byte big-endian) -> the page JSON from common.payload.build_page
    index  page_seq -> sample count and page size in bytes (two 4-byte big-endian integers),
           so that delivery and dropping never read a page to learn its size
    open   arrival number (8-byte big-endian) -> sample count (4 bytes) + JSON array of
           samples: the batches not yet sealed into a page, in arrival order
    gaps   page_seq -> a gap record: a page without samples that records what was dropped
           (docs/architecture.md gives its format). Gap records go out before every page.
    meta   next_page_seq, the reader's epoch and last committed batch_seq, the stored bytes,
           the dropped pages and samples in total and by reason, the drops not yet in a gap
           record, the samples rejected in the reader's epoch, and the wall-clock start
           time of the open page

buffer.max_bytes bounds the bytes of the stored values. The data file is larger by the
B-tree overhead and is bounded by the LMDB map size, about twice buffer.max_bytes.
"""

from __future__ import annotations

import bisect
import fcntl
import itertools
import json
import logging
import os
import re
import struct
import time
from collections.abc import Container, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lmdb

from common import payload
from common.config import BufferSettings
from common.errors import PlcBridgeError, StoreError
from common.logs import fields
from processes.buffer_files import (
    DATA_FILE,
    LOCK_FILE,
    DataFileInvalid,
    check_data_file,
    check_lock_file,
)

STORE_FORMAT = b"1"

SEQ = struct.Struct(">Q")  # page_seq and open-batch keys, big-endian so LMDB sorts them
INDEX = struct.Struct(">II")  # sample count, page bytes
COUNT = struct.Struct(">I")  # sample count in front of an open batch's JSON array
INGEST = struct.Struct(">qq")  # epoch and last committed batch_seq, or -1 for none yet
DROPPED = struct.Struct(">QQ")  # pages, samples

META_FORMAT = b"format"
META_NEXT_PAGE_SEQ = b"next_page_seq"
META_INGEST = b"ingest"
META_STORED_BYTES = b"stored_bytes"
META_DROPPED = b"dropped"
META_OPEN_STARTED_MS = b"open_started_ms"
META_DROPS = b"drops"  # JSON: reason -> [pages, samples, batches]
META_OPEN_GAPS = b"open_gaps"  # JSON: reason -> the gap record being collected
META_REJECTED = b"rejected"  # JSON: {"epoch", "samples", "batches"} under reject-new

# Drop reasons of pages, batches and samples. Each has its own counters and gap records.
REASON_MAX_BYTES = "max_bytes"
REASON_MAX_AGE = "max_age"
REASON_MAP_FULL = "map_full"
REASON_DISK_FULL = "disk_full"
REASON_SAMPLE_TOO_LARGE = "sample_too_large"
REASON_INVALID_BATCH = "invalid_batch"
DROP_REASONS = (REASON_MAX_BYTES, REASON_MAX_AGE, REASON_MAP_FULL, REASON_DISK_FULL,
                REASON_SAMPLE_TOO_LARGE, REASON_INVALID_BATCH)

# The sample keys written by common.payload. A JSON string escapes its quotes, so these
# byte strings can only be keys, never part of a tag name or a reason.
TS_MS_PATTERN = re.compile(rb'"ts_ms":(-?[0-9]+)')
EPOCH_PATTERN = re.compile(rb'"epoch":([0-9]+)')
TAIL_BYTES = 8192

# LMDB's flags for each buffer.sync mode: (sync, metasync).
SYNC_FLAGS = {"full": (True, True), "nometasync": (True, False), "off": (False, False)}

# The page size is computed before its page_seq is known, so it assumes the longest page_seq.
PAGE_OVERHEAD_BYTES = len(payload.build_page(2**64 - 1, []))

# Free space that the LMDB map keeps above twice buffer.max_bytes, for B-tree pages, the free
# list and the pages that one group commit writes before freed pages can be reused.
MAP_HEADROOM_BYTES = 64 << 20
MAX_READERS = 16
NAMED_DBS = 5

# A failed write on a filesystem with less free space than this is taken for a full disk.
# LMDB writes at most 64 pages of 4 KiB in one call, so a write that ran out of space
# leaves less than that free.
DISK_FULL_BYTES = 1 << 20

# The factor by which grow_map enlarges a full map.
MAP_GROWTH_FACTOR = 1.5


class StoreFull(StoreError):
    """The LMDB map or the disk is full, which deleting old pages or growing the map can fix."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # REASON_MAP_FULL or REASON_DISK_FULL


class StoreUnreadable(StoreError):
    """A store that LMDB cannot open safely: corrupt, truncated or of another format."""

    def __init__(self, message: str, files: tuple[str, ...] = (DATA_FILE, LOCK_FILE)) -> None:
        super().__init__(message)
        self.files = files  # the files to move aside before a new store can open


class BatchRejected(PlcBridgeError):
    """A batch whose payload is not a JSON array of sample objects."""


# -- LMDB store ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """Samples in the open page: a whole batch, or one part of a batch too big for a page."""

    key: int
    count: int
    array: bytes
    stored: bool  # written to the "open" database by an earlier transaction


@dataclass
class StoreState:
    """The in-memory copy of the store's counters and open page, as of the last commit."""

    next_page_seq: int = 0
    epoch: int = -1
    last_batch_seq: int = -1
    page_count: int = 0
    stored_bytes: int = 0
    dropped_pages: int = 0
    dropped_samples: int = 0
    open_chunks: list[Chunk] = field(default_factory=list)
    open_samples: int = 0
    open_array_bytes: int = 0
    open_started_ms: int = 0
    # reason -> [pages, samples, batches], in total since the store was created
    drops: dict[str, list[int]] = field(default_factory=dict)
    # reason -> the gap record collected since the last one was stored
    open_gaps: dict[str, dict[str, Any]] = field(default_factory=dict)
    gap_count: int = 0
    # Samples and batches that reject-new turned away in the reader's current epoch; every
    # ack carries them, so a lost ack loses no count.
    rejected_samples: int = 0
    rejected_batches: int = 0

    def copy(self) -> StoreState:
        return replace(
            self, open_chunks=list(self.open_chunks),
            drops={reason: list(counts) for reason, counts in self.drops.items()},
            open_gaps={reason: dict(gap) for reason, gap in self.open_gaps.items()},
        )

    def open_page_bytes(self, extra_chunks: int = 0, extra_array_bytes: int = 0) -> int:
        """Return the page size of the open chunks plus the given ones, as build_page joins them.

        Each chunk's array loses its two brackets and gains one comma, except the first.
        """
        chunks = len(self.open_chunks) + extra_chunks
        if chunks == 0:
            return PAGE_OVERHEAD_BYTES
        return PAGE_OVERHEAD_BYTES + self.open_array_bytes + extra_array_bytes - chunks - 1


class PageStore:
    """The LMDB environment of the buffer, with a committed StoreState kept in step with it."""

    def __init__(
        self, path: Path, settings: BufferSettings, logger: logging.Logger,
        map_size_bytes: int | None = None,
    ) -> None:
        self.path = path
        self.settings = settings
        self.logger = logger
        self.map_size_bytes = map_size_bytes or 2 * settings.max_bytes + MAP_HEADROOM_BYTES
        self._lock_file = self._lock_folder()
        try:
            self._check_file()
            self._fit_map_to_file()
            self._check_room_for_new_files()
            self.env = self._open_env()
        except StoreError:
            os.close(self._lock_file)
            raise
        try:
            self.pages = self.env.open_db(b"pages")
            self.index = self.env.open_db(b"index")
            self.open = self.env.open_db(b"open")
            self.gaps = self.env.open_db(b"gaps")
            self.meta = self.env.open_db(b"meta")
            self.state = self._load_state()
        except UNREADABLE_ERRORS as exc:
            self.close()
            raise StoreUnreadable(f"cannot read the LMDB store {self.path}: {exc}") from exc
        except lmdb.Error as exc:
            self.close()
            if self.disk_nearly_full():
                raise StoreFull(f"the disk of the LMDB store {self.path} is full: {exc}",
                                REASON_DISK_FULL) from exc
            raise StoreError(f"cannot read the LMDB store {self.path}: {exc}") from exc
        except StoreError:
            self.close()
            raise

    def _lock_folder(self) -> int:
        """Take an exclusive lock on the store, so that a second buffer process fails fast.

        LMDB serialises writers itself, but two buffers would each keep their own copy of the
        state and bind the same ipc:// endpoints.
        """
        lock_path = self.path / "owner.lock"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(
                f"cannot create the buffer store folder {self.path} or its lock file "
                f"{lock_path}: {exc.strerror}; check gateway.state_dir and its permissions"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StoreError(
                f"the buffer store {self.path} is locked by another buffer process; "
                "stop that process first"
            ) from exc
        return fd

    def _check_file(self) -> None:
        try:
            check_data_file(self.path)
        except DataFileInvalid as exc:
            raise StoreUnreadable(
                f"the LMDB data file {self.path / 'data.mdb'} is damaged: {exc}"
            ) from exc
        try:
            check_lock_file(self.path)
        except DataFileInvalid as exc:
            # The lock file contains no data, so the pages in data.mdb stay in the store.
            raise StoreUnreadable(f"the LMDB lock file is damaged: {exc}",
                                  files=(LOCK_FILE,)) from exc

    def _check_room_for_new_files(self) -> None:
        """Raise StoreFull when LMDB must create data.mdb or lock.mdb on a full disk.

        LMDB 0.9 extends a new lock.mdb with ftruncate and then writes to it through a
        shared memory map. On a full tmpfs that write raises SIGBUS, which kills Python
        before any error can be caught, so the free space is checked first.
        """
        missing = [name for name in (DATA_FILE, LOCK_FILE)
                   if _is_missing_or_empty(self.path / name)]
        if missing and self.disk_nearly_full():
            raise StoreFull(
                f"the disk of the LMDB store {self.path} is full, so LMDB cannot create "
                f"{' and '.join(missing)}: less than {DISK_FULL_BYTES} bytes are free",
                REASON_DISK_FULL,
            )

    def _fit_map_to_file(self) -> None:
        """Raise the map size to the data file's size plus MAP_HEADROOM_BYTES when the
        configured map leaves less room than that above the file.

        A map grown by grow_map is not stored in the configuration, so a restart requests the
        smaller map again. LMDB 0.9 then limits the map to the pages in use, and the first
        commit that needs a new page fails with MapFull, so the overflow policy would drop
        pages that fit before the restart.
        """
        try:
            file_bytes = (self.path / DATA_FILE).stat().st_size
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"cannot read the size of {self.path / DATA_FILE}: "
                             f"{exc.strerror or exc}") from exc
        if file_bytes + MAP_HEADROOM_BYTES <= self.map_size_bytes:
            return
        new_size = file_bytes + MAP_HEADROOM_BYTES
        self.logger.info("store_map_fitted %s", fields(
            path=self.path, configured_bytes=self.map_size_bytes, file_bytes=file_bytes,
            new_bytes=new_size))
        self.map_size_bytes = new_size

    def _open_env(self) -> lmdb.Environment:
        # sync "nometasync" skips the fsync of the meta page, so a power loss can undo the
        # last commit, already acknowledged to the reader, but the store stays consistent.
        # sync "off" skips both fsyncs. A killed process loses nothing either way, because
        # committed pages are in the OS page cache. A power loss or OS crash can lose the
        # last commits, and LMDB's documentation warns that the file can even be corrupted
        # if the filesystem reorders the writes.
        sync, metasync = SYNC_FLAGS[self.settings.sync]
        try:
            env = lmdb.open(
                str(self.path),
                map_size=self.map_size_bytes,
                max_readers=MAX_READERS,
                max_dbs=NAMED_DBS,
                sync=sync,
                metasync=metasync,
            )
            cleared = env.reader_check()
        except UNREADABLE_ERRORS as exc:
            raise StoreUnreadable(f"cannot open the LMDB store {self.path}: {exc}") from exc
        except lmdb.Error as exc:
            if self.disk_nearly_full():
                raise StoreFull(f"the disk of the LMDB store {self.path} is full: {exc}",
                                REASON_DISK_FULL) from exc
            raise StoreError(
                f"cannot open the LMDB store {self.path}: {exc}; check the folder's "
                "permissions and free disk space"
            ) from exc
        if cleared:
            self.logger.info("store_readers_cleared %s", fields(count=cleared))
        return env

    def _load_state(self) -> StoreState:
        state = StoreState()
        try:
            with self.env.begin(write=True) as txn:
                self._check_format(txn)
                self._load_meta(txn, state)
                self._load_open(txn, state)
                state.page_count = txn.stat(self.pages)["entries"]
                last_page = self._last_page_seq(txn)
        except lmdb.Error as exc:
            # A new store writes its format record, which fails on a full disk.
            if self.disk_nearly_full():
                raise StoreFull(f"the disk of the LMDB store {self.path} is full: {exc}",
                                REASON_DISK_FULL) from exc
            raise StoreError(f"cannot read the LMDB store {self.path}: {exc}") from exc

        # Every stored page is below next_page_seq. This is checked because a repeated
        # page_seq would make the cloud side drop new data as a duplicate.
        if last_page is not None and state.next_page_seq <= last_page:
            state.next_page_seq = last_page + 1
        return state

    def _check_format(self, txn: lmdb.Transaction[bytes]) -> None:
        found = txn.get(META_FORMAT, db=self.meta)
        if found is None:
            txn.put(META_FORMAT, STORE_FORMAT, db=self.meta)
        elif found != STORE_FORMAT:
            raise StoreUnreadable(
                f"the LMDB store {self.path} has format {found!r}, but this plcbridge reads "
                f"format {STORE_FORMAT!r}"
            )

    def _load_meta(self, txn: lmdb.Transaction[bytes], state: StoreState) -> None:
        def read(key: bytes, layout: struct.Struct, default: tuple[int, ...]) -> tuple[int, ...]:
            value = txn.get(key, db=self.meta)
            return default if value is None else layout.unpack(value)

        (state.next_page_seq,) = read(META_NEXT_PAGE_SEQ, SEQ, (0,))
        state.epoch, state.last_batch_seq = read(META_INGEST, INGEST, (-1, -1))
        (state.stored_bytes,) = read(META_STORED_BYTES, SEQ, (0,))
        state.dropped_pages, state.dropped_samples = read(META_DROPPED, DROPPED, (0, 0))
        (state.open_started_ms,) = read(META_OPEN_STARTED_MS, SEQ, (0,))
        state.drops = self._read_json(txn, META_DROPS, {})
        state.open_gaps = self._read_json(txn, META_OPEN_GAPS, {})
        rejected = self._read_json(txn, META_REJECTED, {})
        if rejected.get("epoch") == state.epoch:
            state.rejected_samples = rejected.get("samples", 0)
            state.rejected_batches = rejected.get("batches", 0)
        state.gap_count = txn.stat(self.gaps)["entries"]

    def _read_json(self, txn: lmdb.Transaction[bytes], key: bytes, default: Any) -> Any:
        value = txn.get(key, db=self.meta)
        if value is None:
            return default
        try:
            return json.loads(value)
        except ValueError as exc:
            raise StoreUnreadable(
                f"the LMDB store {self.path} has an invalid {key.decode()} record: {exc}"
            ) from exc

    def _load_open(self, txn: lmdb.Transaction[bytes], state: StoreState) -> None:
        for key, value in txn.cursor(db=self.open):
            (count,) = COUNT.unpack_from(value)
            chunk = Chunk(SEQ.unpack(key)[0], count, value[COUNT.size:], stored=True)
            state.open_chunks.append(chunk)
            state.open_samples += count
            state.open_array_bytes += len(chunk.array)

    def _last_page_seq(self, txn: lmdb.Transaction[bytes]) -> int | None:
        seqs = []
        for db in (self.pages, self.gaps):
            cursor = txn.cursor(db=db)
            if cursor.last():
                seqs.append(SEQ.unpack(cursor.key())[0])
        return max(seqs, default=None)

    @contextmanager
    def transaction(self) -> Iterator[StoreTransaction]:
        """Run one write transaction, whose state becomes self.state only when it commits.

        Raises StoreFull when the map or the disk is full, and StoreError for any other
        LMDB failure. Either way nothing of the transaction is stored.
        """
        try:
            with self.env.begin(write=True) as txn:
                work = StoreTransaction(self, txn, self.state.copy())
                yield work
                work.finish()
        except lmdb.MapFullError as exc:
            raise StoreFull(f"the LMDB map of {self.path} is full: {exc}",
                            REASON_MAP_FULL) from exc
        except lmdb.DiskError as exc:
            raise StoreFull(f"the disk of the LMDB store {self.path} is full: {exc}",
                            REASON_DISK_FULL) from exc
        except lmdb.Error as exc:
            # LMDB 0.9 reports a short write, which is how a full disk usually shows, as
            # EIO, so the free space distinguishes a full disk from a failing one.
            if self.disk_nearly_full():
                raise StoreFull(f"the disk of the LMDB store {self.path} is full: {exc}",
                                REASON_DISK_FULL) from exc
            raise StoreError(f"write to the LMDB store {self.path} failed: {exc}") from exc
        self.state = work.state

    def disk_nearly_full(self) -> bool:
        """Return whether the store's filesystem has less than DISK_FULL_BYTES free."""
        try:
            stat = os.statvfs(self.path)
        except OSError:
            return False
        return stat.f_bavail * stat.f_frsize < DISK_FULL_BYTES

    def iter_pages(
        self, after_seq: int, skip: Container[int]
    ) -> Generator[tuple[int, int, memoryview], None, None]:
        """Yield the pages above after_seq that are not in skip, oldest first, as
        (page_seq, count, JSON).

        All pages come from one read transaction, and each JSON buffer points into the LMDB
        map, so it is valid only until the next page is requested. Close the generator, for
        example with contextlib.closing, to end the transaction.
        """
        try:
            with self.env.begin(buffers=True) as txn:
                cursor = txn.cursor(db=self.index)
                positioned = cursor.set_range(SEQ.pack(after_seq + 1))
                while positioned:
                    seq: int = SEQ.unpack(cursor.key())[0]
                    if seq not in skip:
                        count: int = INDEX.unpack(cursor.value())[0]
                        page = txn.get(SEQ.pack(seq), db=self.pages)
                        if page is not None:
                            yield seq, count, page
                    positioned = cursor.next()
        except lmdb.Error as exc:
            raise StoreError(f"read from the LMDB store {self.path} failed: {exc}") from exc

    def iter_gaps(self, skip: Container[int]) -> list[tuple[int, bytes]]:
        """Return the stored gap records that are not in skip, oldest first."""
        if not self.state.gap_count:
            return []
        try:
            with self.env.begin() as txn:
                return [(SEQ.unpack(key)[0], value) for key, value in txn.cursor(db=self.gaps)
                        if SEQ.unpack(key)[0] not in skip]
        except lmdb.Error as exc:
            raise StoreError(f"read from the LMDB store {self.path} failed: {exc}") from exc

    def sample_times(self) -> tuple[int | None, int | None]:
        """Return the ts_ms of the oldest and the newest stored sample, None when empty."""
        state = self.state
        try:
            with self.env.begin(buffers=True) as txn:
                cursor = txn.cursor(db=self.pages)
                first_page = cursor.value() if cursor.first() else None
                oldest = sample_span(first_page)[0] if first_page is not None else None
                newest = None
                if cursor.last():
                    newest = sample_span(cursor.value())[1]
        except lmdb.Error as exc:
            raise StoreError(f"read from the LMDB store {self.path} failed: {exc}") from exc
        if state.open_chunks:
            oldest = oldest if oldest is not None else sample_span(state.open_chunks[0].array)[0]
            newest = sample_span(state.open_chunks[-1].array)[1]
        return oldest, newest

    def oldest_page_newest_ts(self, skip: Container[int]) -> int | None:
        """Return the ts_ms of the newest sample in the oldest page that is not in skip."""
        try:
            with self.env.begin(buffers=True) as txn:
                for key, value in txn.cursor(db=self.pages):
                    if SEQ.unpack(key)[0] not in skip:
                        return sample_span(value)[1]
        except lmdb.Error as exc:
            raise StoreError(f"read from the LMDB store {self.path} failed: {exc}") from exc
        return None

    def other_process_readers(self) -> list[str]:
        """Return the reader table rows of live processes other than this one."""
        try:
            self.env.reader_check()
            table = self.env.readers()
        except lmdb.Error as exc:
            raise StoreError(f"reader check of the LMDB store {self.path} failed: {exc}") from exc
        own = str(os.getpid())
        rows = table.splitlines()[1:]  # the first line is a heading
        return [row for row in rows if row.split() and row.split()[0] != own]

    def grow_map(self) -> bool:
        """Enlarge the map by half and return True, or return False while another process
        has the environment open, because LMDB requires that no other process maps it then.

        Call it only while no transaction of this process is open.
        """
        others = self.other_process_readers()
        if others:
            self.logger.warning(
                "store_map_not_grown %s: another process has the store open, so the map "
                "stays full and the overflow policy applies",
                fields(path=self.path, readers=len(others)))
            return False
        new_size = int(self.map_size_bytes * MAP_GROWTH_FACTOR)
        try:
            self.env.set_mapsize(new_size)
        except lmdb.Error as exc:
            raise StoreError(
                f"cannot grow the LMDB map of {self.path} to {new_size} bytes: {exc}"
            ) from exc
        self.logger.warning(
            "store_map_grown %s", fields(path=self.path, old_bytes=self.map_size_bytes,
                                         new_bytes=new_size)
        )
        self.map_size_bytes = new_size
        return True

    def clear_stale_readers(self) -> int:
        try:
            return self.env.reader_check()
        except lmdb.Error as exc:
            raise StoreError(f"reader check of the LMDB store {self.path} failed: {exc}") from exc

    def close(self) -> None:
        self.env.close()
        os.close(self._lock_file)


def _is_missing_or_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True


UNREADABLE_ERRORS = (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError,
                     lmdb.PageNotFoundError, lmdb.IncompatibleError, lmdb.BadValsizeError)


def sample_span(data: bytes | memoryview) -> tuple[int | None, int | None, int | None, int | None]:
    """Return the ts_ms of the first and the last sample in a page or batch, then the epoch
    of each, without parsing the JSON. A value is None when no sample has it."""
    first_ts = TS_MS_PATTERN.search(data)
    first_epoch = EPOCH_PATTERN.search(data)
    tail = bytes(data[-TAIL_BYTES:])
    last_ts = _last_match(TS_MS_PATTERN, tail) or _last_match(TS_MS_PATTERN, data)
    last_epoch = _last_match(EPOCH_PATTERN, tail) or _last_match(EPOCH_PATTERN, data)

    def number(match: re.Match[bytes] | None) -> int | None:
        return int(match.group(1)) if match else None

    return number(first_ts), number(last_ts), number(first_epoch), number(last_epoch)


def _last_match(pattern: re.Pattern[bytes], data: bytes | memoryview) -> re.Match[bytes] | None:
    last = None
    for last in pattern.finditer(data):  # noqa: B007 - the loop keeps the last match
        pass
    return last


class StoreTransaction:
    """One write transaction that stores batches, seals and deletes pages on a state copy."""

    def __init__(self, store: PageStore, txn: lmdb.Transaction[bytes], state: StoreState) -> None:
        self.store = store
        self.txn = txn
        self.state = state
        self.max_samples = store.settings.page_max_samples
        self.max_bytes = store.settings.page_max_bytes
        self.opened_page = False  # an empty open page received its first samples
        self.acked_samples = 0  # samples in the pages that delete_page deleted
        self.sealed_pages = 0

    def add_batch(self, count: int, array: bytes) -> int:
        """Add a batch's samples to the open page, sealing each page that fills up.

        Return the number of samples dropped because a single sample is larger than a page.
        Raise BatchRejected when the payload is not shaped like a JSON array of objects.
        """
        if array == b"[]":
            return 0
        # NOTE: parsing every batch would cost more CPU than the rest of the ingest. So only a
        # batch that must be split is parsed, and the others get this check of their shape.
        if not (array.startswith(b"[{") and array.endswith(b"}]")):
            raise BatchRejected("payload is not a JSON array of sample objects")
        if self._fits(count, len(array)):
            self._append(count, array)
            return 0

        state = self.state
        fits_empty_page = (
            count <= self.max_samples
            and PAGE_OVERHEAD_BYTES + len(array) - 2 <= self.max_bytes
        )
        if state.open_chunks and fits_empty_page:
            self.seal()
            self._append(count, array)
            return 0

        samples = split_samples(array, count)
        if samples is None:
            raise BatchRejected("payload is not a JSON array of sample objects")
        self.seal()
        return self._add_samples(samples)

    def _fits(self, count: int, array_bytes: int) -> bool:
        state = self.state
        return (
            state.open_samples + count <= self.max_samples
            and state.open_page_bytes(1, array_bytes) <= self.max_bytes
        )

    def _append(self, count: int, array: bytes) -> None:
        state = self.state
        if not state.open_chunks:
            self.opened_page = True
            state.open_started_ms = int(time.time() * 1000)
        key = state.open_chunks[-1].key + 1 if state.open_chunks else 0
        state.open_chunks.append(Chunk(key, count, array, stored=False))
        state.open_samples += count
        state.open_array_bytes += len(array)
        state.stored_bytes += len(array)

    def _add_samples(self, samples: list[bytes]) -> int:
        """Pack samples into as few pages as the bounds allow, sealing each full page."""
        # ends[k] is the size of samples[:k] with one comma after each sample, so a run
        # samples[i:j] as a JSON array takes ends[j] - ends[i] + 1 bytes.
        ends = [0, *itertools.accumulate(len(sample) + 1 for sample in samples)]
        dropped = 0
        start = 0
        while start < len(samples):
            state = self.state
            room_samples = self.max_samples - state.open_samples
            room_bytes = self.max_bytes - state.open_page_bytes(1, 1)
            stop = bisect.bisect_right(ends, ends[start] + room_bytes) - 1
            stop = min(stop, start + room_samples, len(samples))

            if stop > start:
                array = b"[" + b",".join(samples[start:stop]) + b"]"
                self._append(stop - start, array)
                start = stop
            elif state.open_chunks:
                self.seal()
            else:
                self.count_drop(REASON_SAMPLE_TOO_LARGE, samples=1,
                                span=sample_span(samples[start]))
                dropped += 1  # one sample larger than an empty page
                start += 1
        return dropped

    def seal(self) -> None:
        """Write the open chunks as one page and empty the open page."""
        state = self.state
        if not state.open_chunks:
            return
        seq = state.next_page_seq
        key = SEQ.pack(seq)
        page = payload.build_page(seq, [chunk.array for chunk in state.open_chunks])
        self.txn.put(key, page, append=True, db=self.store.pages)
        self.txn.put(key, INDEX.pack(state.open_samples, len(page)), append=True,
                     db=self.store.index)
        if any(chunk.stored for chunk in state.open_chunks):
            self.txn.drop(self.store.open, delete=False)

        state.next_page_seq += 1
        state.page_count += 1
        self.sealed_pages += 1
        state.stored_bytes += len(page) - state.open_array_bytes
        state.open_chunks = []
        state.open_samples = 0
        state.open_array_bytes = 0

    def delete_page(self, seq: int) -> bool:
        """Delete one page or gap record and return whether it was stored."""
        key = SEQ.pack(seq)
        entry = self.txn.get(key, db=self.store.index)
        if entry is None:
            if not self.txn.delete(key, db=self.store.gaps):
                return False
            self.state.gap_count -= 1
            return True
        count, page_bytes = INDEX.unpack(entry)
        self._delete(key, page_bytes)
        self.acked_samples += count
        return True

    def _delete(self, key: bytes, page_bytes: int) -> None:
        self.txn.delete(key, db=self.store.pages)
        self.txn.delete(key, db=self.store.index)
        self.state.page_count -= 1
        self.state.stored_bytes -= page_bytes

    def drop_oldest(
        self, bytes_to_free: int, protected: set[int], reason: str
    ) -> list[tuple[int, int]]:
        """Delete the oldest pages until bytes_to_free are freed, and return (page_seq, count).

        Pages in protected (those the uplink is sending) go only when the others are not
        enough. Each page is counted as dropped for reason.
        """
        victims: list[tuple[bytes, int, int, int]] = []
        freed = 0
        for skip_protected in (True, False):
            chosen = {seq for _key, seq, _count, _bytes in victims}
            for key, value in self.txn.cursor(db=self.store.index):
                if freed >= bytes_to_free:
                    break
                seq = SEQ.unpack(key)[0]
                if seq in chosen or (skip_protected and seq in protected):
                    continue
                count, page_bytes = INDEX.unpack(value)
                victims.append((key, seq, count, page_bytes))
                freed += page_bytes

        for key, seq, count, page_bytes in victims:
            self._drop_page(key, seq, count, page_bytes, reason)
        return [(seq, count) for _key, seq, count, _bytes in victims]

    def drop_expired(self, oldest_ms: int, protected: set[int]) -> list[tuple[int, int]]:
        """Delete the oldest pages whose newest sample is older than oldest_ms.

        The pages in protected are kept, because the uplink is sending them.
        """
        victims = []
        for key, value in self.txn.cursor(db=self.store.index):
            seq = SEQ.unpack(key)[0]
            if seq in protected:
                continue
            page = self.txn.get(key, db=self.store.pages)
            newest = sample_span(page)[1] if page is not None else None
            if newest is None or newest >= oldest_ms:
                break
            count, page_bytes = INDEX.unpack(value)
            victims.append((key, seq, count, page_bytes))
        for key, seq, count, page_bytes in victims:
            self._drop_page(key, seq, count, page_bytes, REASON_MAX_AGE)
        return [(seq, count) for _key, seq, count, _bytes in victims]

    def _drop_page(self, key: bytes, seq: int, count: int, page_bytes: int, reason: str) -> None:
        page = self.txn.get(key, db=self.store.pages)
        span = sample_span(page) if page is not None else (None, None, None, None)
        self._delete(key, page_bytes)
        self.count_drop(reason, pages=1, samples=count, span=span, page_seq=seq)

    def reject_batch(self, count: int, array: bytes, reason: str) -> None:
        """Count a batch that the reject-new policy turns away."""
        self.count_drop(reason, samples=count, batches=1, span=sample_span(array))
        self.state.rejected_samples += count
        self.state.rejected_batches += 1

    def count_drop(
        self, reason: str, pages: int = 0, samples: int = 0, batches: int = 0,
        span: tuple[int | None, ...] = (None, None, None, None), page_seq: int | None = None,
    ) -> None:
        """Add a drop to the totals and to the gap record of its reason."""
        state = self.state
        state.dropped_pages += pages
        state.dropped_samples += samples
        totals = state.drops.setdefault(reason, [0, 0, 0])
        totals[0] += pages
        totals[1] += samples
        totals[2] += batches

        gap = state.open_gaps.setdefault(reason, new_gap(reason))
        gap["pages"] += pages
        gap["samples"] += samples
        gap["batches"] += batches
        first_ts, last_ts, first_epoch, last_epoch = span
        widen(gap, "first_ts_ms", first_ts, min)
        widen(gap, "last_ts_ms", last_ts, max)
        widen(gap, "first_epoch", first_epoch, min)
        widen(gap, "last_epoch", last_epoch, max)
        widen(gap, "first_page_seq", page_seq, min)
        widen(gap, "last_page_seq", page_seq, max)

    def seal_gaps(self) -> int:
        """Store each open gap as a gap record with its own page_seq, and return how many."""
        state = self.state
        sealed = 0
        for reason in sorted(state.open_gaps):
            gap = state.open_gaps[reason]
            gap["recorded_ms"] = int(time.time() * 1000)
            seq = state.next_page_seq
            self.txn.put(SEQ.pack(seq), build_gap_page(seq, gap), db=self.store.gaps)
            state.next_page_seq += 1
            state.gap_count += 1
            sealed += 1
        state.open_gaps = {}
        return sealed

    def finish(self) -> None:
        """Write the open chunks that are new in this transaction, then the meta values."""
        state = self.state
        for position, chunk in enumerate(state.open_chunks):
            if chunk.stored:
                continue
            value = COUNT.pack(chunk.count) + chunk.array
            self.txn.put(SEQ.pack(chunk.key), value, append=True, db=self.store.open)
            state.open_chunks[position] = replace(chunk, stored=True)

        meta = self.store.meta
        self.txn.put(META_NEXT_PAGE_SEQ, SEQ.pack(state.next_page_seq), db=meta)
        self.txn.put(META_INGEST, INGEST.pack(state.epoch, state.last_batch_seq), db=meta)
        self.txn.put(META_STORED_BYTES, SEQ.pack(state.stored_bytes), db=meta)
        self.txn.put(META_DROPPED, DROPPED.pack(state.dropped_pages, state.dropped_samples),
                     db=meta)
        self.txn.put(META_OPEN_STARTED_MS, SEQ.pack(state.open_started_ms), db=meta)
        self.txn.put(META_DROPS, compact_json(state.drops), db=meta)
        self.txn.put(META_OPEN_GAPS, compact_json(state.open_gaps), db=meta)
        rejected = {"epoch": state.epoch, "samples": state.rejected_samples,
                    "batches": state.rejected_batches}
        self.txn.put(META_REJECTED, compact_json(rejected), db=meta)


def compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def new_gap(reason: str) -> dict[str, Any]:
    return {"reason": reason, "pages": 0, "samples": 0, "batches": 0,
            "first_ts_ms": None, "last_ts_ms": None, "first_epoch": None, "last_epoch": None,
            "first_page_seq": None, "last_page_seq": None}


def widen(gap: dict[str, Any], key: str, value: int | None, pick: Any) -> None:
    """Extend one bound of a gap record's range with value, using min or max as pick."""
    if value is not None:
        gap[key] = value if gap[key] is None else pick(gap[key], value)


def build_gap_page(page_seq: int, gap: dict[str, Any]) -> bytes:
    """Build a gap record: a page with no samples and a "gap" object, sent like any page."""
    page = {"page_seq": page_seq, "samples": [], "gap": gap}
    return json.dumps(page, separators=(",", ":")).encode()


def split_samples(array: bytes, count: int) -> list[bytes] | None:
    """Split a batch's JSON array into the JSON objects of its samples.

    The fast path cuts at "},{", which the compact encoding of common.payload puts between
    two samples. A "},{" inside a string makes more pieces than the header's count, and then
    the slow path parses the array. Return None when the array is not valid JSON.
    """
    body = array[1:-1]
    if body.startswith(b"{") and body.endswith(b"}"):
        pieces = body[1:-1].split(b"},{")
        if len(pieces) == count:
            return [b"{%s}" % piece for piece in pieces]

    try:
        samples = json.loads(array)
    except ValueError:
        return None
    if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
        return None
    return [json.dumps(sample, separators=(",", ":")).encode() for sample in samples]
