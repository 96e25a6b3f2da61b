"""An MQTT subscriber that records the page_seq of every page in arrival order, cheaply.

tests.support.broker.Subscriber keeps every message and rescans them all on each arrival,
which is quadratic for tens of thousands of pages. This one reads the page_seq from the
page's first bytes, and keeps the payloads only with keep_payloads.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tests.support.broker import SubscriberClient

PAGE_SEQ = re.compile(rb'^\{"page_seq":(\d+),')


class PageSubscriber(SubscriberClient):
    """Subscribes with QoS 1 over TLS and records page_seq values, and payloads on request."""

    def __init__(self, port: int, ca_file: Path, topic_filter: str,
                 keep_payloads: bool = False) -> None:
        super().__init__(
            port, ca_file, topic_filter,
            client_id=f"fault-subscriber-{port}",
            clean_session=True,
            reconnect_delay_s=(1, 1),
            keepalive_s=60,
        )
        self.keep_payloads = keep_payloads
        self.page_seqs: list[int] = []
        self.payloads: dict[int, bytes] = {}
        self.malformed = 0

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
