"""The uplink process against a real mosquitto over TLS, with a test-side ROUTER as the buffer."""

from __future__ import annotations

import base64
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from common import wire
from common.credentials import mint_sas_token
from common.payload import build_page
from devstack.dev_certs import ensure_dev_certs
from devstack.gateway_toml import gateway_dirs, gateway_toml
from processes.uplink import Wakeup, held_long_enough
from tests.support.broker import Broker, SilentServer, Subscriber
from tests.support.fault_stack import SPEED_TAG
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
DEVICE_ID = "uplink-test-device"
DEVICE_KEY = base64.b64encode(b"uplink-test-device-key-32-bytes!").decode()
PROPERTY_BAG = "&$.ct=application%2Fjson&$.ce=utf-8"
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")



def sample_page(page_seq: int, samples: int = 3) -> bytes:
    batch = json.dumps([
        {"name": "line1.speed", "value": float(i), "quality": "good",
         "ts_ms": 1764806400000 + i, "epoch": 1, "seq": page_seq * samples + i}
        for i in range(samples)
    ], separators=(",", ":")).encode()
    return build_page(page_seq, [batch])


class StandInBuffer:
    """The buffer's delivery ROUTER, driven by the test: records link and puback messages."""

    def __init__(self, runtime_dir: Path) -> None:
        runtime_dir.mkdir(parents=True, exist_ok=True)
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.router = wire.make_socket(self.context, zmq.ROUTER, wire.DATA_HWM, linger_ms=0)
        self.router.bind(wire.endpoint(runtime_dir, wire.DELIVERY))
        self.links: list[dict[str, Any]] = []
        self.pubacks: list[dict[str, Any]] = []
        self.peer: bytes | None = None

    def pump(self, timeout_s: float) -> None:
        if self.router.poll(int(timeout_s * 1000)):
            while True:
                try:
                    frames = self.router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
                self.peer = frames[0]
                message = wire.decode(frames[1:])
                target = self.links if message.kind == wire.LINK else self.pubacks
                target.append(message.header)

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out after {timeout_s:g} s waiting for {what}; "
                    f"links={self.links[-3:]} pubacks={len(self.pubacks)}"
                )
            self.pump(min(remaining, 0.1))

    def wait_link(
        self, state: str, timeout_s: float, not_session: str | None = None
    ) -> dict[str, Any]:
        """Wait until the latest link message has state, in a session other than not_session."""

        def found() -> dict[str, Any] | None:
            if not self.links:
                return None
            latest = self.links[-1]
            if latest["state"] != state or latest["session"] == not_session:
                return None
            return latest

        link: dict[str, Any] = self.wait_for(found, timeout_s, f"link {state}")
        return link

    def send_page(self, page_seq: int, payload: bytes) -> None:
        assert self.peer is not None, "no uplink has connected yet"
        self.router.send_multipart(
            [self.peer, *wire.encode(wire.PAGE, {"page_seq": page_seq, "count": 3}, payload)]
        )

    def close(self) -> None:
        self.router.close(linger=0)
        self.context.term()


class UplinkProcess:
    """`python -m processes.uplink` with its stdout and stderr in a file."""

    def __init__(self, base: Path, config_text: str) -> None:
        self.config = base / "uplink.toml"
        self.config.write_text(config_text)
        self.output = base / "uplink.out"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        with self.output.open("wb") as stream:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "processes.uplink", "--config", str(self.config)],
                cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, env=env,
            )

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def wait_log(self, pattern: str, timeout_s: float, count: int = 1) -> list[str]:
        regex = re.compile(pattern)

        def matches() -> list[str] | None:
            found = [line for line in self.log().splitlines() if regex.search(line)]
            return found if len(found) >= count else None

        try:
            lines: list[str] = wait_until(matches, timeout_s, f"{count} log lines /{pattern}/")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; uplink output:\n{self.log()}") from None
        return lines

    def wait_exit(self, timeout_s: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout_s)

    def terminate(self, timeout_s: float) -> tuple[int, float]:
        """Send SIGTERM; return the exit code and the seconds until exit."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout_s)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def uplink_config(
    base: Path,
    port: int,
    ca_file: Path,
    *,
    uplink: str = "",
    credentials: str = "",
    log_level: str = "INFO",
) -> str:
    return gateway_toml(
        gateway={**gateway_dirs(base), "log_level": log_level},
        tags=[SPEED_TAG],
        uplink=[{"port": port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0}, uplink],
        credentials=[{"ca_file": str(ca_file)}, credentials],
    )


def azure_config(base: Path, port: int, ca_file: Path, uplink: str = "", **kwargs: Any) -> str:
    credentials = f'connection_string_file = "{base}/connection-string.txt"'
    return uplink_config(base, port, ca_file, uplink=f'mode = "azure"\n{uplink}',
                         credentials=credentials, **kwargs)


def write_connection_string(base: Path, text: str | None = None) -> None:
    if text is None:
        text = f"HostName=localhost;DeviceId={DEVICE_ID};SharedAccessKey={DEVICE_KEY}"
    (base / "connection-string.txt").write_text(text + "\n")


@pytest.fixture
def broker(certs: Path, base: Path) -> Iterator[Broker]:
    server = Broker(certs, base / "mosquitto")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def buffer(base: Path) -> Iterator[StandInBuffer]:
    stand_in = StandInBuffer(base / "run")
    try:
        yield stand_in
    finally:
        stand_in.close()


@pytest.fixture
def uplinks() -> Iterator[Callable[..., UplinkProcess]]:
    started: list[UplinkProcess] = []

    def start(base: Path, config_text: str, env: dict[str, str] | None = None) -> UplinkProcess:
        process = UplinkProcess(base, config_text)
        process.start(env)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill()


@pytest.fixture
def subscriber(broker: Broker) -> Iterator[Subscriber]:
    client = Subscriber(broker.port, broker.ca_file, "devices/+/messages/events/#")
    try:
        client.start()
        yield client
    finally:
        client.stop()


def telemetry_topic(page_seq: int) -> str:
    return f"devices/{DEVICE_ID}/messages/events/$.mid={page_seq}{PROPERTY_BAG}"


def test_uplink_pages_flow(
    base: Path, broker: Broker, buffer: StandInBuffer, subscriber: Subscriber, uplinks: Any
) -> None:
    write_connection_string(base)
    uplink = uplinks(base, azure_config(base, broker.port, broker.ca_file,
                                        "max_inflight_pages = 8"))

    link = buffer.wait_link("up", 15)
    assert link["free"] == 8
    pages = {seq: sample_page(seq) for seq in range(100, 108)}
    for seq, payload in pages.items():
        buffer.send_page(seq, payload)

    received = subscriber.wait_for(lambda messages: len(messages) >= 8 and messages, 10,
                                   "8 pages at the broker")
    assert sorted(received) == sorted((telemetry_topic(seq), pages[seq]) for seq in pages)
    buffer.wait_for(lambda: len(buffer.pubacks) >= 8, 10, "8 pubacks")
    assert sorted(ack["page_seq"] for ack in buffer.pubacks) == sorted(pages)
    assert {ack["session"] for ack in buffer.pubacks} == {link["session"]}

    code, _elapsed = uplink.terminate(10)
    assert code == 0
    assert "Traceback" not in uplink.log()


def test_uplink_pages_flow_sustained(
    base: Path, broker: Broker, buffer: StandInBuffer, subscriber: Subscriber, uplinks: Any
) -> None:
    """Keep the credit window full, as the buffer does in a drain, and check every page."""
    write_connection_string(base)
    uplink = uplinks(base, azure_config(base, broker.port, broker.ca_file,
                                        "max_inflight_pages = 20"))
    link = buffer.wait_link("up", 15)
    total = 600
    next_seq = 0
    while next_seq < link["free"]:
        buffer.send_page(next_seq, sample_page(next_seq))
        next_seq += 1

    # Each puback frees one slot, which the next page takes at once.
    deadline = time.monotonic() + 30
    while len(buffer.pubacks) < total:
        assert time.monotonic() < deadline, f"only {len(buffer.pubacks)} of {total} pubacks"
        buffer.pump(0.1)
        while next_seq < min(total, len(buffer.pubacks) + link["free"]):
            buffer.send_page(next_seq, sample_page(next_seq))
            next_seq += 1

    assert sorted(ack["page_seq"] for ack in buffer.pubacks) == list(range(total))
    assert {ack["session"] for ack in buffer.pubacks} == {link["session"]}
    received = subscriber.wait_for(lambda messages: len(messages) >= total and messages, 10,
                                   f"{total} pages at the broker")
    assert sorted(topic for topic, _payload in received) == sorted(
        telemetry_topic(seq) for seq in range(total))
    code, _elapsed = uplink.terminate(10)
    assert code == 0


def test_uplink_wakeup_coalesces_notifies() -> None:
    wakeup = Wakeup()
    try:
        # Until the reader drains, further notifies write nothing.
        for _ in range(3):
            wakeup.notify()
        assert select.select([wakeup], [], [], 0)[0] == [wakeup]
        assert os.read(wakeup.fileno(), 16) == b"\0"
        assert select.select([wakeup], [], [], 0)[0] == []

        # After a drain, the next notify wakes the reader again.
        wakeup.drain()
        wakeup.notify()
        assert select.select([wakeup], [], [], 1.0)[0] == [wakeup]
        wakeup.drain()
        assert select.select([wakeup], [], [], 0)[0] == []
    finally:
        wakeup.close()


def test_uplink_mqtt_mode_topic_template(
    base: Path, broker: Broker, buffer: StandInBuffer, uplinks: Any
) -> None:
    password_file = base / "password.txt"
    password_file.write_text("broker-password-not-for-logs\n")
    client = Subscriber(broker.port, broker.ca_file, "plant/#")
    client.start()
    try:
        config = uplink_config(
            base, broker.port, broker.ca_file,
            uplink='mode = "mqtt"\n\n[uplink.broker]\nhost = "localhost"\n'
                   'client_id = "gw-7"\nusername = "gw"\n'
                   'topic_template = "plant/{client_id}/pages/{page_seq}"',
            credentials=f'password_file = "{password_file}"',
        )
        uplink = uplinks(base, config)
        buffer.wait_link("up", 15)
        buffer.send_page(5, sample_page(5))

        received = client.wait_for(lambda messages: messages, 10, "one page")
        assert received == [("plant/gw-7/pages/5", sample_page(5))]
        buffer.wait_for(lambda: buffer.pubacks, 10, "a puback")
        assert buffer.pubacks[0]["page_seq"] == 5
        assert "broker-password-not-for-logs" not in uplink.log()
    finally:
        client.stop()


def test_uplink_logs_c2d_message(
    base: Path, broker: Broker, buffer: StandInBuffer, subscriber: Subscriber, uplinks: Any
) -> None:
    write_connection_string(base)
    uplink = uplinks(base, azure_config(base, broker.port, broker.ca_file))
    buffer.wait_link("up", 15)
    uplink.wait_log(r"connected ", 5)

    # The uplink subscribes right after CONNACK; publish until its subscription catches one.
    topic = f"devices/{DEVICE_ID}/messages/devicebound/%24.to=%2Fdevices%2F{DEVICE_ID}"

    def delivered() -> bool:
        subscriber.client.publish(topic, b'{"command": "reset"}', qos=1)
        return "c2d_message" in uplink.log()

    wait_until(delivered, 10, "a c2d_message log line")
    line = uplink.wait_log(r"c2d_message", 1)[0]
    assert "bytes=20" in line
    # The body is never logged, because a command may carry a secret.
    assert "reset" not in line
    rejection = uplink.wait_log(r"command_rejected", 5)[0]
    assert "command=reset" in rejection
    assert "reason=malformed" in rejection


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "connection-string file not found"),
        ("HostName=localhost;DeviceId=d1;SharedAccessKey", "invalid part"),
        ("HostName=localhost;SharedAccessKey=c2VjcmV0LWtleS12YWx1ZQ==", "missing key 'DeviceId'"),
        ("HostName=localhost;DeviceId=d1;SharedAccessKey=secret!value!", "not base64"),
        ("HostName=localhost;DeviceId=d1;SharedAccessKey=c2VjcmV0LWtleS12YWx1ZQ==;x509=true",
         "expected exactly one of"),
    ],
    ids=["missing-file", "no-equals", "no-device-id", "bad-base64", "two-schemes"],
)
def test_uplink_credential_error_exits(
    base: Path, certs: Path, uplinks: Any, content: str | None, expected: str
) -> None:
    if content is not None:
        write_connection_string(base, content)
    uplink = uplinks(base, azure_config(base, 1, certs / "ca.pem"))

    code = uplink.wait_exit(15)
    output = uplink.log()
    assert code != 0
    assert expected in output
    assert "Traceback" not in output
    assert "c2VjcmV0LWtleS12YWx1ZQ" not in output
    assert "secret!value!" not in output


def test_uplink_broker_restart_new_session(
    base: Path, broker: Broker, buffer: StandInBuffer, uplinks: Any
) -> None:
    write_connection_string(base)
    uplink = uplinks(base, azure_config(base, broker.port, broker.ca_file))
    first = buffer.wait_link("up", 15)

    broker.stop()
    down = buffer.wait_link("down", 10)
    assert down["session"] == first["session"]
    uplink.wait_log(r"WARNING .*disconnected .*next_delay_s=", 5)
    uplink.wait_log(r"WARNING .*connect_failed .*refused.*next_delay_s=", 5)

    broker.start()
    second = buffer.wait_link("up", 15, not_session=first["session"])
    assert second["session"] != first["session"]
    assert second["free"] == 20

    buffer.send_page(1, sample_page(1))
    buffer.wait_for(lambda: buffer.pubacks, 10, "a puback in the new session")
    assert buffer.pubacks[-1] == {"session": second["session"], "page_seq": 1}


@pytest.mark.parametrize("mode", ["azure-tls", "mqtt-plain"])
def test_uplink_silent_port_times_out(
    base: Path, certs: Path, uplinks: Any, mode: str
) -> None:
    silent = SilentServer()
    try:
        timing = "connect_timeout_s = 0.5\nshutdown_timeout_s = 1.0"
        if mode == "azure-tls":
            write_connection_string(base)
            config = azure_config(base, silent.port, certs / "ca.pem", timing)
            expected = r"connect timeout: no TCP connection or TLS handshake"
        else:
            config = uplink_config(
                base, silent.port, certs / "ca.pem",
                uplink=f'mode = "mqtt"\n{timing}\n\n[uplink.broker]\nhost = "127.0.0.1"\n'
                       'client_id = "gw"\ntls = false',
            )
            expected = r"connect timeout: no CONNACK from 127.0.0.1"
        uplink = uplinks(base, config)

        lines = uplink.wait_log(rf"connect_failed .*{expected}.*next_delay_s=", 10, count=2)
        assert all("WARNING" in line for line in lines)
        code, elapsed = uplink.terminate(10)
        assert code == 0
        assert elapsed < 1.0 + 2.0
        assert silent.accepted >= 2
    finally:
        silent.close()


# Where a SIGTERM finds the uplink, and the line that its shutdown logs there. In the TLS
# handshake the network thread is inside paho's connect() and is left behind. Waiting for
# the CONNACK, it stops its loop and has no session to send DISCONNECT on.
SIGTERM_BEFORE_CONNACK = {
    "azure-tls": "stop_without_network_thread ",
    "mqtt-plain": "link_stopped steps=network_loop_stopped,disconnect_skipped,client_released",
}


@pytest.mark.parametrize("mode", sorted(SIGTERM_BEFORE_CONNACK))
def test_uplink_sigterm_before_connack(
    base: Path, certs: Path, uplinks: Any, mode: str
) -> None:
    silent = SilentServer()
    try:
        timing = "connect_timeout_s = 30.0\nshutdown_timeout_s = 1.0"
        if mode == "azure-tls":
            write_connection_string(base)
            config = azure_config(base, silent.port, certs / "ca.pem", timing)
        else:
            config = uplink_config(
                base, silent.port, certs / "ca.pem",
                uplink=f'mode = "mqtt"\n{timing}\n\n[uplink.broker]\nhost = "127.0.0.1"\n'
                       'client_id = "gw"\ntls = false',
            )
        uplink = uplinks(base, config)
        uplink.wait_log(r"connecting ", 10)
        wait_until(lambda: silent.accepted >= 1, 5, "the uplink's TCP connection")

        code, elapsed = uplink.terminate(10)

        assert code == 0
        assert elapsed < 1.0 + 2.0
        assert "stop version=" in uplink.log()
        assert SIGTERM_BEFORE_CONNACK[mode] in uplink.log()
    finally:
        silent.close()


SHUTDOWN_STEPS_CONNECTED = "steps=network_loop_stopped,disconnect_sent,client_released"


def test_uplink_shutdown_sends_disconnect_in_order(
    base: Path, broker: Broker, buffer: StandInBuffer, uplinks: Any
) -> None:
    write_connection_string(base)
    uplink = uplinks(base, azure_config(base, broker.port, broker.ca_file,
                                        "shutdown_timeout_s = 2.0"))
    buffer.wait_link("up", 15)

    code, elapsed = uplink.terminate(10)

    assert code == 0
    # The bound plus the time Python takes to exit on a loaded machine.
    assert elapsed < 2.0 + 2.0
    lines = uplink.wait_log(r"link_stopped ", 1)
    assert SHUTDOWN_STEPS_CONNECTED in lines[0]
    # mosquitto logs "disconnected." for a DISCONNECT, and a socket error for a bare close.
    wait_until(lambda: f"Client {DEVICE_ID} disconnected." in broker.log(), 5,
               "mosquitto's line for the DISCONNECT")
    assert f"Socket error on client {DEVICE_ID}" not in broker.log()


def test_uplink_shutdown_bounded_when_broker_stalls(
    base: Path, broker: Broker, buffer: StandInBuffer, uplinks: Any
) -> None:
    write_connection_string(base)
    uplink = uplinks(base, azure_config(base, broker.port, broker.ca_file,
                                        "shutdown_timeout_s = 1.0"))
    buffer.wait_link("up", 15)
    assert broker.process is not None

    # A stopped broker keeps its sockets open and reads nothing, as a hung one does.
    broker.process.send_signal(signal.SIGSTOP)
    try:
        code, elapsed = uplink.terminate(10)
    finally:
        broker.process.send_signal(signal.SIGCONT)

    assert code == 0
    assert elapsed < 1.0 + 2.0
    lines = uplink.wait_log(r"link_stopped ", 1)
    assert SHUTDOWN_STEPS_CONNECTED in lines[0]


def test_uplink_ca_mismatch_retries(
    base: Path, broker: Broker, buffer: StandInBuffer, uplinks: Any
) -> None:
    other_ca = base / "other-ca"
    ensure_dev_certs(other_ca)
    write_connection_string(base)
    uplink = uplinks(base, azure_config(base, broker.port, other_ca / "ca.pem"))

    lines = uplink.wait_log(
        rf"connect_failed .*TLS handshake with localhost:{broker.port} failed: "
        r"certificate verify failed", 10, count=2,
    )
    assert str(other_ca / "ca.pem") in lines[0]
    assert uplink.process is not None and uplink.process.poll() is None
    assert "Traceback" not in uplink.log()
    buffer.pump(0.1)
    assert all(link["state"] == "down" for link in buffer.links)


def test_uplink_connack_refused_logs_reason(
    base: Path, certs: Path, buffer: StandInBuffer, uplinks: Any
) -> None:
    refusing = Broker(certs, base / "refusing", allow_anonymous=False)
    refusing.start()
    try:
        write_connection_string(base)
        uplink = uplinks(base, azure_config(base, refusing.port, refusing.ca_file))
        uplink.wait_log(r"INFO .*connect_rejected_again ", 10, count=2)
        alerts = [line for line in uplink.log().splitlines() if "credentials_rejected" in line]
        assert len(alerts) == 1
        assert " ERROR " in alerts[0]
        assert "Not authorized" in alerts[0]
        assert "Traceback" not in uplink.log()
    finally:
        refusing.stop()


def test_uplink_output_has_no_secret(
    base: Path, broker: Broker, buffer: StandInBuffer, uplinks: Any
) -> None:
    expiry_s = int(time.time()) + 3600
    resource = f"localhost/devices/{DEVICE_ID}"
    token = mint_sas_token(resource, base64.b64decode(DEVICE_KEY), expiry_s)
    signature = urllib.parse.parse_qs(token.split(" ", 1)[1])["sig"][0]
    write_connection_string(
        base, f"HostName=localhost;DeviceId={DEVICE_ID};SharedAccessSignature={token}"
    )
    uplink = uplinks(base, azure_config(base, broker.port, broker.ca_file, log_level="DEBUG"))
    buffer.wait_link("up", 15)
    buffer.send_page(1, sample_page(1))
    buffer.wait_for(lambda: buffer.pubacks, 10, "a puback")
    uplink.terminate(10)

    output = uplink.log()
    assert "sas_check SAS token" in output
    assert signature not in output
    assert urllib.parse.quote(signature, safe="") not in output
    assert DEVICE_KEY not in output


def test_uplink_device_key_output_has_no_key(
    base: Path, broker: Broker, buffer: StandInBuffer, uplinks: Any
) -> None:
    write_connection_string(base)
    uplink = uplinks(base, azure_config(base, broker.port, broker.ca_file, log_level="DEBUG"))
    buffer.wait_link("up", 15)
    uplink.terminate(10)

    output = uplink.log()
    assert DEVICE_KEY not in output
    assert re.search(r"sig=(?!<redacted>)", output) is None
    assert "INFO plcbridge.uplink sas_check SAS token valid until" in output


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs Debian's faketime package")
def test_uplink_renews_sas_token(
    base: Path, broker: Broker, buffer: StandInBuffer, uplinks: Any
) -> None:
    # libfaketime runs the uplink's clocks 20 times faster, so the 48 s renewal point of a
    # 60 s token comes after about 2.4 s.
    env = dict(os.environ, LD_PRELOAD=str(LIBFAKETIME), FAKETIME="+0 x20")
    write_connection_string(base)
    uplink = uplinks(base, azure_config(base, broker.port, broker.ca_file, "sas_ttl_s = 60"),
                     env)

    first = buffer.wait_link("up", 15)
    second = buffer.wait_link("up", 15, not_session=first["session"])
    assert second["free"] == 20
    uplink.wait_log(r"INFO .*sas_renew ", 1)
    expiries = re.findall(r"sas_check SAS token valid until \S+ se=(\d+)", uplink.log())
    assert len(set(expiries)) >= 2
    assert "WARNING" not in uplink.log()


@pytest.mark.parametrize(
    ("connected_s", "reconnect_max_s", "reset"),
    [(0.0, 60.0, False), (9.9, 60.0, False), (10.0, 60.0, True), (300.0, 60.0, True),
     (4.0, 5.0, False), (5.0, 5.0, True), (0.2, 0.1, True)],
)
def test_uplink_backoff_reset_after_stable_connection(
    connected_s: float, reconnect_max_s: float, reset: bool
) -> None:
    # A connection held for 10 s resets the delay, even with reconnect_max_s at 60 s, and a
    # short reconnect_max_s lowers that bar.
    assert held_long_enough(connected_s, reconnect_max_s) is reset
