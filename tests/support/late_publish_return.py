"""Run the uplink with paho's publish() held open until the broker's reply has arrived.

`python -m tests.support.late_publish_return --config FILE` runs processes.uplink unchanged,
except that paho's Client.publish, after it has written the PUBLISH, waits until the MQTT
socket is readable (at most WAIT_S) before it returns. With one page in flight, the bytes
that made the socket readable are that page's PUBACK, so it reaches the client before
publish() returns to the uplink, on every page.

At exit the launcher prints one line with the number of publishes and of PUBACKs that were
readable before publish() returned, so a test can check that the case really happened.
"""

from __future__ import annotations

import select
import sys
from typing import Any

import paho.mqtt.client as mqtt

from processes import uplink

WAIT_S = 0.5

publishes = 0
answered_before_return = 0
original_publish = mqtt.Client.publish


def publish_then_wait(self: mqtt.Client, *args: Any, **kwargs: Any) -> mqtt.MQTTMessageInfo:
    global publishes, answered_before_return
    info = original_publish(self, *args, **kwargs)
    publishes += 1
    sock = self.socket()
    if sock is not None:
        readable, _, _ = select.select([sock], [], [], WAIT_S)
        if readable:
            answered_before_return += 1
    return info


def main() -> int:
    mqtt.Client.publish = publish_then_wait  # type: ignore[method-assign]
    try:
        return uplink.main()
    finally:
        print(f"late_publish_return publishes={publishes} "
              f"answered_before_return={answered_before_return}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
