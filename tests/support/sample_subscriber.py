"""An MQTT subscriber that records which reader sequence numbers arrived, for long loads.

tests.support.broker.Subscriber keeps every payload, and tests.support.delivery parses them
all again at each check. At 10,000 samples/s for minutes that costs more than the gateway
under test. This one parses each page once, as it arrives, and marks (epoch, seq) in one
bit array per epoch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tests.support.broker import SubscriberClient


class SeqBitmap:
    """The sequence numbers of one epoch that arrived, one bit each."""

    def __init__(self) -> None:
        self.bits = bytearray()
        self.count = 0
        self.duplicates = 0

    def add(self, seq: int) -> None:
        index, bit = divmod(seq, 8)
        if index >= len(self.bits):
            self.bits.extend(bytes(index + 1 - len(self.bits) + 4096))
        if self.bits[index] & (1 << bit):
            self.duplicates += 1
            return
        self.bits[index] |= 1 << bit
        self.count += 1

    def missing(self, total: int, limit: int = 10) -> list[int]:
        """Return up to limit sequence numbers below total that did not arrive."""
        found: list[int] = []
        for seq in range(total):
            index, bit = divmod(seq, 8)
            if index >= len(self.bits) or not self.bits[index] & (1 << bit):
                found.append(seq)
                if len(found) >= limit:
                    break
        return found


class SampleSubscriber(SubscriberClient):
    """Subscribes with a persistent session and marks every sample's (epoch, seq)."""

    def __init__(self, port: int, ca_file: Path, topic_filter: str) -> None:
        super().__init__(
            port, ca_file, topic_filter,
            client_id=f"sample-subscriber-{port}",
            clean_session=False,
            reconnect_delay_s=(0.1, 0.5),
            keepalive_s=30,
        )
        self.epochs: dict[int, SeqBitmap] = {}
        self.samples = 0
        self.bad_samples = 0
        self.malformed = 0

    def _on_message(self, _client: mqtt.Client, _userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        # Alerts and health reports share the telemetry topic, marked by a property.
        if "plcbridge-kind=" in message.topic:
            return
        try:
            samples = json.loads(message.payload)["samples"]
        except (ValueError, KeyError, TypeError):
            with self._condition:
                self.malformed += 1
            return
        with self._condition:
            for sample in samples:
                self.epochs.setdefault(sample["epoch"], SeqBitmap()).add(sample["seq"])
                self.bad_samples += sample["quality"] != "good"
            self.samples += len(samples)
            self._condition.notify_all()

    def arrived(self) -> int:
        with self._condition:
            return self.samples

    def wait_complete(self, totals: dict[int, int], timeout_s: float) -> None:
        """Wait until every seq below each epoch's total has arrived."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while True:
                short = {epoch: total for epoch, total in totals.items()
                         if self.epochs.get(epoch, SeqBitmap()).count < total}
                if not short:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    details = {epoch: self.epochs.get(epoch, SeqBitmap()).missing(total)
                               for epoch, total in short.items()}
                    raise AssertionError(
                        f"timed out after {timeout_s:g} s: samples missing at the subscriber "
                        f"per epoch, the first of them: {details}")
                self._condition.wait(min(remaining, 0.5))
