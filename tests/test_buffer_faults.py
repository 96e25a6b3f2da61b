"""Fault tests of the store-and-forward path: kill -9, long outages, early PUBACKs, restarts.

Everything here is real: buffer and uplink processes started with `python -m`, SIGKILL,
SIGSTOP and SIGCONT, mosquitto over TLS on loopback and LMDB files in a temporary folder.
Where a test needs to see inside the traffic, a test-side DEALER plays the reader or the
uplink through common/wire.py, or a relay counts the pages between the two processes.

The random choices of kill moments come from a seed that each run prints. Set PB_FAULT_SEED
to repeat a run's choices. The processes' own timing still varies.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq

from common import payload, wire
from tests.support.broker import Broker, SilentServer
from tests.support.delivery_proxy import DeliveryProxy
from tests.support.fault_stack import (
    GatewayProcess,
    TapReader,
    data_file_identity,
    read_pages,
    wait_until,
    write_config,
)
from tests.support.page_subscriber import PageSubscriber
from tests.support.zmq_peers import ReaderPeer, UplinkPeer, make_samples

pytestmark = pytest.mark.integration

TOPIC_FILTER = "plcbridge/+/pages"
READY = "buffer_ready"

# The reader's default plc.max_unacked_batches.
READER_WINDOW = 16


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def programs() -> Iterator[list[GatewayProcess]]:
    """Collect the gateway processes a test starts, and SIGKILL those still running."""
    started: list[GatewayProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.kill()


@pytest.fixture
def broker(certs: Path, base: Path) -> Iterator[Broker]:
    """Provide mosquitto on a reserved port, not yet started. Afterwards continue and stop it."""
    server = Broker(certs, base / "mosquitto")
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)
        server.stop()


@pytest.fixture
def subscribers() -> Iterator[list[PageSubscriber]]:
    started: list[PageSubscriber] = []
    try:
        yield started
    finally:
        for subscriber in started:
            subscriber.stop()


def start_subscriber(broker: Broker, started: list[PageSubscriber]) -> PageSubscriber:
    subscriber = PageSubscriber(broker.port, broker.ca_file, TOPIC_FILTER)
    subscriber.start()
    started.append(subscriber)
    return subscriber


def new_process(programs: list[GatewayProcess], name: str, config: Path,
                module: str = "") -> GatewayProcess:
    process = GatewayProcess(name, config, config.parent / "log", module=module)
    programs.append(process)
    return process


def fault_seed() -> int:
    seed = int(os.environ.get("PB_FAULT_SEED", time.time_ns() % 2**32))
    print(f"PB_FAULT_SEED={seed}")
    return seed


def sample_seqs(page: bytes) -> list[int]:
    _page_seq, samples = payload.parse_page(page)
    return [sample["seq"] for sample in samples]


def fill_store(context: zmq.Context[zmq.Socket[bytes]], runtime_dir: Path, epoch: int,
               batches: int, batch_samples: int) -> None:
    """Send batches as the reader does, at most READER_WINDOW unacknowledged, until all are
    acknowledged."""
    reader = ReaderPeer(context, runtime_dir)
    try:
        for batch_seq in range(batches):
            samples = make_samples(epoch, batch_seq * batch_samples, batch_samples)
            reader.send_batch(epoch, batch_seq, samples)
            if batch_seq >= READER_WINDOW:
                reader.wait_for_ack(epoch, batch_seq - READER_WINDOW, timeout_s=20.0)
        reader.wait_for_ack(epoch, batches - 1, timeout_s=20.0)
    finally:
        reader.close()


# -- kill -9 of the buffer at random moments ----------------------------------------------


@dataclass
class KillRunFlow:
    """A test-side reader and uplink around a buffer that is killed again and again.

    The reader sends numbered batches of batch_samples samples and, like the real reader,
    resends every unacknowledged batch after a new buffer starts. The uplink acknowledges
    every page as soon as it arrives.
    """

    epoch: int
    batch_samples: int
    acked: int = -1  # the highest batch_seq acknowledged so far
    sent_limit: int | None = None  # no batch_seq at or above this is sent
    pages: dict[int, bytes] = field(default_factory=dict)
    redelivered_pages: int = 0
    owner: dict[int, int] = field(default_factory=dict)  # sample seq -> its page_seq
    stored_twice: list[tuple[int, int, int]] = field(default_factory=list)

    def serve(self, reader: ReaderPeer, uplink: UplinkPeer, session: str,
              duration_s: float) -> None:
        """Send batches and acknowledge pages for duration_s."""
        poller = zmq.Poller()
        poller.register(reader.socket, zmq.POLLIN)
        poller.register(uplink.socket, zmq.POLLIN)
        uplink.link(session, free=8)
        next_seq = self.acked + 1
        deadline = time.monotonic() + duration_s
        while True:
            while next_seq - self.acked <= READER_WINDOW and (
                    self.sent_limit is None or next_seq < self.sent_limit):
                first = next_seq * self.batch_samples
                reader.send_batch(self.epoch, next_seq,
                                  make_samples(self.epoch, first, self.batch_samples))
                next_seq += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            ready = dict(poller.poll(max(1, int(min(remaining, 0.02) * 1000))))
            if reader.socket in ready:
                self._take_acks(reader)
            if uplink.socket in ready:
                self._take_pages(uplink, session)

    def _take_acks(self, reader: ReaderPeer) -> None:
        while True:
            try:
                message = wire.decode(reader.socket.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            assert message.kind == wire.ACK
            assert message.header["epoch"] == self.epoch
            self.acked = max(self.acked, message.header["batch_seq"])

    def _take_pages(self, uplink: UplinkPeer, session: str) -> None:
        while True:
            try:
                message = wire.decode(uplink.socket.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            page_seq = message.header["page_seq"]
            assert message.payload is not None
            if page_seq in self.pages:
                # A page redelivered after a kill must be the same page.
                assert self.pages[page_seq] == message.payload, f"page {page_seq} changed"
                self.redelivered_pages += 1
            else:
                self.pages[page_seq] = message.payload
                self._note_samples(page_seq, message.payload)
            uplink.puback(session, page_seq)

    def _note_samples(self, page_seq: int, page: bytes) -> None:
        """Record the page of each sample, and every sample found in two pages."""
        for seq in sample_seqs(page):
            if seq in self.owner:
                self.stored_twice.append((seq, self.owner[seq], page_seq))
            else:
                self.owner[seq] = page_seq


def open_peers(context: zmq.Context[zmq.Socket[bytes]],
               runtime_dir: Path) -> tuple[ReaderPeer, UplinkPeer]:
    return ReaderPeer(context, runtime_dir), UplinkPeer(context, runtime_dir)


def check_store_pages(store_dir: Path, kill: int) -> int:
    """Open the killed buffer's store read-only and check that every page is whole JSON."""
    # A kill early in the first start can come before LMDB created the store. Nothing was
    # acknowledged then, and the final delivery check still covers every batch.
    if not (store_dir / "data.mdb").exists():
        return 0
    pages = read_pages(store_dir)
    for page_seq, page in pages.items():
        found_seq, _samples = payload.parse_page(page)
        assert found_seq == page_seq, f"kill {kill}: page key {page_seq} holds {found_seq}"
    return len(pages)


def drain_everything(flow: KillRunFlow, reader: ReaderPeer, uplink: UplinkPeer,
                     store_dir: Path, total_samples: int, timeout_s: float = 20.0) -> None:
    """Serve the last buffer until every sample arrived, or the store stays empty."""
    deadline = time.monotonic() + timeout_s
    quiet_rounds = 0
    while len(flow.owner) < total_samples and time.monotonic() < deadline:
        pages_before = len(flow.pages)
        flow.serve(reader, uplink, "final", 0.2)
        all_acked = flow.sent_limit is not None and flow.acked == flow.sent_limit - 1
        idle = all_acked and len(flow.pages) == pages_before and not read_pages(store_dir)
        quiet_rounds = quiet_rounds + 1 if idle else 0
        if quiet_rounds >= 3:
            return


def test_buffer_kill9_random_moments_keeps_acked(
    base: Path, context: zmq.Context[zmq.Socket[bytes]], programs: list[GatewayProcess]
) -> None:
    kills = 200
    rng = random.Random(fault_seed())
    config = write_config(base, buffer={"page_max_samples": 50, "page_max_age_ms": 20,
                                        "commit_max_batches": 8})
    buffer = new_process(programs, "buffer", config)
    store_dir = base / "state" / "buffer"
    flow = KillRunFlow(epoch=5, batch_samples=10)
    kills_at_start = 0
    acked_at_kill: list[int] = []

    for kill in range(kills):
        # About one kill in eight lands while the process starts and opens the store, the
        # others at a random moment while batches and pages flow.
        if rng.random() < 0.125:
            buffer.start()
            time.sleep(rng.uniform(0.03, 0.15))  # the random moment of this kill
            kills_at_start += 1
        else:
            buffer.start(READY)
            reader, uplink = open_peers(context, base / "run")
            try:
                flow.serve(reader, uplink, f"s{kill}", rng.uniform(0.0, 0.15))
            finally:
                buffer.kill()
                reader.close()
                uplink.close()
        buffer.kill()
        acked_at_kill.append(flow.acked)
        check_store_pages(store_dir, kill)

    # A last buffer takes every batch not yet acknowledged and delivers everything.
    flow.sent_limit = flow.acked + READER_WINDOW + 1
    total_samples = flow.sent_limit * flow.batch_samples
    buffer.start(READY)
    reader, uplink = open_peers(context, base / "run")
    drain_everything(flow, reader, uplink, store_dir, total_samples)
    reader.close()
    uplink.close()
    assert buffer.terminate() == 0

    # Every batch the reader saw acknowledged, before any of the kills, was delivered.
    delivered = flow.owner
    assert not flow.stored_twice, f"(sample, page, page): {flow.stored_twice[:10]}"
    lost_batches = sorted({seq // flow.batch_samples
                           for seq in set(range(total_samples)) - set(delivered)})
    lost_after_ack = [(batch, next(kill for kill, acked in enumerate(acked_at_kill)
                                   if acked >= batch))
                      for batch in lost_batches if batch <= acked_at_kill[-1]]
    assert not lost_after_ack, (
        f"{len(lost_after_ack)} acknowledged batches lost; (batch_seq, kill): "
        f"{lost_after_ack[:10]}")
    assert not lost_batches, f"batches never delivered: {lost_batches[:10]}"
    assert acked_at_kill[-1] >= 100, "too few batches flowed between the kills"
    assert buffer.starts == kills + 1
    assert "Traceback" not in buffer.all_logs()
    print(f"kills={kills} at_start={kills_at_start} batches={flow.sent_limit} "
          f"pages={len(flow.pages)} redelivered_pages={flow.redelivered_pages}")


# -- a long outage, then the backlog drains in order within the window -------------------


def test_buffer_outage_backlog_drains_in_order(
    base: Path, context: zmq.Context[zmq.Socket[bytes]], broker: Broker,
    programs: list[GatewayProcess], subscribers: list[PageSubscriber],
) -> None:
    # Two hours at ten pages a second: one sample a page keeps the pages small.
    pages, window = 72_000, 20
    buffer_run, uplink_run = base / "run-buffer", base / "run-uplink"
    buffer = new_process(programs, "buffer", write_config(
        base, "buffer.toml", runtime_dir=buffer_run,
        buffer={"page_max_samples": 1, "page_max_age_ms": 50}))
    uplink = new_process(programs, "uplink", write_config(
        base, "uplink.toml", runtime_dir=uplink_run, broker_port=broker.port,
        ca_file=broker.ca_file,
        uplink={"max_inflight_pages": window, "connect_timeout_s": 0.5}))
    broker.start()
    subscriber = start_subscriber(broker, subscribers)

    # The outage: the broker is frozen, so every connection attempt times out.
    assert broker.process is not None
    broker.process.send_signal(signal.SIGSTOP)
    buffer.start(READY)
    fill_store(context, buffer_run, epoch=1, batches=72, batch_samples=1000)
    tap = TapReader(context, buffer_run, "buffer")
    proxy = DeliveryProxy(buffer_run, uplink_run)
    proxy.start_and_wait()
    try:
        tap.wait_counters(lambda c: c["pages"] == pages and c["open_samples"] == 0, 20,
                          f"{pages} sealed pages")
        uplink.start()
        uplink.wait_log("connect_failed", 10)

        # The link returns.
        broker.process.send_signal(signal.SIGCONT)
        wait_until(lambda: subscriber.count() >= pages, 150,
                   f"{pages} pages at the subscriber", step_s=0.2)
        wait_until(lambda: not read_pages(buffer.config.parent / "state" / "buffer"), 10,
                   "every page deleted from the store", step_s=0.1)
        counters = tap.wait_counters(lambda c: c["pages"] == 0, 5, "an empty store")
    finally:
        proxy.stop()
        tap.close()
    assert proxy.error is None

    record = proxy.snapshot()
    assert subscriber.page_seqs == list(range(pages))
    assert subscriber.malformed == 0
    assert len(record.sessions_up) == 1
    assert record.max_outstanding == window
    assert record.pages_relayed == pages
    assert counters["dropped_pages"] == 0
    assert counters["pages_acked"] == pages


# -- a PUBACK that arrives before paho's publish() returns --------------------------------


def test_buffer_puback_on_arrival_deletes_once(
    base: Path, context: zmq.Context[zmq.Socket[bytes]], programs: list[GatewayProcess]
) -> None:
    pages = 300
    config = write_config(base, buffer={"page_max_samples": 10, "page_max_age_ms": 50})
    buffer = new_process(programs, "buffer", config)
    buffer.start(READY)
    tap = TapReader(context, base / "run", "buffer")
    uplink = UplinkPeer(context, base / "run")
    fill_store(context, base / "run", epoch=1, batches=pages, batch_samples=10)

    # The puback goes back the moment a page arrives, before the test reads anything else.
    received: list[int] = []
    uplink.link("s1", free=20)
    deadline = time.monotonic() + 20
    while len(received) < pages:
        assert time.monotonic() < deadline, f"only {len(received)} of {pages} pages arrived"
        page = uplink.receive_page(0.5)
        if page is not None:
            uplink.puback("s1", page[0])
            received.append(page[0])
    assert uplink.receive_page(0.3) is None

    counters = tap.wait_counters(lambda c: c["pages_acked"] == pages, 5, "every page acked")
    assert received == list(range(pages))
    assert counters["pages_sent"] == pages
    assert counters["pages"] == 0
    assert counters["bytes"] == 0
    assert read_pages(base / "state" / "buffer") == {}
    uplink.close()
    tap.close()


def test_uplink_puback_before_publish_returns(
    base: Path, context: zmq.Context[zmq.Socket[bytes]], broker: Broker,
    programs: list[GatewayProcess], subscribers: list[PageSubscriber],
) -> None:
    # With one page in flight, the bytes the launcher waits for are that page's PUBACK.
    pages = 200
    config = write_config(base, buffer={"page_max_samples": 10, "page_max_age_ms": 50},
                          uplink={"max_inflight_pages": 1}, broker_port=broker.port,
                          ca_file=broker.ca_file)
    broker.start()
    subscriber = start_subscriber(broker, subscribers)
    buffer = new_process(programs, "buffer", config)
    uplink = new_process(programs, "uplink", config,
                         module="tests.support.late_publish_return")
    buffer.start(READY)
    buffer_tap = TapReader(context, base / "run", "buffer")
    uplink.start()
    uplink.wait_log("connected endpoint=", 10)

    fill_store(context, base / "run", epoch=1, batches=pages, batch_samples=10)
    subscriber.wait_for_pages(set(range(pages)), 60)
    counters = buffer_tap.wait_counters(lambda c: c["pages_acked"] == pages, 5,
                                        "every page acked")
    assert uplink.terminate() == 0
    buffer_tap.close()

    found = re.search(r"late_publish_return publishes=(\d+) answered_before_return=(\d+)",
                      uplink.log())
    assert found is not None, uplink.log()
    publishes, answered = int(found.group(1)), int(found.group(2))
    assert publishes == pages
    assert answered >= pages * 0.9, f"only {answered} PUBACKs came before publish() returned"
    assert subscriber.page_seqs == list(range(pages))
    assert counters["pages_sent"] == pages
    assert counters["pages"] == 0
    assert read_pages(base / "state" / "buffer") == {}


# -- kill -9 of the uplink with pages in flight -------------------------------------------


def test_uplink_kill9_in_flight_pages_kept(
    base: Path, context: zmq.Context[zmq.Socket[bytes]], broker: Broker,
    programs: list[GatewayProcess], subscribers: list[PageSubscriber],
) -> None:
    pages, window = 60, 20
    config = write_config(base, buffer={"page_max_samples": 10, "page_max_age_ms": 50},
                          uplink={"max_inflight_pages": window}, broker_port=broker.port,
                          ca_file=broker.ca_file)
    broker.start()
    subscriber = start_subscriber(broker, subscribers)
    buffer = new_process(programs, "buffer", config)
    uplink = new_process(programs, "uplink", config)
    buffer.start(READY)
    buffer_tap = TapReader(context, base / "run", "buffer")
    uplink_tap = TapReader(context, base / "run", "uplink")
    uplink.start()
    uplink.wait_log("connected endpoint=", 10)

    # The broker freezes, so the uplink publishes its window of pages and no PUBACK comes.
    assert broker.process is not None
    broker.process.send_signal(signal.SIGSTOP)
    fill_store(context, base / "run", epoch=1, batches=pages, batch_samples=10)
    uplink_tap.wait_counters(
        lambda c: c["pages_published"] == window and c["inflight"] == window, 10,
        f"{window} pages published and unacknowledged")
    buffer_tap.wait_counters(lambda c: c["in_flight"] == window, 5,
                             f"{window} pages in flight at the buffer")

    uplink.kill()
    stored = read_pages(base / "state" / "buffer")
    assert set(range(window)) <= set(stored)
    assert len(stored) == pages

    # The broker resumes and the uplink restarts: every page arrives, and the store empties.
    broker.process.send_signal(signal.SIGCONT)
    uplink.start()
    subscriber.wait_for_pages(set(range(pages)), 30)
    wait_until(lambda: not read_pages(base / "state" / "buffer"), 10,
               "every page deleted from the store", step_s=0.1)
    buffer_tap.close()
    uplink_tap.close()
    print(f"pages received twice: {subscriber.count() - len(subscriber.distinct())}")


# -- a restart or reconnect with the same settings keeps the store ------------------------


@dataclass(frozen=True)
class StoreSnapshot:
    data_file: tuple[int, int]
    pages: dict[int, bytes]


def snapshot(store_dir: Path) -> StoreSnapshot:
    return StoreSnapshot(data_file_identity(store_dir), read_pages(store_dir))


def test_buffer_same_settings_restart_keeps_store(
    base: Path, certs: Path, context: zmq.Context[zmq.Socket[bytes]],
    programs: list[GatewayProcess],
) -> None:
    silent = SilentServer()
    config = write_config(base, buffer={"page_max_samples": 10, "page_max_age_ms": 50},
                          uplink={"connect_timeout_s": 0.2}, broker_port=silent.port,
                          ca_file=certs / "ca.pem")
    store_dir = base / "state" / "buffer"
    buffer = new_process(programs, "buffer", config)
    buffer.start(READY)
    fill_store(context, base / "run", epoch=1, batches=30, batch_samples=10)
    wait_until(lambda: len(read_pages(store_dir)) == 30, 5, "30 sealed pages")
    before = snapshot(store_dir)

    try:
        # Reconnects: new sessions, a link down and up, and a new DEALER, with no puback.
        for session in ("a", "b", "c"):
            uplink_peer = UplinkPeer(context, base / "run")
            uplink_peer.link(session, free=5)
            assert uplink_peer.receive_page(5.0) is not None
            uplink_peer.link(session, state="down", free=0)
            uplink_peer.close()
        assert snapshot(store_dir) == before

        # The real uplink, against a server that sends nothing, reconnects again and again.
        uplink = new_process(programs, "uplink", config)
        uplink.start()
        wait_until(lambda: uplink.log().count("connect_failed") >= 3, 10,
                   "three failed connection attempts")
        uplink.terminate()
        assert snapshot(store_dir) == before

        # Restarts with an identical configuration, saved again as an operator would, after
        # SIGTERM and after SIGKILL.
        for stop in ("terminate", "kill", "terminate"):
            config.write_text(config.read_text())
            if stop == "kill":
                buffer.kill()
            else:
                assert buffer.terminate() == 0
            buffer.start(READY)
            assert snapshot(store_dir) == before
            assert "pages=30" in buffer.log()
    finally:
        silent.close()
