"""The store-and-forward buffer: commits the reader's batches to LMDB and hands pages to the uplink.

Run as ``python -m processes.buffer --config FILE``. The buffer binds the "ingest" and
"delivery" ROUTER sockets of common/wire.py. It acknowledges a batch only after the LMDB
transaction that stores it has committed. It seals stored batches into pages of at most
buffer.page_max_samples samples and buffer.page_max_bytes bytes, and deletes a page only when
the uplink reports that the broker acknowledged it. When the stored pages and batches grow
above buffer.max_bytes, the oldest pages are deleted, counted and reported in a WARNING.

The LMDB environment at <state_dir>/buffer/ has four named databases:

    pages  page_seq (8-byte big-endian) -> the page JSON from common.payload.build_page
    index  page_seq -> sample count and page size in bytes (two 4-byte big-endian integers),
           so that delivery and dropping never read a page to learn its size
    open   arrival number (8-byte big-endian) -> sample count (4 bytes) + JSON array of
           samples: the batches not yet sealed into a page, in arrival order
    meta   next_page_seq, the reader's epoch and last committed batch_seq, the stored bytes,
           the dropped pages and samples, and the wall-clock start time of the open page

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
import struct
import sys
import threading
import time
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

# The page size is computed before its page_seq is known, so it assumes the longest page_seq.
PAGE_OVERHEAD_BYTES = len(payload.build_page(2**64 - 1, []))

# Free space that the LMDB map keeps above twice buffer.max_bytes, for B-tree pages, the free
# list and the pages that one group commit writes before freed pages can be reused.
MAP_HEADROOM_BYTES = 64 << 20
MAX_READERS = 16
NAMED_DBS = 4

# Attempts of one group commit that hit a full map, each after deleting more of the oldest
# pages; the last attempts also grow the map.
MAP_FULL_ATTEMPTS = 6
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


class StoreFull(StoreError):
    """The LMDB map or the disk is full, which deleting old pages or growing the map can fix."""


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

    def copy(self) -> StoreState:
        return replace(self, open_chunks=list(self.open_chunks))

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
            self.env = self._open_env()
        except StoreError:
            os.close(self._lock_file)
            raise
        try:
            self.pages = self.env.open_db(b"pages")
            self.index = self.env.open_db(b"index")
            self.open = self.env.open_db(b"open")
            self.meta = self.env.open_db(b"meta")
            self.state = self._load_state()
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

    def _open_env(self) -> lmdb.Environment:
        # sync=False turns off both the data and the meta fsync of each commit. A killed
        # process loses nothing, because committed pages are in the OS page cache. A power
        # loss or OS crash can lose the last commits, already acknowledged to the reader, and
        # LMDB's documentation warns that the file can even be corrupted if the filesystem
        # reorders the writes.
        try:
            env = lmdb.open(
                str(self.path),
                map_size=self.map_size_bytes,
                max_readers=MAX_READERS,
                max_dbs=NAMED_DBS,
                sync=self.settings.sync,
                metasync=self.settings.sync,
            )
            cleared = env.reader_check()
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
            raise StoreError(
                f"the LMDB store {self.path} has format {found!r}, but this plcbridge reads "
                f"format {STORE_FORMAT!r}; move the folder away or use a matching version"
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

    def _load_open(self, txn: lmdb.Transaction[bytes], state: StoreState) -> None:
        for key, value in txn.cursor(db=self.open):
            (count,) = COUNT.unpack_from(value)
            chunk = Chunk(SEQ.unpack(key)[0], count, value[COUNT.size:], stored=True)
            state.open_chunks.append(chunk)
            state.open_samples += count
            state.open_array_bytes += len(chunk.array)

    def _last_page_seq(self, txn: lmdb.Transaction[bytes]) -> int | None:
        cursor = txn.cursor(db=self.pages)
        if not cursor.last():
            return None
        seq: int = SEQ.unpack(cursor.key())[0]
        return seq

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
        except (lmdb.MapFullError, lmdb.DiskError) as exc:
            raise StoreFull(f"the LMDB store {self.path} is full: {exc}") from exc
        except lmdb.Error as exc:
            raise StoreError(f"write to the LMDB store {self.path} failed: {exc}") from exc
        self.state = work.state

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

    def grow_map(self) -> None:
        """Enlarge the map by half. Call it only while no transaction is open."""
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

    def clear_stale_readers(self) -> int:
        try:
            return self.env.reader_check()
        except lmdb.Error as exc:
            raise StoreError(f"reader check of the LMDB store {self.path} failed: {exc}") from exc

    def close(self) -> None:
        self.env.close()
        os.close(self._lock_file)


class StoreTransaction:
    """One write transaction that stores batches, seals and deletes pages on a state copy."""

    def __init__(self, store: PageStore, txn: lmdb.Transaction[bytes], state: StoreState) -> None:
        self.store = store
        self.txn = txn
        self.state = state
        self.max_samples = store.settings.page_max_samples
        self.max_bytes = store.settings.page_max_bytes
        self.opened_page = False  # an empty open page received its first samples
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
                dropped += 1  # one sample larger than an empty page
                start += 1
        self.state.dropped_samples += dropped
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
        """Delete one page and return whether it was stored."""
        key = SEQ.pack(seq)
        entry = self.txn.get(key, db=self.store.index)
        if entry is None:
            return False
        self._delete(key, INDEX.unpack(entry)[1])
        return True

    def _delete(self, key: bytes, page_bytes: int) -> None:
        self.txn.delete(key, db=self.store.pages)
        self.txn.delete(key, db=self.store.index)
        self.state.page_count -= 1
        self.state.stored_bytes -= page_bytes

    def drop_oldest(self, bytes_to_free: int, protected: set[int]) -> list[tuple[int, int]]:
        """Delete the oldest pages until bytes_to_free are freed, and return (page_seq, count).

        Pages in protected (those the uplink is sending) go only when the others are not
        enough.
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

        for key, _seq, count, page_bytes in victims:
            self._delete(key, page_bytes)
            self.state.dropped_pages += 1
            self.state.dropped_samples += count
        return [(seq, count) for _key, seq, count, _bytes in victims]

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
    duplicates: int = 0
    acked_pages: int = 0
    dropped: list[tuple[int, int]] = field(default_factory=list)
    oversized_samples: int = 0
    notes: list[tuple[str, str]] = field(default_factory=list)  # (warning key, detail)
    epoch_changes: list[tuple[int, int]] = field(default_factory=list)
    opened_page: bool = False
    sealed_pages: int = 0


class Delivery:
    """The uplink's link state, credit and the pages handed out but not yet acknowledged.

    Pages go out in page_seq order, so every page above `cursor` is eligible unless its
    delete is pending (BufferCore.pending_deletes), and every page at or below it is in
    flight, acknowledged or deleted.
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

    def on_sent(self, page_seq: int) -> None:
        self.in_flight.add(page_seq)
        self.cursor = page_seq
        self.credit -= 1

    def forget(self, page_seqs: list[int]) -> None:
        self.in_flight.difference_update(page_seqs)


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
            ("batches_committed", "samples_committed", "duplicates", "pages_sent",
             "pages_acked", "commits"), 0
        )
        self.open_deadline = self._initial_open_deadline(time.monotonic())

        # Pages whose puback arrived but whose deletion is not committed yet. They are not
        # handed out again, and the next commit deletes them, at the latest at
        # deletes_deadline.
        self.pending_deletes: set[int] = set()
        self.deletes_deadline: float | None = None
        self._unreported_drops = [0, 0]  # pages, samples
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

    def commit(self, batches: list[Batch], now: float, flush_deletes: bool = False) -> PassOutcome:
        """Store batches, seal due pages and delete acknowledged ones in one transaction.

        Pending deletes alone lead to a commit only at deletes_deadline, or with
        flush_deletes, but they join every other commit. A full map leads to deleting the
        oldest pages and trying again.
        """
        seal_due = self.open_deadline is not None and now >= self.open_deadline
        deletes_due = bool(self.pending_deletes) and (
            flush_deletes or (self.deletes_deadline is not None and now >= self.deletes_deadline))
        if not batches and not seal_due and not deletes_due:
            return PassOutcome()

        deletes = sorted(self.pending_deletes)
        for attempt in range(1, MAP_FULL_ATTEMPTS + 1):
            try:
                with self.store.transaction() as txn:
                    outcome = self._apply(txn, batches, deletes, seal_due)
                outcome.opened_page = txn.opened_page
                outcome.sealed_pages = txn.sealed_pages
                break
            except StoreFull as exc:
                if attempt == MAP_FULL_ATTEMPTS:
                    raise StoreError(f"{exc}; deleting old pages and growing the map did not "
                                     "help, so check the free disk space") from exc
                self._make_room(attempt, batches, exc)

        self.pending_deletes.clear()
        self.deletes_deadline = None
        self._after_commit(outcome, now)
        return outcome

    def _apply(
        self, txn: StoreTransaction, batches: list[Batch], deletes: list[int], seal_due: bool
    ) -> PassOutcome:
        outcome = PassOutcome()
        if seal_due:
            txn.seal()

        for batch in batches:
            self._ingest(txn, batch, outcome)
        for page_seq in deletes:
            outcome.acked_pages += txn.delete_page(page_seq)

        excess = txn.state.stored_bytes - self.settings.max_bytes
        if excess > 0:
            outcome.dropped = txn.drop_oldest(excess, self.delivery.in_flight)
        return outcome

    def _ingest(self, txn: StoreTransaction, batch: Batch, outcome: PassOutcome) -> None:
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

        try:
            outcome.oversized_samples += txn.add_batch(batch.count, batch.array)
            outcome.stored_samples += batch.count
        except BatchRejected as exc:
            # Acknowledged anyway: the reader would otherwise resend it forever and stall.
            state.dropped_samples += batch.count
            outcome.notes.append(("batch_rejected", fields(
                epoch=batch.epoch, batch_seq=batch.batch_seq, count=batch.count, reason=exc)))

        if batch.epoch != state.epoch:
            outcome.epoch_changes.append((state.epoch, batch.epoch))
        state.epoch = batch.epoch
        state.last_batch_seq = batch.batch_seq
        outcome.acks[batch.identity] = (batch.epoch, batch.batch_seq)
        outcome.stored_batches += 1

    def _make_room(self, attempt: int, batches: list[Batch], exc: StoreFull) -> None:
        """Free space after a full map by deleting more of the oldest pages on each attempt."""
        self.logger.warning(
            "store_full %s: deleting the oldest pages to make room, then retrying the commit",
            fields(attempt=attempt, error=exc),
        )
        self.store.clear_stale_readers()
        incoming = sum(len(batch.array) for batch in batches)
        bytes_to_free = (incoming + self.settings.page_max_bytes) * 2**attempt

        deleted: list[int] = []
        dropped: list[tuple[int, int]] = []
        try:
            with self.store.transaction() as txn:
                # Acknowledged pages go first, because deleting them loses no data.
                stored_bytes = txn.state.stored_bytes
                deleted = [seq for seq in sorted(self.pending_deletes) if txn.delete_page(seq)]
                bytes_to_free -= stored_bytes - txn.state.stored_bytes
                if bytes_to_free > 0:
                    dropped = txn.drop_oldest(bytes_to_free, self.delivery.in_flight)
        except StoreFull:
            deleted, dropped = [], []
        if deleted:
            self.counters["pages_acked"] += len(deleted)
            self.pending_deletes.difference_update(deleted)
        self._record_drops(dropped)

        if not (deleted or dropped) or attempt >= MAP_FULL_ATTEMPTS // 2:
            self.store.grow_map()

    def _after_commit(self, outcome: PassOutcome, now: float) -> None:
        counters = self.counters
        counters["commits"] += 1
        counters["batches_committed"] += outcome.stored_batches
        counters["samples_committed"] += outcome.stored_samples
        counters["duplicates"] += outcome.duplicates
        counters["pages_acked"] += outcome.acked_pages

        if not self.store.state.open_chunks:
            self.open_deadline = None
        elif outcome.opened_page or self.open_deadline is None:
            self.open_deadline = now + self.settings.page_max_age_ms / 1000

        self._record_drops(outcome.dropped)
        if outcome.oversized_samples:
            outcome.notes.append(("sample_too_large", fields(
                samples=outcome.oversized_samples, page_max_bytes=self.settings.page_max_bytes)))
        for previous, current in outcome.epoch_changes:
            self.logger.info("reader_epoch %s", fields(epoch=current, previous=previous))
        for key, detail in outcome.notes:
            self.warn(key, detail, now)

    def _record_drops(self, dropped: list[tuple[int, int]]) -> None:
        if not dropped:
            return
        self.delivery.forget([seq for seq, _count in dropped])
        self._unreported_drops[0] += len(dropped)
        self._unreported_drops[1] += sum(count for _seq, count in dropped)
        self.report_drops(time.monotonic())

    def report_drops(self, now: float, force: bool = False) -> None:
        """Log the pages dropped since the last report, unless one was logged less than
        WARNING_INTERVAL_S ago and force is not set."""
        pages, samples = self._unreported_drops
        if not pages or (now < self._next_drop_report and not force):
            return
        self._next_drop_report = now + WARNING_INTERVAL_S
        self._unreported_drops = [0, 0]
        state = self.store.state
        self.logger.warning(
            "pages_dropped %s: the store reached buffer.max_bytes, so the oldest data was "
            "deleted before the uplink sent it",
            fields(pages=pages, samples=samples, total_pages=state.dropped_pages,
                   total_samples=state.dropped_samples, max_bytes=self.settings.max_bytes),
        )
        if self.tap:
            self.tap.publish("pages_dropped", pages=pages, samples=samples,
                             total_pages=state.dropped_pages,
                             total_samples=state.dropped_samples)

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
            "in_flight": len(self.delivery.in_flight),
            "link": "up" if self.delivery.up else "down",
        }


# The consequence of each rate-limited warning, keyed by its log event name.
WARNINGS = {
    "stale_epoch": "batch from an older reader epoch ignored. If this repeats, the reader's "
                   "epoch counter went back and its data is not stored",
    "batch_rejected": "batch payload is not a JSON array of samples, so it was acknowledged, "
                      "discarded and counted as dropped samples",
    "sample_too_large": "samples larger than buffer.page_max_bytes were discarded and counted "
                        "as dropped samples",
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

        # Deleting the acknowledged pages now spares the next start from resending them.
        self.core.commit([], time.monotonic(), flush_deletes=True)
        self.core.report_drops(time.monotonic(), force=True)
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

        batches = self._receive_batches() if self.ingest in ready else []
        now = time.monotonic()
        if self.delivery in ready:
            self.core.add_pubacks(self._receive_delivery(), now)

        # The credit that the pubacks returned is spent before the commit, so the uplink
        # gets its next pages without waiting for the disk. Pages come only from earlier
        # commits, and a page whose delete is pending is not handed out.
        self._hand_out_pages()
        outcome = self.core.commit(batches, now)
        self._send_acks(outcome.acks)
        if outcome.sealed_pages:
            self._hand_out_pages()

        self.core.report_drops(now)
        self.tap.counters = self.core.tap_counters()
        self.tap.publish_counters_if_due()
        return bool(batches)

    def _poll_timeout_ms(self) -> int:
        if self.send_blocked:
            return SEND_RETRY_MS
        timeout_ms = MAX_POLL_MS
        now = time.monotonic()
        for deadline in (self.core.open_deadline, self.core.deletes_deadline):
            if deadline is not None:
                timeout_ms = min(timeout_ms, int((deadline - now) * 1000) + 1)
        return max(0, timeout_ms)

    def _receive_batches(self) -> list[Batch]:
        batches = []
        for _ in range(self.settings.commit_max_batches):
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
        if change:
            self.logger.info("%s %s", change, fields(session=session, free=free))
            self.tap.publish(change, session=session, free=free)
        return None

    def _send_acks(self, acks: dict[bytes, tuple[int, int]]) -> None:
        for identity, (epoch, batch_seq) in acks.items():
            frames = wire.encode(wire.ACK, {"epoch": epoch, "batch_seq": batch_seq})
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
        pages = self.core.store.iter_pages(delivery.cursor, self.core.pending_deletes)
        with contextlib.closing(pages):
            for page_seq, count, page in pages:
                if not self._send_page(delivery, page_seq, count, page) or delivery.credit <= 0:
                    return

    def _send_page(
        self, delivery: Delivery, page_seq: int, count: int, page: memoryview
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
        delivery.on_sent(page_seq)
        self.core.counters["pages_sent"] += 1
        return True

    def close(self) -> None:
        self.tap.close()
        for sock in self.sockets:
            sock.close()


def run_buffer(config: Config, logger: logging.Logger, stop: threading.Event) -> None:
    """Open the store, bind the sockets and run the loop until stop is set."""
    store = PageStore(config.gateway.state_dir / "buffer", config.buffer, logger)
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
