"""An MQTT subscriber that records the page_seq of every page in arrival order, cheaply.

tests.support.broker.Subscriber keeps every message and rescans them all on each arrival,
which is quadratic for tens of thousands of pages. This one reads the page_seq from the
page's first bytes, and keeps the payloads only with keep_payloads.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tests.support.broker import client_tls_context

PAGE_SEQ = re.compile(rb'^\{"page_seq":(\d+),')


class PageSubscriber:
    """Subscribes with QoS 1 over TLS and records page_seq values, and payloads on request."""

    def __init__(self, port: int, ca_file: Path, topic_filter: str,
                 keep_payloads: bool = False) -> None:
        self.topic_filter = topic_filter
        self.keep_payloads = keep_payloads
        self.page_seqs: list[int] = []
        self.payloads: dict[int, bytes] = {}
        self.malformed = 0
        self._condition = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"fault-subscriber-{port}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.tls_set_context(client_tls_context(ca_file))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.port = port

    def start(self, timeout_s: float = 10.0) -> None:
        self.client.connect("localhost", self.port, keepalive=60)
        self.client.loop_start()
        if not self._subscribed.wait(timeout_s):
            raise AssertionError(
                f"subscriber got no SUBACK for {self.topic_filter} within {timeout_s:g} s")

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

    def _on_message(self, _client: mqtt.Client, _userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        match = PAGE_SEQ.match(payload)
        with self._condition:
            if match is None:
                self.malformed += 1
            else:
                page_seq = int(match.group(1))
                self.page_seqs.append(page_seq)
                if self.keep_payloads:
                    self.payloads[page_seq] = payload
            self._condition.notify_all()

    def count(self) -> int:
        with self._condition:
            return len(self.page_seqs)

    def distinct(self) -> set[int]:
        with self._condition:
            return set(self.page_seqs)

    def wait_for_pages(self, page_seqs: set[int], timeout_s: float) -> None:
        """Wait until every page in page_seqs has arrived at least once."""
        deadline = time.monotonic() + timeout_s
        missing = set(page_seqs)
        checked = 0
        with self._condition:
            while True:
                missing.difference_update(self.page_seqs[checked:])
                checked = len(self.page_seqs)
                if not missing:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout_s:g} s: {len(missing)} pages missing at "
                        f"the subscriber, the first {sorted(missing)[:5]}; "
                        f"{checked} received")
                self._condition.wait(min(remaining, 0.5))
