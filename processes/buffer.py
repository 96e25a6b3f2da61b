"""The store-and-forward buffer: commits the reader's batches to LMDB and hands pages to the uplink.

Run as ``python -m processes.buffer --config FILE``. The buffer binds the "ingest" and
"delivery" ROUTER sockets of common/wire.py. It acknowledges a batch only after the LMDB
transaction that stores it has committed. It seals stored batches into pages of at most
buffer.page_max_samples samples and buffer.page_max_bytes bytes, and deletes a page only when
the uplink reports that the broker acknowledged it. When the stored pages and batches grow
above buffer.max_bytes, or the map or disk is full, buffer.overflow_policy deletes the oldest
pages or rejects new batches. Every drop is counted by reason and reported in a WARNING and
in a gap record that goes to the cloud before any page. Every second the buffer writes its
figures to <runtime_dir>/buffer-status.json for `plcbridge buffer`.

processes/buffer_store.py contains the LMDB store and describes its layout.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import zmq

from common import wire
from common.backoff import Backoff
from common.config import BufferSettings, Config
from common.errors import PlcBridgeError, StoreError
from common.lifecycle import run_process
from common.logs import fields
from common.ratelimit import RateLimit
from common.socket_monitor import SocketMonitor
from common.tap import Tap
from processes.buffer_files import DATA_FILE, move_aside

# The store's names that tests and benchmarks import from here are re-exported as X as X.
from processes.buffer_store import MAP_HEADROOM_BYTES as MAP_HEADROOM_BYTES
from processes.buffer_store import PAGE_OVERHEAD_BYTES as PAGE_OVERHEAD_BYTES
from processes.buffer_store import (
    REASON_DISK_FULL,
    REASON_INVALID_BATCH,
    REASON_MAP_FULL,
    REASON_MAX_AGE,
    REASON_MAX_BYTES,
    BatchRejected,
    PageStore,
    StoreFull,
    StoreState,
    StoreTransaction,
    StoreUnreadable,
)
from processes.buffer_store import Chunk as Chunk
from processes.buffer_store import sample_span as sample_span
from processes.buffer_store import split_samples as split_samples

# Attempts of one group commit that hit a full map, each after deleting more of the oldest
# pages; the last attempts also grow the map.
MAP_FULL_ATTEMPTS = 6

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

# Retry delays of opening a store on a disk too full to open it.
OPEN_RETRY_MIN_S = 0.5
OPEN_RETRY_MAX_S = 10.0

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
        self._warn_store_full(
            "rejecting new batches, as buffer.overflow_policy is reject-new",
            reason=exc.reason, error=exc)
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

    def _warn_store_full(self, consequence: str, **values: Any) -> None:
        # A full disk can last for hours and hit every commit, so this is rate-limited.
        limit = self.warning_limits.setdefault("store_full_policy", RateLimit(WARNING_INTERVAL_S))
        suppressed = limit.allow()
        if suppressed is not None:
            self.logger.warning("store_full %s: %s",
                                fields(**values, suppressed=suppressed), consequence)

    def _make_room(self, attempt: int, batches: list[Batch], exc: StoreFull) -> None:
        """Free space after a full map or disk by deleting more of the oldest pages on each
        attempt."""
        self._warn_store_full("deleting the oldest pages to make room, then retrying the commit",
                              attempt=attempt, reason=exc.reason, error=exc)
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


# Upper bounds of header integers, from the widths that the store packs them into: epoch
# and batch_seq as signed 64-bit, page_seq as unsigned 64-bit, a sample count as unsigned
# 32-bit. A larger value would make the commit fail with struct.error and stop the buffer.
INT_LIMITS = {"epoch": 2**63, "batch_seq": 2**63, "count": 2**32, "page_seq": 2**64,
              "free": 2**32}


def non_negative_int(header: dict[str, Any], key: str) -> int:
    value = header.get(key)
    limit = INT_LIMITS[key]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
        raise ValueError(f"{key} must be an integer from 0 to {limit - 1}, "
                         f"got {repr(value)[:40]}")
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
        self.monitors: list[SocketMonitor] = []
        self.tap = Tap(context, runtime_dir, "buffer")
        self.ingest = self._bind(context, wire.endpoint(runtime_dir, wire.INGEST), "ingest",
                                 "the reader keeps its batches until it connects again")
        self.delivery = self._bind(context, wire.endpoint(runtime_dir, wire.DELIVERY),
                                   "delivery", "pages wait in the buffer until the uplink "
                                   "connects again")
        self.core = BufferCore(store, logger, self.tap)
        self.poller = zmq.Poller()
        self.poller.register(self.ingest, zmq.POLLIN)
        self.poller.register(self.delivery, zmq.POLLIN)
        for monitor in self.monitors:
            self.poller.register(monitor.socket, zmq.POLLIN)
        self.send_blocked = False

        # Batches held for buffer.commit_max_delay_ms, so that more can join their commit.
        self.held_batches: list[Batch] = []
        self.held_deadline: float | None = None

        self.status_path = runtime_dir / STATUS_FILE
        self.rates = Rates()
        self.next_status = 0.0
        self.status_failed = RateLimit(WARNING_INTERVAL_S)

    def _bind(self, context: zmq.Context[zmq.Socket[bytes]], address: str, name: str,
              consequence: str) -> zmq.Socket[bytes]:
        sock = wire.make_socket(context, zmq.ROUTER, wire.DATA_HWM, SOCKET_LINGER_MS)
        self.sockets.append(sock)
        # The monitor goes on before the bind, so it reports the first peer too.
        self.monitors.append(SocketMonitor(sock, name, self.logger, self.tap.publish,
                                           consequence))

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
        for monitor in self.monitors:
            if monitor.socket in ready:
                monitor.drain()

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
            # The counters follow each refresh. On a timer of their own they could go out
            # just before a refresh and show figures a second old.
            self.tap.publish_counters()
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
            # json.loads raises RecursionError, not ValueError, on deeply nested arrays.
            try:
                batches.append(parse_batch(identity, frames))
            except (ValueError, RecursionError) as exc:
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
            except (ValueError, RecursionError) as exc:
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
        if self.tap.data_wanted:
            self.tap.publish_data(page_seq=page_seq, count=count, gap=gap, bytes=len(page),
                                  page=bytes(page).decode("utf-8", errors="replace"))
        return True

    def close(self) -> None:
        for monitor in self.monitors:
            monitor.close()
        self.tap.close()
        for sock in self.sockets:
            sock.close()


def open_store(path: Path, settings: BufferSettings, logger: logging.Logger) -> PageStore:
    """Open the store, and when it is unreadable move its files aside and start a new one.

    The old files are renamed, never deleted, and an ERROR names both paths.
    """
    try:
        store = PageStore(path, settings, logger)
    except StoreUnreadable as exc:
        error = exc
    else:
        report_set_aside(path, logger)
        return store
    try:
        moved = move_aside(path, error.files)
    except OSError as exc:
        raise StoreError(
            f"{error}; moving it aside failed: {exc.strerror or exc}; move the folder {path} "
            "away by hand"
        ) from exc
    consequence = ("the buffer starts with an empty store, and the old file is kept for "
                   "recovery" if DATA_FILE in error.files else
                   "LMDB creates a new lock file, and the stored pages are kept")
    for source, target in moved:
        logger.error("store_moved_aside %s: %s",
                     fields(path=source, moved_to=target, error=error), consequence)
    return PageStore(path, settings, logger)


def report_set_aside(path: Path, logger: logging.Logger) -> None:
    """Log a WARNING at every start while data files moved aside are in the store folder.

    The ERROR of the move is lost when the buffer is killed between the rename and the log
    line, and the pages in those files are never delivered, so each start names them again.
    """
    set_aside = sorted(str(file) for file in path.glob(f"{DATA_FILE}.unreadable-*"))
    if set_aside:
        logger.warning(
            "store_files_set_aside %s: their pages are not delivered; copy the data out "
            "with an LMDB tool, then delete the files", fields(files=",".join(set_aside)))


def wait_for_store(
    path: Path, settings: BufferSettings, logger: logging.Logger, stop: threading.Event,
    status_path: Path,
) -> PageStore | None:
    """Open the store, retrying while the disk is too full to open it, and return None
    when stop is set first.

    Exiting instead would make supervisord restart the buffer in a loop until it gives up.
    While the buffer waits, no socket is bound, so the reader keeps its batches
    unacknowledged in its own bounded queue and counts what overflows it. The status file
    gives the reason every second, for `plcbridge buffer`.
    """
    backoff = Backoff(OPEN_RETRY_MIN_S, OPEN_RETRY_MAX_S)
    warning = RateLimit(WARNING_INTERVAL_S)
    while True:
        try:
            store = open_store(path, settings, logger)
        except StoreFull as exc:
            delay_s = backoff.next_delay_s()
            suppressed = warning.allow()
            if suppressed is not None:
                logger.warning(
                    "store_not_opened %s: the buffer accepts no batches until space returns, "
                    "so the reader keeps them",
                    fields(reason=exc.reason, error=exc, retry_s=round(delay_s, 1),
                           suppressed=suppressed))
            if wait_writing_status(status_path, path, exc, delay_s, stop, logger):
                return None
            continue
        if backoff.attempts:
            logger.info("store_opened %s", fields(path=path, attempts=backoff.attempts + 1))
        return store


def wait_writing_status(
    status_path: Path, path: Path, error: StoreError, delay_s: float, stop: threading.Event,
    logger: logging.Logger,
) -> bool:
    """Wait delay_s, rewriting the status file with error every STATUS_INTERVAL_S, and
    return whether stop was set."""
    deadline = time.monotonic() + delay_s
    while True:
        status = {"ts_ms": int(time.time() * 1000), "pid": os.getpid(), "running": True,
                  "path": str(path), "store_error": str(error)}
        try:
            status_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = status_path.with_name(f".{STATUS_FILE}.tmp")
            temporary.write_text(json.dumps(status, separators=(",", ":")))
            os.replace(temporary, status_path)
        except OSError as exc:
            logger.debug("status_not_written %s", fields(path=status_path, error=exc))
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            return stop.is_set()
        if stop.wait(min(STATUS_INTERVAL_S, remaining_s)):
            return True


def run_buffer(config: Config, logger: logging.Logger, stop: threading.Event) -> None:
    """Open the store, bind the sockets and run the loop until stop is set."""
    store = wait_for_store(config.gateway.state_dir / "buffer", config.buffer, logger, stop,
                           config.gateway.runtime_dir / STATUS_FILE)
    if store is None:
        return
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
