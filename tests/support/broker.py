"""Real network counterparts for uplink tests: mosquitto over TLS, a silent server, a subscriber.

Every wait here polls with a deadline and fails naming what it waited for.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from devstack.mosquitto import find_mosquitto, wait_for_tls, write_config
from tests.gateway_files import stop_process


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def client_tls_context(ca_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=str(ca_file))
    return context


class Broker:
    """mosquitto with TLS on a free loopback port, configured by devstack.mosquitto."""

    def __init__(
        self,
        certs_dir: Path,
        workdir: Path,
        port: int | None = None,
        allow_anonymous: bool = True,
        persistence: bool = False,
    ) -> None:
        self.certs_dir = certs_dir
        self.persistence = persistence
        self.allow_anonymous = allow_anonymous
        self.workdir = workdir
        self.port = port or free_port()
        self.ca_file = certs_dir / "ca.pem"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.workdir / "mosquitto.log"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def start(self, timeout_s: float = 10.0) -> None:
        config = write_config(
            self.port,
            self.certs_dir,
            self.workdir,
            allow_anonymous=self.allow_anonymous,
            persistence=self.persistence,
        )
        self.process = subprocess.Popen(
            [find_mosquitto(), "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until the broker completes a TLS handshake; fail early if it exited."""
        try:
            wait_for_tls(self.port, self.ca_file, timeout_s, self.process)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}; mosquitto log:\n{self.log()}") from None

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop with SIGTERM, then SIGKILL if mosquitto has not exited within timeout_s."""
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, timeout_s)

    def restart(self, timeout_s: float = 10.0) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start(timeout_s)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class SilentServer:
    """A loopback TCP listener that accepts connections and never sends a byte."""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self._connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="silent-server", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._connections.append(connection)
            self.accepted += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._listener.close()
        for connection in self._connections:
            connection.close()


class SubscriberClient:
    """A paho client that subscribes to one topic filter with QoS 1 over TLS.

    The subscription is renewed in on_connect, so it survives a broker restart. A subclass
    records what arrives in _on_message, under self._condition.
    """

    def __init__(
        self,
        port: int,
        ca_file: Path,
        topic_filter: str,
        *,
        client_id: str,
        clean_session: bool,
        reconnect_delay_s: tuple[float, float],
        keepalive_s: int,
    ) -> None:
        self.topic_filter = topic_filter
        self.port = port
        self.keepalive_s = keepalive_s
        self._condition = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
        min_delay_s, max_delay_s = reconnect_delay_s
        self.client.reconnect_delay_set(min_delay=min_delay_s, max_delay=max_delay_s)
        self.client.tls_set_context(client_tls_context(ca_file))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def start(self, timeout_s: float = 10.0) -> None:
        self.client.connect("localhost", self.port, keepalive=self.keepalive_s)
        self.client.loop_start()
        if not self._subscribed.wait(timeout_s):
            raise AssertionError(
                f"subscriber got no SUBACK for {self.topic_filter} within {timeout_s:g} s"
            )

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any,
                    _properties: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.topic_filter, qos=1)

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int, _reasons: Any,
                      _properties: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        raise NotImplementedError


class Subscriber(SubscriberClient):
    """A subscriber that records every (topic, payload) pair.

    With persistent_session, the broker keeps the session and queues messages while the
    subscriber is away, so nothing published during a reconnect is missed.
    """

    def __init__(
        self, port: int, ca_file: Path, topic_filter: str, persistent_session: bool = False
    ) -> None:
        # Reconnect quickly after a broker restart instead of paho's default of up to 120 s.
        super().__init__(
            port, ca_file, topic_filter,
            client_id=f"test-subscriber-{port}",
            clean_session=not persistent_session,
            reconnect_delay_s=(0.1, 0.5),
            keepalive_s=30,
        )
        self._messages: list[tuple[str, bytes]] = []

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._condition:
            self._messages.append((message.topic, bytes(message.payload)))
            self._condition.notify_all()

    @property
    def messages(self) -> list[tuple[str, bytes]]:
        with self._condition:
            return list(self._messages)

    def wait_for(
        self,
        predicate: Callable[[list[tuple[str, bytes]]], Any],
        timeout_s: float,
        what: str = "the expected messages",
    ) -> Any:
        """Wait until predicate(messages) is true and return its value; fail naming what."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while True:
                value = predicate(list(self._messages))
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout_s:g} s waiting for {what}; "
                        f"received {len(self._messages)} messages"
                    )
                self._condition.wait(remaining)
