"""The store-and-forward buffer: commits the reader's batches to LMDB and hands pages to the uplink.

Run as ``python -m processes.buffer --config FILE``. The buffer binds the "ingest" and
"delivery" ROUTER sockets of common/wire.py. It acknowledges a batch only after the LMDB
transaction that stores it has committed. It seals stored batches into pages of at most
buffer.page_max_samples samples and buffer.page_max_bytes bytes, and deletes a page only when
the uplink reports that the broker acknowledged it. When the stored pages and batches grow
above buffer.max_bytes, the oldest pages are deleted, counted and reported in a WARNING.

The LMDB environment at <state_dir>/buffer/ has five named databases:

    pages  page_seq (8-byte big-endian) -> the page JSON from common.payload.build_page
    index  page_seq -> sample count and page size in bytes (two 4-byte big-endian integers),
           so that delivery and dropping never read a page to learn its size
    open   arrival number (8-byte big-endian) -> sample count (4 bytes) + JSON array of
           samples: the batches not yet sealed into a page, in arrival order
    gaps   page_seq -> a gap record: a page without samples that says what was dropped
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
import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import re
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Container, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import lmdb
import zmq

from common import payload, wire
from common.config import BufferSettings, Config
from common.errors import PlcBridgeError, StoreError
from common.lifecycle import run_process
from common.logs import fields
from common.ratelimit import RateLimit
from common.tap import Tap
from processes.buffer_files import DataFileInvalid, check_data_file, move_aside

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
META_DROPS = b"drops"  # JSON: reason -> {"pages", "samples", "batches"}
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

# Attempts of one group commit that hit a full map, each after deleting more of the oldest
# pages; the last attempts also grow the map.
MAP_FULL_ATTEMPTS = 6

# A failed write on a filesystem with less free space than this is taken for a full disk.
# LMDB writes at most 64 pages of 4 KiB in one call, so a write that ran out of space
# leaves less than that free.
DISK_FULL_BYTES = 1 << 20
MAP_GROWTH_FACTOR = 1.5

MAX_DELIVERY_MESSAGES_PER_PASS = 1000
MAX_POLL_MS = 1000

# A commit that only deletes acknowledged pages waits this long for more pubacks. A drain
# then costs one durable commit every 50 ms instead of one every loop pass, and a crash in
# between makes the uplink resend at most the pages acknowledged in those 50 ms.
PUBACK_COMMIT_DELAY_S = 0.05

SEND_RETRY_MS = 10
# After a stop request the buffer still commits the reader's last batches: it stays until
# no batch has come for STOP_QUIET_S, and at most STOP_GRACE_S, well within stopwaitsecs.
STOP_QUIET_S = 0.3
STOP_GRACE_S = 3.0

SOCKET_LINGER_MS = 200
WARNING_INTERVAL_S = 10.0

# While the link stays up and pages keep being dropped, one gap record covers the drops of
# this many seconds, so that the cloud does not get one for every commit.
GAP_RECORD_INTERVAL_S = 10.0

# How often pages are checked against buffer.max_age_s, and the status file is written.
AGE_CHECK_INTERVAL_S = 1.0
STATUS_INTERVAL_S = 1.0
STATUS_FILE = "buffer-status.json"

# The commit and drain rates are averaged over this window.
RATE_WINDOW_S = 10.0


class StoreFull(StoreError):
    """The LMDB map or the disk is full, which deleting old pages or growing the map can fix."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # REASON_MAP_FULL or REASON_DISK_FULL


class StoreUnreadable(StoreError):
    """A store that LMDB cannot open safely: corrupt, truncated or of another format."""


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
                f"cannot create the buffer store folder {self.path}: {exc.strerror}; "
                "check gateway.state_dir and its permissions"
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


# -- Buffer logic without sockets ---------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    identity: bytes
    epoch: int
    batch_seq: int
    count: int
    array: bytes


class Verdict(Enum):
    STORE = "store"
    DUPLICATE = "duplicate"
    GAP = "gap"
    STALE_EPOCH = "stale_epoch"


def judge_batch(state: StoreState, epoch: int, batch_seq: int) -> Verdict:
    """Decide what to do with a batch, given the last batch committed for the reader's epoch."""
    if epoch < state.epoch:
        return Verdict.STALE_EPOCH
    expected = state.last_batch_seq + 1 if epoch == state.epoch else 0
    if batch_seq == expected:
        return Verdict.STORE
    if batch_seq < expected:
        return Verdict.DUPLICATE
    return Verdict.GAP


@dataclass
class PassOutcome:
    """The result of one group commit, applied to counters and sockets after the commit."""

    acks: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    stored_batches: int = 0
    stored_samples: int = 0
    rejected_batches: int = 0
    rejected_samples: int = 0
    duplicates: int = 0
    acked_pages: int = 0
    acked_samples: int = 0
    dropped: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # by reason
    oversized_samples: int = 0
    notes: list[tuple[str, str]] = field(default_factory=list)  # (warning key, detail)
    epoch_changes: list[tuple[int, int]] = field(default_factory=list)
    opened_page: bool = False
    sealed_pages: int = 0
    sealed_gaps: int = 0


class Delivery:
    """The uplink's link state, credit and the pages handed out but not yet acknowledged.

    Pages go out in page_seq order, so every page above `cursor` is eligible unless its
    delete is pending (BufferCore.pending_deletes), and every page at or below it is in
    flight, acknowledged or deleted. Gap records go out before any page, and do not move
    the cursor.
    """

    def __init__(self) -> None:
        self.identity: bytes | None = None
        self.session: str | int | None = None
        self.up = False
        self.credit = 0
        self.in_flight: set[int] = set()
        self.cursor = -1

    def on_link(self, identity: bytes, session: str | int, up: bool, free: int) -> str | None:
        """Apply a link message, and return "link_up" or "link_down" when the state changes.

        The uplink repeats its link message every second, so a repeated one only updates
        the routing identity.
        """
        if up == self.up and session == self.session:
            self.identity = identity
            return None

        self.identity = identity
        self.session = session
        self.up = up
        self._make_all_eligible(free if up else 0)
        return "link_up" if up else "link_down"

    def on_unreachable(self) -> None:
        self.up = False
        self._make_all_eligible(0)

    def _make_all_eligible(self, credit: int) -> None:
        self.in_flight.clear()
        self.cursor = -1
        self.credit = credit

    def on_puback(self, session: str | int, page_seq: int) -> None:
        # Every puback of the current session returns one page of credit, even for a page
        # already deleted, because the uplink counts its free slots the same way.
        self.in_flight.discard(page_seq)
        if self.up and session == self.session:
            self.credit += 1

    def on_sent(self, page_seq: int, gap: bool = False) -> None:
        self.in_flight.add(page_seq)
        if not gap:
            self.cursor = page_seq
        self.credit -= 1

    def forget(self, page_seqs: list[int]) -> None:
        self.in_flight.difference_update(page_seqs)


class Rates:
    """Commit and drain rates over the last RATE_WINDOW_S, from counter snapshots."""

    KEYS = ("commits", "samples_committed", "pages_acked", "samples_acked")

    def __init__(self) -> None:
        self._snapshots: deque[tuple[float, tuple[int, ...]]] = deque()

    def update(self, now: float, counters: dict[str, int]) -> dict[str, float]:
        values = tuple(counters[key] for key in self.KEYS)
        self._snapshots.append((now, values))
        while len(self._snapshots) > 2 and now - self._snapshots[1][0] >= RATE_WINDOW_S:
            self._snapshots.popleft()
        first_time, first_values = self._snapshots[0]
        elapsed = now - first_time
        if elapsed <= 0:
            return dict.fromkeys(RATE_NAMES, 0.0)
        return {name: round((value - first) / elapsed, 1)
                for name, value, first in zip(RATE_NAMES, values, first_values, strict=True)}


RATE_NAMES = ("commits_per_s", "ingest_samples_per_s", "drain_pages_per_s",
              "drain_samples_per_s")


class BufferCore:
    """Group commits, page sealing, the disk bound and delivery state, without any socket."""

    def __init__(self, store: PageStore, logger: logging.Logger, tap: Tap | None = None) -> None:
        self.store = store
        self.settings = store.settings
        self.logger = logger
        self.tap = tap
        self.delivery = Delivery()
        self.warning_limits: dict[str, RateLimit] = {}
        self.counters = dict.fromkeys(
            ("batches_committed", "samples_committed", "batches_rejected", "samples_rejected",
             "duplicates", "pages_sent", "gaps_sent", "pages_acked", "samples_acked",
             "commits", "commits_failed"), 0
        )
        self.open_deadline = self._initial_open_deadline(time.monotonic())

        # Pages whose puback arrived but whose deletion is not committed yet. They are not
        # handed out again, and the next commit deletes them, at the latest at
        # deletes_deadline.
        self.pending_deletes: set[int] = set()
        self.deletes_deadline: float | None = None
        self.next_age_check = 0.0
        # The time at which the open gaps are next stored as gap records, if the link is up.
        # A link that comes up sets it to 0, so the records go out before any page.
        self.next_gap_record = 0.0
        self.last_commit_failed = False
        self._unreported_drops: dict[str, list[int]] = {}  # reason -> [pages, samples]
        self._next_drop_report = 0.0

    def _initial_open_deadline(self, now: float) -> float | None:
        """Return when the open page found at start must be sealed, from its wall-clock age."""
        state = self.store.state
        if not state.open_chunks:
            return None
        age_s = max(0.0, time.time() - state.open_started_ms / 1000)
        max_age_s = self.settings.page_max_age_ms / 1000
        return now + max(0.0, max_age_s - age_s)

    def add_pubacks(self, page_seqs: list[int], now: float) -> None:
        """Note pages that the broker acknowledged, for a commit within PUBACK_COMMIT_DELAY_S."""
        if not page_seqs:
            return
        if not self.pending_deletes:
            self.deletes_deadline = now + PUBACK_COMMIT_DELAY_S
        self.pending_deletes.update(page_seqs)

    def expired_before_ms(self, now: float) -> int | None:
        """Return the ts_ms below which pages are too old, when buffer.max_age_s applies and
        the oldest page is older; check at most every AGE_CHECK_INTERVAL_S."""
        if not self.settings.max_age_s or now < self.next_age_check:
            return None
        self.next_age_check = now + AGE_CHECK_INTERVAL_S
        if not self.store.state.page_count:
            return None
        oldest_ms = int((time.time() - self.settings.max_age_s) * 1000)
        newest = self.store.oldest_page_newest_ts(self.delivery.in_flight)
        return oldest_ms if newest is not None and newest < oldest_ms else None

    def commit(self, batches: list[Batch], now: float, flush_deletes: bool = False) -> PassOutcome:
        """Store batches, seal due pages and gap records, and delete acknowledged and
        expired pages, in one transaction.

        Pending deletes alone lead to a commit only at deletes_deadline, or with
        flush_deletes, but they join every other commit. A full map or disk leads to the
        overflow policy. When even that cannot be committed, the batches stay
        unacknowledged, so the reader sends them again, and the next commit tries again.
        """
        seal_due = self.open_deadline is not None and now >= self.open_deadline
        deletes_due = bool(self.pending_deletes) and (
            flush_deletes or (self.deletes_deadline is not None and now >= self.deletes_deadline))
        gaps_due = self.gaps_due(now)
        expired_before = self.expired_before_ms(now)
        if not (batches or seal_due or deletes_due or gaps_due or expired_before):
            return PassOutcome()

        work = CommitWork(batches, sorted(self.pending_deletes), seal_due, expired_before,
                          seal_gaps=gaps_due)
        outcome = self._commit_with_policy(work)
        self.last_commit_failed = outcome is None
        if outcome is None:
            self.counters["commits_failed"] += 1
            return PassOutcome()
        if outcome.sealed_gaps:
            self.next_gap_record = now + GAP_RECORD_INTERVAL_S

        self.pending_deletes.clear()
        self.deletes_deadline = None
        self._after_commit(outcome, now)
        return outcome

    def gaps_due(self, now: float) -> bool:
        """Return whether the open gaps are to be stored as gap records now."""
        return (self.delivery.up and bool(self.store.state.open_gaps)
                and now >= self.next_gap_record)

    def _commit_with_policy(self, work: CommitWork) -> PassOutcome | None:
        """Commit work, and when the map or disk is full apply the overflow policy and try
        again. Return None when nothing could be committed."""
        for attempt in range(1, MAP_FULL_ATTEMPTS + 1):
            try:
                return self._commit_once(work)
            except StoreFull as exc:
                if attempt == MAP_FULL_ATTEMPTS:
                    self.warn("store_full", fields(reason=exc.reason, error=exc),
                              time.monotonic())
                    return None
                if self.settings.overflow_policy == "reject-new" and work.batches:
                    self._free_acked_pages(exc)
                    work.reject_reason = exc.reason
                else:
                    self._make_room(attempt, work.batches, exc)
        return None

    def _commit_once(self, work: CommitWork) -> PassOutcome:
        with self.store.transaction() as txn:
            outcome = self._apply(txn, work)
        outcome.opened_page = txn.opened_page
        outcome.sealed_pages = txn.sealed_pages
        outcome.acked_samples = txn.acked_samples
        return outcome

    def _apply(self, txn: StoreTransaction, work: CommitWork) -> PassOutcome:
        outcome = PassOutcome()
        if work.seal_due:
            txn.seal()

        for batch in work.batches:
            self._ingest(txn, batch, outcome, work.reject_reason)
        for page_seq in work.deletes:
            outcome.acked_pages += txn.delete_page(page_seq)

        if work.expired_before is not None:
            outcome.dropped[REASON_MAX_AGE] = txn.drop_expired(work.expired_before,
                                                               self.delivery.in_flight)
        excess = txn.state.stored_bytes - self.settings.max_bytes
        if excess > 0:
            outcome.dropped[REASON_MAX_BYTES] = txn.drop_oldest(
                excess, self.delivery.in_flight, REASON_MAX_BYTES)

        # Gap records are stored only while the link is up, so that one record covers a
        # whole outage and reaches the cloud before the pages that follow the gap.
        if work.seal_gaps and txn.state.open_gaps:
            outcome.sealed_gaps = txn.seal_gaps()
        return outcome

    def _ingest(
        self, txn: StoreTransaction, batch: Batch, outcome: PassOutcome, reject_reason: str | None
    ) -> None:
        state = txn.state
        verdict = judge_batch(state, batch.epoch, batch.batch_seq)
        if verdict is Verdict.STALE_EPOCH:
            outcome.notes.append(("stale_epoch", fields(
                epoch=batch.epoch, batch_seq=batch.batch_seq, current_epoch=state.epoch)))
            return
        if verdict is Verdict.GAP:
            return  # the reader resends every unacknowledged batch in order
        if verdict is Verdict.DUPLICATE:
            outcome.duplicates += 1
            outcome.acks[batch.identity] = (batch.epoch, state.last_batch_seq)
            return

        if batch.epoch != state.epoch:
            outcome.epoch_changes.append((state.epoch, batch.epoch))
            state.rejected_samples = 0
            state.rejected_batches = 0

        reason = reject_reason or self._over_limit(state, batch)
        if reason is not None:
            txn.reject_batch(batch.count, batch.array, reason)
            outcome.rejected_batches += 1
            outcome.rejected_samples += batch.count
        else:
            self._store(txn, batch, outcome)

        state.epoch = batch.epoch
        state.last_batch_seq = batch.batch_seq
        outcome.acks[batch.identity] = (batch.epoch, batch.batch_seq)

    def _over_limit(self, state: StoreState, batch: Batch) -> str | None:
        """Return REASON_MAX_BYTES when reject-new applies and the batch does not fit."""
        if self.settings.overflow_policy != "reject-new":
            return None
        if state.stored_bytes + len(batch.array) > self.settings.max_bytes:
            return REASON_MAX_BYTES
        return None

    def _store(self, txn: StoreTransaction, batch: Batch, outcome: PassOutcome) -> None:
        try:
            outcome.oversized_samples += txn.add_batch(batch.count, batch.array)
            outcome.stored_samples += batch.count
            outcome.stored_batches += 1
        except BatchRejected as exc:
            # Acknowledged anyway: the reader would otherwise resend it forever and stall.
            txn.count_drop(REASON_INVALID_BATCH, samples=batch.count, batches=1)
            outcome.notes.append(("batch_rejected", fields(
                epoch=batch.epoch, batch_seq=batch.batch_seq, count=batch.count, reason=exc)))

    def _free_acked_pages(self, exc: StoreFull) -> None:
        """Delete the acknowledged pages after a full map or disk, which loses no data."""
        self.logger.warning(
            "store_full %s: rejecting new batches, as buffer.overflow_policy is reject-new",
            fields(reason=exc.reason, error=exc),
        )
        self.store.clear_stale_readers()
        if not self.pending_deletes:
            return
        try:
            with self.store.transaction() as txn:
                deleted = [seq for seq in sorted(self.pending_deletes) if txn.delete_page(seq)]
        except StoreFull:
            return
        self.counters["pages_acked"] += len(deleted)
        self.counters["samples_acked"] += txn.acked_samples
        self.pending_deletes.difference_update(deleted)

    def _make_room(self, attempt: int, batches: list[Batch], exc: StoreFull) -> None:
        """Free space after a full map or disk by deleting more of the oldest pages on each
        attempt."""
        self.logger.warning(
            "store_full %s: deleting the oldest pages to make room, then retrying the commit",
            fields(attempt=attempt, reason=exc.reason, error=exc),
        )
        self.store.clear_stale_readers()
        incoming = sum(len(batch.array) for batch in batches)
        bytes_to_free = (incoming + self.settings.page_max_bytes) * 2**attempt

        deleted: list[int] = []
        dropped: list[tuple[int, int]] = []
        acked_samples = 0
        try:
            with self.store.transaction() as txn:
                # Acknowledged pages go first, because deleting them loses no data.
                stored_bytes = txn.state.stored_bytes
                deleted = [seq for seq in sorted(self.pending_deletes) if txn.delete_page(seq)]
                bytes_to_free -= stored_bytes - txn.state.stored_bytes
                if bytes_to_free > 0:
                    dropped = txn.drop_oldest(bytes_to_free, self.delivery.in_flight, exc.reason)
            acked_samples = txn.acked_samples
        except StoreFull:
            deleted, dropped = [], []
        if deleted:
            self.counters["pages_acked"] += len(deleted)
            self.counters["samples_acked"] += acked_samples
            self.pending_deletes.difference_update(deleted)
        self._record_drops(dropped, exc.reason)

        # A bigger map cannot help a full disk.
        growable = exc.reason == REASON_MAP_FULL
        if growable and (not (deleted or dropped) or attempt >= MAP_FULL_ATTEMPTS // 2):
            self.store.grow_map()

    def _after_commit(self, outcome: PassOutcome, now: float) -> None:
        counters = self.counters
        counters["commits"] += 1
        counters["batches_committed"] += outcome.stored_batches
        counters["samples_committed"] += outcome.stored_samples
        counters["batches_rejected"] += outcome.rejected_batches
        counters["samples_rejected"] += outcome.rejected_samples
        counters["duplicates"] += outcome.duplicates
        counters["pages_acked"] += outcome.acked_pages
        counters["samples_acked"] += outcome.acked_samples

        if not self.store.state.open_chunks:
            self.open_deadline = None
        elif outcome.opened_page or self.open_deadline is None:
            self.open_deadline = now + self.settings.page_max_age_ms / 1000

        for reason, dropped in outcome.dropped.items():
            self._record_drops(dropped, reason)
        if outcome.rejected_batches:
            outcome.notes.append(("batches_rejected", fields(
                batches=outcome.rejected_batches, samples=outcome.rejected_samples,
                total_samples=counters["samples_rejected"], max_bytes=self.settings.max_bytes)))
        if outcome.oversized_samples:
            outcome.notes.append(("sample_too_large", fields(
                samples=outcome.oversized_samples, page_max_bytes=self.settings.page_max_bytes)))
        if outcome.sealed_gaps:
            self.logger.info("gap_records_stored %s", fields(records=outcome.sealed_gaps))
        for previous, current in outcome.epoch_changes:
            self.logger.info("reader_epoch %s", fields(epoch=current, previous=previous))
        for key, detail in outcome.notes:
            self.warn(key, detail, now)

    def _record_drops(self, dropped: list[tuple[int, int]], reason: str) -> None:
        if not dropped:
            return
        self.delivery.forget([seq for seq, _count in dropped])
        unreported = self._unreported_drops.setdefault(reason, [0, 0])
        unreported[0] += len(dropped)
        unreported[1] += sum(count for _seq, count in dropped)
        self.report_drops(time.monotonic())

    def report_drops(self, now: float, force: bool = False) -> None:
        """Log the pages dropped since the last report, one line for each reason, unless
        one was logged less than WARNING_INTERVAL_S ago and force is not set."""
        if not self._unreported_drops or (now < self._next_drop_report and not force):
            return
        self._next_drop_report = now + WARNING_INTERVAL_S
        state = self.store.state
        for reason, (pages, samples) in sorted(self._unreported_drops.items()):
            self.logger.warning(
                "pages_dropped %s: %s, so the oldest data was deleted before the uplink "
                "sent it",
                fields(reason=reason, pages=pages, samples=samples,
                       total_pages=state.dropped_pages, total_samples=state.dropped_samples,
                       max_bytes=self.settings.max_bytes),
                DROP_CAUSES.get(reason, reason),
            )
            if self.tap:
                self.tap.publish("pages_dropped", reason=reason, pages=pages, samples=samples,
                                 total_pages=state.dropped_pages,
                                 total_samples=state.dropped_samples)
        self._unreported_drops = {}

    def warn(self, key: str, detail: str, now: float) -> None:
        limit = self.warning_limits.setdefault(key, RateLimit(WARNING_INTERVAL_S))
        suppressed = limit.allow(now)
        if suppressed is None:
            return
        message = WARNINGS[key]
        self.logger.warning("%s %s suppressed=%d: %s", key, detail, suppressed, message)
        if self.tap:
            self.tap.publish("error", error=key, detail=detail, message=message)

    def tap_counters(self) -> dict[str, Any]:
        state = self.store.state
        return {
            "pages": state.page_count,
            "bytes": state.stored_bytes,
            "open_samples": state.open_samples,
            **self.counters,
            "dropped_pages": state.dropped_pages,
            "dropped_samples": state.dropped_samples,
            "dropped_by_reason": {
                reason: {"pages": pages, "samples": samples, "batches": batches}
                for reason, (pages, samples, batches) in sorted(state.drops.items())
            },
            "gap_records": state.gap_count,
            "gaps_open": sorted(state.open_gaps),
            "in_flight": len(self.delivery.in_flight),
            "link": "up" if self.delivery.up else "down",
            "overflow_policy": self.settings.overflow_policy,
            "max_bytes": self.settings.max_bytes,
        }


@dataclass
class CommitWork:
    """The work of one group commit."""

    batches: list[Batch]
    deletes: list[int]
    seal_due: bool
    expired_before: int | None
    seal_gaps: bool = False
    # Set after a full map or disk under reject-new: every new batch is rejected for it.
    reject_reason: str | None = None


# The cause of each drop reason, for the pages_dropped WARNING.
DROP_CAUSES = {
    REASON_MAX_BYTES: "the store reached buffer.max_bytes",
    REASON_MAX_AGE: "pages were older than buffer.max_age_s",
    REASON_MAP_FULL: "the LMDB map was full",
    REASON_DISK_FULL: "the disk was full",
}

# The consequence of each rate-limited warning, keyed by its log event name.
WARNINGS = {
    "stale_epoch": "batch from an older reader epoch ignored. If this repeats, the reader's "
                   "epoch counter went back and its data is not stored",
    "batch_rejected": "batch payload is not a JSON array of samples, so it was acknowledged, "
                      "discarded and counted as dropped samples",
    "batches_rejected": "the store is full and buffer.overflow_policy is reject-new, so new "
                        "batches were acknowledged as rejected and the reader counts them as "
                        "dropped",
    "sample_too_large": "samples larger than buffer.page_max_bytes were discarded and counted "
                        "as dropped samples",
    "store_full": "the map or disk stays full even after the overflow policy, so nothing "
                  "was committed. The reader keeps the batches and sends them again; writing "
                  "resumes when space returns",
    "bad_message": "malformed message ignored, and no ack is sent for it",
}


# -- Sockets and the loop -----------------------------------------------------------------


def non_negative_int(header: dict[str, Any], key: str) -> int:
    value = header.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def parse_batch(identity: bytes, frames: list[bytes]) -> Batch:
    """Decode a batch message, raising ValueError that names what is malformed."""
    message = wire.decode(frames)
    if message.kind != wire.BATCH:
        raise ValueError(f"unexpected message kind {message.kind[:20]!r} on ingest")
    header = message.header

    # A batch with a valid header but a bad payload is acknowledged and discarded later,
    # so that the reader does not resend it forever.
    return Batch(identity, non_negative_int(header, "epoch"),
                 non_negative_int(header, "batch_seq"), non_negative_int(header, "count"),
                 message.payload or b"")


def parse_session(header: dict[str, Any]) -> str | int:
    session = header.get("session")
    if isinstance(session, bool) or not isinstance(session, str | int) or session == "":
        raise ValueError(f"session must be a non-empty string or an integer, got {session!r}")
    return session


class BufferProcess:
    """The buffer's sockets and loop around a BufferCore."""

    def __init__(
        self, config: Config, logger: logging.Logger, store: PageStore,
        context: zmq.Context[zmq.Socket[bytes]],
    ) -> None:
        self.logger = logger
        self.settings = config.buffer
        runtime_dir = config.gateway.runtime_dir
        try:
            runtime_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PlcBridgeError(
                f"cannot create the runtime folder {runtime_dir}: {exc.strerror}; "
                "check gateway.runtime_dir"
            ) from exc
        self.sockets: list[zmq.Socket[bytes]] = []
        self.ingest = self._bind(context, wire.endpoint(runtime_dir, wire.INGEST))
        self.delivery = self._bind(context, wire.endpoint(runtime_dir, wire.DELIVERY))
        self.tap = Tap(context, runtime_dir, "buffer")
        self.core = BufferCore(store, logger, self.tap)
        self.poller = zmq.Poller()
        self.poller.register(self.ingest, zmq.POLLIN)
        self.poller.register(self.delivery, zmq.POLLIN)
        self.send_blocked = False

        # Batches held for buffer.commit_max_delay_ms, so that more can join their commit.
        self.held_batches: list[Batch] = []
        self.held_deadline: float | None = None

        self.status_path = runtime_dir / STATUS_FILE
        self.rates = Rates()
        self.next_status = 0.0
        self.status_failed = RateLimit(WARNING_INTERVAL_S)

    def _bind(self, context: zmq.Context[zmq.Socket[bytes]], address: str) -> zmq.Socket[bytes]:
        sock = wire.make_socket(context, zmq.ROUTER, wire.DATA_HWM, SOCKET_LINGER_MS)
        self.sockets.append(sock)

        # Without ROUTER_MANDATORY a page sent to a vanished uplink disappears silently;
        # with it the send fails with EHOSTUNREACH and the page stays eligible.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            raise PlcBridgeError(
                f"cannot bind {address}: {exc}; check gateway.runtime_dir"
            ) from exc
        return sock

    def run(self, stop: threading.Event) -> None:
        state = self.core.store.state
        startup = dict(pages=state.page_count, bytes=state.stored_bytes,
                       open_samples=state.open_samples, next_page_seq=state.next_page_seq,
                       epoch=state.epoch, last_batch_seq=state.last_batch_seq)
        self.logger.info("buffer_ready %s", fields(path=self.core.store.path, **startup))
        self.tap.publish("start", **startup)

        while not stop.is_set():
            self._run_pass()
        self._drain_ingest()

        # Held batches are committed now, and deleting the acknowledged pages spares the
        # next start from resending them.
        outcome = self.core.commit(self.held_batches, time.monotonic(), flush_deletes=True)
        self._send_acks(outcome.acks)
        self.held_batches = []
        self.core.report_drops(time.monotonic(), force=True)
        self._write_status(time.monotonic(), running=False)
        self.tap.publish("stop", **self.core.tap_counters())

    def _drain_ingest(self) -> None:
        """Keep committing batches after a stop request while the reader is still flushing.

        supervisord signals all four programs at once when the whole gateway stops, so the
        reader's last batches can arrive after the buffer got its stop request. The buffer
        stays until no batch has come for STOP_QUIET_S, at most STOP_GRACE_S.
        """
        began = last_batch = time.monotonic()
        while True:
            now = time.monotonic()
            if now - last_batch >= STOP_QUIET_S or now - began >= STOP_GRACE_S:
                return
            if self._run_pass():
                last_batch = time.monotonic()

    def _run_pass(self) -> bool:
        """Serve the sockets once and return whether any batch arrived."""
        ready = dict(self.poller.poll(self._poll_timeout_ms()))

        received = self._receive_batches() if self.ingest in ready else []
        now = time.monotonic()
        if self.delivery in ready:
            self.core.add_pubacks(self._receive_delivery(), now)

        # The credit that the pubacks returned is spent before the commit, so the uplink
        # gets its next pages without waiting for the disk. Pages come only from earlier
        # commits, and a page whose delete is pending is not handed out.
        self._hand_out_pages()
        outcome = self.core.commit(self._batches_to_commit(received, now), now)
        self._send_acks(outcome.acks)
        if outcome.sealed_pages or outcome.sealed_gaps:
            self._hand_out_pages()

        self.core.report_drops(now)
        if now >= self.next_status:
            self.next_status = now + STATUS_INTERVAL_S
            self._write_status(now, running=True)
        self.tap.publish_counters_if_due()
        return bool(received)

    def _batches_to_commit(self, received: list[Batch], now: float) -> list[Batch]:
        """Return the batches to commit now, holding them for buffer.commit_max_delay_ms
        unless commit_max_batches have arrived."""
        if received and not self.held_batches:
            self.held_deadline = now + self.settings.commit_max_delay_ms / 1000
        self.held_batches.extend(received)
        if not self.held_batches:
            return []

        full = len(self.held_batches) >= self.settings.commit_max_batches
        due = self.held_deadline is None or now >= self.held_deadline
        if not (full or due):
            return []
        batches, self.held_batches, self.held_deadline = self.held_batches, [], None
        return batches

    def _write_status(self, now: float, running: bool) -> None:
        """Refresh the tap counters and write them to the status file that
        `plcbridge buffer` reads, replacing it atomically."""
        counters = self.core.tap_counters()
        counters.update(self.rates.update(now, self.core.counters))
        oldest, newest = self.core.store.sample_times()
        counters.update(oldest_ts_ms=oldest, newest_ts_ms=newest)
        self.tap.counters = counters

        status = {"ts_ms": int(time.time() * 1000), "pid": os.getpid(), "running": running,
                  "path": str(self.core.store.path), **counters}
        temporary = self.status_path.with_name(f".{STATUS_FILE}.tmp")
        try:
            temporary.write_text(json.dumps(status, separators=(",", ":")))
            os.replace(temporary, self.status_path)
        except OSError as exc:
            suppressed = self.status_failed.allow(now)
            if suppressed is not None:
                self.logger.warning(
                    "status_not_written %s: `plcbridge buffer` shows old figures",
                    fields(path=self.status_path, error=exc.strerror or exc,
                           suppressed=suppressed))

    def _poll_timeout_ms(self) -> int:
        if self.send_blocked:
            return SEND_RETRY_MS
        timeout_ms = MAX_POLL_MS
        now = time.monotonic()
        for deadline in (self.core.open_deadline, self.core.deletes_deadline,
                         self.held_deadline):
            if deadline is not None:
                timeout_ms = min(timeout_ms, int((deadline - now) * 1000) + 1)
        return max(0, timeout_ms)

    def _receive_batches(self) -> list[Batch]:
        batches: list[Batch] = []
        for _ in range(max(1, self.settings.commit_max_batches - len(self.held_batches))):
            try:
                identity, *frames = self.ingest.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                batches.append(parse_batch(identity, frames))
            except ValueError as exc:
                self.core.warn("bad_message", fields(socket="ingest", error=exc),
                                time.monotonic())
        return batches

    def _receive_delivery(self) -> list[int]:
        """Apply link messages at once, and return the page_seq of every puback."""
        pubacks = []
        for _ in range(MAX_DELIVERY_MESSAGES_PER_PASS):
            try:
                identity, *frames = self.delivery.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                page_seq = self._apply_delivery_message(identity, frames)
            except ValueError as exc:
                self.core.warn("bad_message", fields(socket="delivery", error=exc),
                                time.monotonic())
                continue
            if page_seq is not None:
                pubacks.append(page_seq)
        return pubacks

    def _apply_delivery_message(self, identity: bytes, frames: list[bytes]) -> int | None:
        message = wire.decode(frames)
        header = message.header
        session = parse_session(header)
        if message.kind == wire.PUBACK:
            page_seq = non_negative_int(header, "page_seq")
            self.core.delivery.on_puback(session, page_seq)
            return page_seq
        if message.kind != wire.LINK:
            raise ValueError(f"unexpected message kind {message.kind[:20]!r} on delivery")

        state = header.get("state")
        if state not in ("up", "down"):
            raise ValueError(f"state must be 'up' or 'down', got {state!r}")
        free = non_negative_int(header, "free") if state == "up" else 0
        change = self.core.delivery.on_link(identity, session, state == "up", free)
        if change == "link_up":
            self.core.next_gap_record = 0.0
        if change:
            self.logger.info("%s %s", change, fields(session=session, free=free))
            self.tap.publish(change, session=session, free=free)
        return None

    def _send_acks(self, acks: dict[bytes, tuple[int, int]]) -> None:
        state = self.core.store.state
        for identity, (epoch, batch_seq) in acks.items():
            header = {"epoch": epoch, "batch_seq": batch_seq}
            if epoch == state.epoch:
                header.update(rejected_samples=state.rejected_samples,
                              rejected_batches=state.rejected_batches)
            frames = wire.encode(wire.ACK, header)
            try:
                self.ingest.send_multipart([identity, *frames], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                # The reader is gone or not reading. It resends the batches it has not seen
                # acknowledged, and the buffer acknowledges them again without storing them.
                self.logger.debug("ack_not_sent %s", fields(epoch=epoch, batch_seq=batch_seq,
                                                            error=exc))

    def _hand_out_pages(self) -> None:
        """Send the oldest eligible pages within the credit, straight from the LMDB map."""
        self.send_blocked = False
        delivery = self.core.delivery
        if not delivery.up or delivery.credit <= 0:
            return

        # Gap records go first, so the cloud learns of a gap before the data after it. When
        # a gap record is due, the pages wait for the commit that stores it, unless commits
        # fail, because then only delivering pages can free space.
        core = self.core
        if core.gaps_due(time.monotonic()) and not core.last_commit_failed:
            return
        skip = delivery.in_flight | self.core.pending_deletes
        for page_seq, gap_page in self.core.store.iter_gaps(skip):
            if not self._send_page(delivery, page_seq, 0, gap_page, gap=True):
                return
            if delivery.credit <= 0:
                return

        pages = self.core.store.iter_pages(delivery.cursor, self.core.pending_deletes)
        with contextlib.closing(pages):
            for page_seq, count, page in pages:
                if not self._send_page(delivery, page_seq, count, page) or delivery.credit <= 0:
                    return

    def _send_page(
        self, delivery: Delivery, page_seq: int, count: int, page: memoryview | bytes,
        gap: bool = False,
    ) -> bool:
        assert delivery.identity is not None  # the link is up, so a link message named it
        header = wire.encode(wire.PAGE, {"page_seq": page_seq, "count": count})
        try:
            # With copy=True, pyzmq copies the page out of the LMDB map before it returns.
            self.delivery.send_multipart([delivery.identity, *header, page], zmq.NOBLOCK)
        except zmq.Again:
            self.send_blocked = True  # the uplink's queue is full, so retry soon
            return False
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise PlcBridgeError(f"send of page {page_seq} to the uplink failed: {exc}"
                                     ) from exc
            delivery.on_unreachable()
            self.logger.info("link_down %s", fields(session=delivery.session,
                                                    reason="uplink_unreachable"))
            self.tap.publish("link_down", session=delivery.session, reason="uplink_unreachable")
            return False
        delivery.on_sent(page_seq, gap)
        self.core.counters["gaps_sent" if gap else "pages_sent"] += 1
        return True

    def close(self) -> None:
        self.tap.close()
        for sock in self.sockets:
            sock.close()


def open_store(path: Path, settings: BufferSettings, logger: logging.Logger) -> PageStore:
    """Open the store, and when it is unreadable move its files aside and start a new one.

    The old files are renamed, never deleted, and an ERROR names both paths.
    """
    try:
        return PageStore(path, settings, logger)
    except StoreUnreadable as exc:
        error = exc
    try:
        moved = move_aside(path)
    except OSError as exc:
        raise StoreError(
            f"{error}; moving it aside failed: {exc.strerror or exc}; move the folder {path} "
            "away by hand"
        ) from exc
    for source, target in moved:
        logger.error(
            "store_moved_aside %s: the buffer starts with an empty store, and the old file "
            "is kept for recovery",
            fields(path=source, moved_to=target, error=error))
    return PageStore(path, settings, logger)


def run_buffer(config: Config, logger: logging.Logger, stop: threading.Event) -> None:
    """Open the store, bind the sockets and run the loop until stop is set."""
    store = open_store(config.gateway.state_dir / "buffer", config.buffer, logger)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        process = BufferProcess(config, logger, store, context)
        try:
            process.run(stop)
        except PlcBridgeError as exc:
            process.tap.publish("error", error="fatal", message=str(exc))
            raise
        finally:
            process.close()
    finally:
        store.close()

        # destroy() also closes a socket that a failed start left open, where term() would
        # wait for it forever.
        context.destroy(linger=0)


def main() -> int:
    return run_process("buffer", run_buffer)


if __name__ == "__main__":
    sys.exit(main())
