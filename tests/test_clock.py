"""The lower bound on the real time, and the hub's Date header over real HTTPS on loopback."""

from __future__ import annotations

import email.utils
import http.server
import json
import logging
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.clock import RELEASE_TIME_S, ClockError, TimeFloor, fetch_hub_offset
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
    # The server certificate names localhost, 127.0.0.1 and ::1 only.
    with DateServer(certs, 0.0, host="127.0.0.2") as server, pytest.raises(ClockError) as caught:
        fetch_hub_offset("127.0.0.2", server.port, context, 5.0)

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
