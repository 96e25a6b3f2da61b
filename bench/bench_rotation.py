"""Benchmark of a credential rotation: from the new connection string on disk to the first
PUBACK under it.

The whole gateway runs under supervisord (`plcbridge run`) against the PLC simulator, and
its uplink connects through the hub emulator (devstack/hub_emulator.py) to mosquitto, all
on loopback. Each rotation writes a connection string with the device's other key, both
in the emulator's registry, and times these steps, each from the one before:

- detection: the watcher's `credentials_changed` line, from its first check that sees the
  new file;
- stability: its `credentials_loaded` line, once the content has stayed the same for
  credentials.settle_s and validates, just before it asks supervisord to restart the uplink;
- shutdown: the old uplink's `stop` line, its last, once SIGTERM has made it close its
  connection and sockets;
- exit: supervisord's `stopped: uplink` line, once the old uplink's interpreter has ended
  and supervisord has reaped it;
- spawn: supervisord's `spawned: 'uplink'` line, when it has forked the new one;
- process start: the new uplink's `start` line, once Python, its imports and the
  configuration are loaded;
- TLS connect: the new uplink's `connected` line, after TLS, CONNECT and CONNACK;
- first PUBACK: the emulator's `first_puback` line for the new session.

Every time comes from a log line's timestamp (milliseconds, this machine's clock). The
processes' taps would be as precise, but a subscriber misses what a restarted process
publishes in the moment before the subscriber reconnects to it.

Run: .venv/bin/python bench/bench_rotation.py [--rotations 20] [--check-interval-s 0.1]
It prints one JSON line per rotation and a summary: median, p90, min and max of the total,
and the median of each step. docs/benchmarks.md records the results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devstack.dev_certs import ensure_dev_certs  # noqa: E402
from devstack.gateway_toml import gateway_dirs, gateway_toml, simulator_tags  # noqa: E402
from tests.support.gateway import DEVICE_KEY, Gateway  # noqa: E402
from tests.support.hub import HubStack, new_device_key  # noqa: E402
from tests.support.plc import PlcSimulator  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402

DEVICE_ID = "bench-device"
STEPS = ("detection", "stability", "shutdown", "exit", "spawn", "process_start", "tls_connect",
         "first_puback")

# After a rotation's first PUBACK the next one waits this long, so that each starts from a
# settled gateway rather than inside the previous restart. The watcher learns that a new
# uplink has connected from its once-a-second tap counters, and defers a restart until then,
# so a shorter wait would measure that deferral instead of a rotation. A random part of up
# to one check interval is added: the watcher's checks fall into step with the end of each
# restart, so a fixed wait would always write at the same point between two checks.
SETTLE_S = 2.0


def log_time_ms(line: str) -> int:
    """Return the wall-clock time of a log line that starts with logging's asctime."""
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return int(stamp.timestamp() * 1000)


def first_log_line_ms(text: str, event: str, after_ms: int) -> int | None:
    """Return the time of the first line that contains event and was logged after after_ms."""
    for line in text.splitlines():
        if event in line and line[:4].isdigit() and log_time_ms(line) >= after_ms:
            return log_time_ms(line)
    return None


def write_connection_string(path: Path, key: str) -> None:
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_text(f"HostName=localhost;DeviceId={DEVICE_ID};SharedAccessKey={key}\n")
    os.replace(temporary, path)


def gateway_config(base: Path, plc_port: int, hub: HubStack, check_interval_s: float) -> str:
    return gateway_toml(
        gateway={**gateway_dirs(base), "log_level": "INFO"},
        plc={"host": "127.0.0.1", "port": plc_port},
        tag_groups=[{"name": "fast", "poll_interval_ms": 20}],
        tags=simulator_tags("line1.counter", "line1.sine", "line1.check"),
        buffer={"page_max_samples": 200, "page_max_age_ms": 100},
        uplink={"mode": "azure", "port": hub.mqtt_port, "date_port": hub.https_port},
        credentials={"connection_string_file": f"{base}/connection-string.txt",
                     "ca_file": str(hub.ca_file), "check_interval_s": check_interval_s},
    )


def one_rotation(gateway: Gateway, hub: HubStack, key: str) -> dict[str, float]:
    """Rotate to key and return the duration of each step and the total, in milliseconds."""
    written_ms = int(time.time() * 1000)
    write_connection_string(gateway.connection_string, key)

    def first_puback() -> int | None:
        return first_log_line_ms(hub.log(), "first_puback", written_ms)

    puback_ms: int = wait_until(first_puback, 30, "the first PUBACK after the rotation")
    watcher, uplink = gateway.log("credential_watcher"), gateway.log("uplink")
    supervisord = gateway.log("supervisord")
    marks = {
        "detection": first_log_line_ms(watcher, " credentials_changed ", written_ms),
        "stability": first_log_line_ms(watcher, " credentials_loaded ", written_ms),
        "shutdown": first_log_line_ms(uplink, " stop version=", written_ms),
        "exit": first_log_line_ms(supervisord, " stopped: uplink ", written_ms),
        "spawn": first_log_line_ms(supervisord, " spawned: 'uplink' ", written_ms),
        "process_start": first_log_line_ms(uplink, " start version=", written_ms),
        "tls_connect": first_log_line_ms(uplink, " connected endpoint=", written_ms),
        "first_puback": puback_ms,
    }
    missing = [name for name, value in marks.items() if value is None]
    if missing:
        raise RuntimeError(f"no timestamp for {missing} in this rotation")

    result: dict[str, float] = {}
    previous = written_ms
    for step in STEPS:
        mark = marks[step]
        assert mark is not None
        result[step] = mark - previous
        previous = mark
    result["total"] = puback_ms - written_ms
    return result


def summarize(rotations: list[dict[str, float]]) -> dict[str, Any]:
    totals = sorted(rotation["total"] for rotation in rotations)
    return {
        "rotations": len(rotations),
        "total_ms": {
            "median": statistics.median(totals),
            "p90": statistics.quantiles(totals, n=10)[8] if len(totals) > 1 else totals[0],
            "min": totals[0],
            "max": totals[-1],
        },
        "step_median_ms": {step: statistics.median(r[step] for r in rotations)
                           for step in STEPS},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rotations", type=int, default=20, help="rotations; default 20")
    parser.add_argument("--check-interval-s", type=float, default=0.1,
                        help="credentials.check_interval_s; default 0.1, the gateway's default")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="pb-rot-", dir="/tmp"))
    ensure_dev_certs(base / "certs")
    secondary = new_device_key()
    plc = PlcSimulator(base)
    hub = HubStack(base / "certs", base / "hub",
                   {DEVICE_ID: {"primary_key": DEVICE_KEY, "secondary_key": secondary}})
    gateway: Gateway | None = None
    try:
        plc.start()
        hub.start()
        gateway = Gateway(base, gateway_config(base, plc.port, hub, args.check_interval_s),
                          DEVICE_ID)
        gateway.start()
        print(json.dumps({"load_average_1_5_15": os.getloadavg()}), flush=True)
        wait_until(lambda: "first_puback" in hub.log(), 30, "the gateway's first PUBACK")

        rotations = []
        for number in range(args.rotations):
            time.sleep(SETTLE_S + random.uniform(0, args.check_interval_s))
            key = secondary if number % 2 == 0 else DEVICE_KEY
            rotation = one_rotation(gateway, hub, key)
            rotations.append(rotation)
            print(json.dumps({"rotation": number + 1, **rotation}), flush=True)
        print(json.dumps({"check_interval_s": args.check_interval_s, **summarize(rotations),
                          "load_average_1_5_15": os.getloadavg()}))
    finally:
        if gateway is not None:
            gateway.stop()
        hub.stop()
        plc.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
