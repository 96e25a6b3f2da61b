"""The lower bound on the real time, and the hub's Date header over real HTTPS on loopback."""

from __future__ import annotations

import email.utils
import http.server
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.clock import RELEASE_TIME_S, ClockError, HubClock, TimeFloor, fetch_hub_offset
from common.config import CredentialSettings
from common.credential_guard import CredentialGuard, DateSource
from tests.gateway_files import write_ca
from tests.support.broker import client_tls_context, free_port

LOGGER = logging.getLogger("test_clock")


class DateServer:
    """An HTTPS server on a free loopback port whose Date header is offset_s from real time."""

    def __init__(self, certs: Path, offset_s: float, send_date: bool = True,
                 host: str = "127.0.0.1") -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self.send_response_only(200)
                if send_date:
                    self.send_header("Date", email.utils.formatdate(
                        time.time() + server.offset_s, usegmt=True))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.offset_s = offset_s
        self.httpd = http.server.HTTPServer((host, 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs / "server.pem", certs / "server.key")
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, name="date-server")

    def __enter__(self) -> DateServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def context(certs: Path) -> Iterator[ssl.SSLContext]:
    yield client_tls_context(certs / "ca.pem")


def test_time_floor_starts_at_release_time(tmp_path: Path) -> None:
    floor = TimeFloor(tmp_path, LOGGER)

    assert floor.floor_s == RELEASE_TIME_S
    assert floor.source == "release time"
    assert floor.check(RELEASE_TIME_S - 1).behind
    assert not floor.check(RELEASE_TIME_S + 1).behind


def test_time_floor_raise_persists(tmp_path: Path) -> None:
    TimeFloor(tmp_path, LOGGER).raise_to(RELEASE_TIME_S + 5000, "last successful connection")

    reloaded = TimeFloor(tmp_path, LOGGER)

    assert reloaded.floor_s == RELEASE_TIME_S + 5000
    assert reloaded.source == "last successful connection"
    assert (tmp_path / "time-floor.json").stat().st_mode & 0o777 == 0o600


def test_time_floor_lower_time_ignored(tmp_path: Path) -> None:
    floor = TimeFloor(tmp_path, LOGGER)
    floor.raise_to(RELEASE_TIME_S + 5000, "hub Date header")

    floor.raise_to(RELEASE_TIME_S + 10, "last successful connection")

    assert TimeFloor(tmp_path, LOGGER).floor_s == RELEASE_TIME_S + 5000


def test_time_floor_hub_time_lowers_bound(tmp_path: Path) -> None:
    floor = TimeFloor(tmp_path, LOGGER)
    floor.raise_to(RELEASE_TIME_S + 90 * 86400, "last successful connection")

    floor.reset_to(RELEASE_TIME_S + 1000)

    reloaded = TimeFloor(tmp_path, LOGGER)
    assert reloaded.floor_s == RELEASE_TIME_S + 1000
    assert reloaded.source == "hub Date header"


def test_time_floor_invalid_file_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "time-floor.json").write_text("{not json")

    with caplog.at_level(logging.WARNING):
        floor = TimeFloor(tmp_path, LOGGER)

    assert floor.floor_s == RELEASE_TIME_S
    assert "time_floor_invalid" in caplog.text
    assert str(tmp_path / "time-floor.json") in caplog.text


def test_time_floor_file_content(tmp_path: Path) -> None:
    TimeFloor(tmp_path, LOGGER).raise_to(1_900_000_000, "hub Date header")

    document = json.loads((tmp_path / "time-floor.json").read_text())

    assert document == {"version": 1, "floor_s": 1_900_000_000,
                        "floor_utc": "2030-03-17T17:46:40Z", "source": "hub Date header"}


@pytest.mark.parametrize("offset_s", [0.0, 30 * 86400.0, -90 * 86400.0])
def test_fetch_hub_offset_reads_date(certs: Path, context: ssl.SSLContext,
                                     offset_s: float) -> None:
    with DateServer(certs, offset_s) as server:
        hub_time_s, measured_s = fetch_hub_offset("localhost", server.port, context, 5.0)

    # The header has whole seconds; the half second added for truncation bounds the error.
    assert abs(measured_s - offset_s) <= 1.5
    assert abs(hub_time_s - (time.time() + offset_s)) <= 2.0


def test_fetch_hub_offset_other_ca_rejected(certs: Path, tmp_path: Path) -> None:
    write_ca(tmp_path / "other-ca.pem", common_name="another root")
    other = client_tls_context(tmp_path / "other-ca.pem")

    with DateServer(certs, 0.0) as server, pytest.raises(ClockError) as caught:
        fetch_hub_offset("localhost", server.port, other, 5.0)

    assert f"https://localhost:{server.port}/" in str(caught.value)
    assert "certificate verify failed" in str(caught.value)


def test_fetch_hub_offset_wrong_host_name_rejected(certs: Path, context: ssl.SSLContext) -> None:
    # The server certificate names localhost, 127.0.0.1, 127.0.0.2 and ::1 only.
    with DateServer(certs, 0.0, host="127.0.0.3") as server, pytest.raises(ClockError) as caught:
        fetch_hub_offset("127.0.0.3", server.port, context, 5.0)

    assert "certificate verify failed" in str(caught.value)


def test_fetch_hub_offset_missing_date(certs: Path, context: ssl.SSLContext) -> None:
    with DateServer(certs, 0.0, send_date=False) as server, pytest.raises(ClockError) as caught:
        fetch_hub_offset("localhost", server.port, context, 5.0)

    assert "no Date header" in str(caught.value)


def test_fetch_hub_offset_refused(context: ssl.SSLContext) -> None:
    port = free_port()

    with pytest.raises(ClockError) as caught:
        fetch_hub_offset("localhost", port, context, 5.0)

    assert f"https://localhost:{port}/" in str(caught.value)


@pytest.mark.parametrize(
    "floor_text", ["Infinity", "-Infinity", "NaN", "1e300", "-5", "253402300800"],
    ids=["infinity", "minus-infinity", "nan", "huge", "negative", "year-10000"],
)
def test_time_floor_out_of_range_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                        floor_text: str) -> None:
    path = tmp_path / "time-floor.json"
    path.write_text(f'{{"version": 1, "floor_s": {floor_text}, "source": "hub Date header"}}')

    with caplog.at_level(logging.WARNING):
        floor = TimeFloor(tmp_path, LOGGER)
        check = floor.check(time.time())

    assert floor.floor_s == RELEASE_TIME_S
    assert "time_floor_invalid" in caplog.text
    assert str(path) in caplog.text
    assert "floor_s out of range" in caplog.text
    assert not check.behind
    assert "floor_utc=" in check.describe()

    # The next good update replaces the bad file.
    floor.raise_to(RELEASE_TIME_S + 100, "hub Date header")
    assert json.loads(path.read_text())["floor_s"] == RELEASE_TIME_S + 100


def load_floor_in_thread(state_dir: Path) -> TimeFloor:
    """Load the floor in a thread, so a blocking open fails the test instead of hanging it."""
    loaded: list[TimeFloor] = []
    thread = threading.Thread(target=lambda: loaded.append(TimeFloor(state_dir, LOGGER)),
                              daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive(), "TimeFloor blocked on the file"
    return loaded[0]


def test_time_floor_fifo_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    os.mkfifo(tmp_path / "time-floor.json")

    with caplog.at_level(logging.WARNING):
        floor = load_floor_in_thread(tmp_path)

    assert floor.floor_s == RELEASE_TIME_S
    assert "time_floor_invalid" in caplog.text
    assert "not a regular file (a FIFO)" in caplog.text


def test_time_floor_huge_file_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    document = {"version": 1, "floor_s": RELEASE_TIME_S + 10, "source": "x" * 1_000_000}
    (tmp_path / "time-floor.json").write_text(json.dumps(document))

    with caplog.at_level(logging.WARNING):
        floor = load_floor_in_thread(tmp_path)

    assert floor.floor_s == RELEASE_TIME_S
    assert "larger than 512 KiB" in caplog.text


def test_fetch_hub_offset_hub_time_not_ahead(certs: Path, context: ssl.SSLContext) -> None:
    # The hub time becomes the stored lower bound, so it must never be ahead of a correct
    # clock. Only the offset carries the half second for the Date header's truncation.
    for _ in range(5):
        with DateServer(certs, 0.0) as server:
            hub_time_s, offset_s = fetch_hub_offset("localhost", server.port, context, 5.0)

        assert hub_time_s <= time.time()
        assert hub_time_s == int(hub_time_s)
        assert abs(offset_s) <= 1.5


def test_credential_guard_floor_not_ahead_after_date(
    tmp_path: Path, certs: Path, context: ssl.SSLContext
) -> None:
    reports: list[str] = []
    floor = TimeFloor(tmp_path, LOGGER)
    floor.raise_to(time.time() + 7200, "last successful connection")
    with DateServer(certs, 0.0) as server:
        settings = CredentialSettings(None, tmp_path / "ca.pem", None, None, None,
                                      check_interval_s=60.0, rehash_interval_s=60.0,
                                      sas_warning_days=30.0)
        guard = CredentialGuard(
            settings, floor, HubClock(),
            DateSource("localhost", server.port, context), None, LOGGER,
            lambda kind, **_values: reports.append(kind),
        )
        guard.read_hub_time("test")

    # A floor from a clock that ran ahead is lowered to the hub's time, never above it.
    assert floor.floor_s <= time.time()
    assert floor.source == "hub Date header"
    guard.before_connect(retrying=False)
    assert "clock_behind" not in reports
