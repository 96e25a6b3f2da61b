"""Cloud-to-device commands end to end: mosquitto over TLS, the PLC simulator, and the four
gateway processes under supervisord.

Commands are published to the device's devicebound topic, as IoT Hub delivers them, and the
results are read from the telemetry topic. One test puts the IoT Hub emulator in front of
mosquitto, so the gateway authenticates with a SAS token as it does with a real hub. Each
write is checked against the simulator's registers with a Modbus client of its own.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.config import Tag
from devstack.gateway_toml import gateway_dirs, gateway_toml, simulator_tags
from devstack.plc_simulator import BENCH_START
from processes.plc_reader.client import PlcConnection
from tests.support.broker import Broker, Subscriber
from tests.support.gateway import DEVICE_KEY, Gateway, gateway_config, wait_until
from tests.support.hub import HubStack
from tests.support.plc import PlcSimulator
from tests.test_plc_faults import LOGGER, make_device
from tests.test_plc_writes import read_back

pytestmark = pytest.mark.integration

DEVICE_ID = "e2e-device"
C2D_TOPIC = f"devices/{DEVICE_ID}/messages/devicebound/%24.to=%2Fdevices%2F{DEVICE_ID}"
EVENTS_FILTER = "devices/+/messages/events/#"
SCRATCH = BENCH_START + 1000  # the first scratch register of a simulator with 1000 bench ones
# Long enough for a write on a loaded machine, short enough for the timeout test.
WRITE_TIMEOUT_S = 5.0

SETPOINT: dict[str, Any] = {
    "name": "line1.setpoint", "group": "slow", "table": "holding_register",
    "address": SCRATCH, "type": "uint16", "writable": True, "min_value": 0.0,
    "max_value": 500.0}
RATIO: dict[str, Any] = {
    "name": "line1.ratio", "group": "slow", "table": "holding_register",
    "address": SCRATCH + 2, "type": "float32", "writable": True}
ENABLE: dict[str, Any] = {
    "name": "line1.enable", "group": "slow", "table": "coil", "address": 3, "writable": True}
MODE_BIT: dict[str, Any] = {
    "name": "line1.mode_bit", "group": "slow", "table": "holding_register",
    "address": SCRATCH + 4, "type": "bool", "bit": 2, "writable": True}
# Written once before each test, to wait until the reader takes writes.
WARMUP: dict[str, Any] = {
    "name": "test.warmup", "group": "slow", "table": "holding_register",
    "address": SCRATCH + 9, "type": "uint16", "writable": True}
RECIPE: dict[str, Any] = {
    "name": "line1.recipe", "group": "slow", "table": "holding_register",
    "address": SCRATCH + 5, "type": "string", "length_bytes": 8, "writable": True}


def config_tag(keys: dict[str, Any]) -> Tag:
    """Return the Tag of a tag table above, as the reader decodes it."""
    if keys["table"] == "coil":
        return Tag(keys["name"], "slow", "coil", keys["address"], "bool", "big", 1.0, 0.0)
    return Tag(keys["name"], "slow", "holding_register", keys["address"], keys["type"], "big",
               1.0, 0.0, bit=keys.get("bit"), string_bytes=keys.get("length_bytes", 0))


@dataclass
class CommandStack:
    plc: PlcSimulator
    broker: Broker
    cloud: Subscriber
    gateway: Gateway
    modbus: PlcConnection

    def send(self, body: bytes | dict[str, Any]) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.cloud.client.publish(C2D_TOPIC, payload, qos=1)

    def results(self) -> list[tuple[str, dict[str, Any]]]:
        return [(topic, json.loads(payload)) for topic, payload in self.cloud.messages
                if "plcbridge-kind=command-result" in topic]

    def wait_result(self, request_id: str | None, timeout_s: float = 15.0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for _topic, result in self.results():
                if result["request_id"] == request_id:
                    return result
            return None

        try:
            result: dict[str, Any] = wait_until(found, timeout_s,
                                                f"the result of request {request_id}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; uplink log:\n{self.gateway.log('uplink')[-3000:]}"
                                 ) from None
        return result

    def read(self, keys: dict[str, Any]) -> object:
        return read_back(self.modbus, config_tag(keys))

    def wait_subscribed(self) -> None:
        """Send probes until one gets a result: the uplink's subscription is then in place."""
        attempt = 0

        def answered() -> bool:
            nonlocal attempt
            attempt += 1
            self.send({"command": "probe", "request_id": f"probe-{attempt}"})
            return any(result["command"] == "probe" for _topic, result in self.results())

        wait_until(answered, 30, "a result for a probe command", step_s=0.5)

    def wait_writable(self) -> None:
        """Write test.warmup until it succeeds: the reader's command socket is then up."""
        attempt = 0

        def written() -> bool:
            nonlocal attempt
            attempt += 1
            request_id = f"warmup-{attempt}"
            self.send({"command": "write_tag", "request_id": request_id,
                       "tag": "test.warmup", "value": attempt})
            return bool(self.wait_result(request_id)["status"] == "ok")

        wait_until(written, 30, "a first successful write", step_s=0.2)

    def tags_written(self) -> list[str]:
        """Return the tags of the reader's tag_written log lines, the warm-up left out."""
        return [part.split("=", 1)[1] for line in self.gateway.log("plc_reader").splitlines()
                if "tag_written" in line for part in line.split() if part.startswith("tag=")
                and part != "tag=test.warmup"]


ConfigText = Callable[[int, int], str]


@contextmanager
def started_stack(base: Path, certs: Path, config_text: ConfigText, cloud_filter: str,
                  hub: HubStack | None = None) -> Iterator[CommandStack]:
    """Start the simulator, mosquitto, the cloud's client and the gateway; stop them after.

    config_text(plc_port, gateway_port) returns the gateway's configuration. With a running
    hub the gateway connects to the hub emulator, and the cloud's client to its mosquitto.
    """
    plc = PlcSimulator(base)
    broker = hub.broker if hub is not None else Broker(certs, base / "mosquitto")
    plc.start()
    if hub is None:
        broker.start()
    cloud = Subscriber(broker.port, broker.ca_file, cloud_filter)
    modbus = PlcConnection(make_device(plc.port), logging.getLogger(LOGGER))
    gateway_port = hub.mqtt_port if hub is not None else broker.port
    gateway = Gateway(base, config_text(plc.port, gateway_port), DEVICE_ID)
    try:
        cloud.start()
        gateway.start()
        yield CommandStack(plc, broker, cloud, gateway, modbus)
    finally:
        gateway.stop()
        modbus.close()
        cloud.stop()
        if hub is None:
            broker.stop()
        plc.stop()


def azure_config(base: Path, certs: Path) -> ConfigText:
    def config_text(plc_port: int, gateway_port: int) -> str:
        return gateway_config(base, plc_port, gateway_port, certs / "ca.pem",
                              extra_uplink=f"write_timeout_s = {WRITE_TIMEOUT_S}",
                              extra_tags=[SETPOINT, RATIO, ENABLE, MODE_BIT, RECIPE, WARMUP])

    return config_text


@pytest.fixture
def stack(base: Path, certs: Path) -> Iterator[CommandStack]:
    with started_stack(base, certs, azure_config(base, certs), EVENTS_FILTER) as running:
        running.wait_subscribed()
        running.wait_writable()
        yield running


def test_write_tag_sets_registers(stack: CommandStack) -> None:
    stack.send({"command": "write_tag", "request_id": "w-1", "tag": "line1.setpoint",
                "value": 321})
    stack.send({"command": "write_tag", "request_id": "w-2", "tag": "line1.ratio",
                "value": -12.5})
    stack.send({"command": "write_tag", "request_id": "w-3", "tag": "line1.enable",
                "value": True})

    first = stack.wait_result("w-1")
    assert first == {"kind": "command-result", "request_id": "w-1", "command": "write_tag",
                     "status": "ok", "reason": None, "message": "", "tag": "line1.setpoint",
                     "value": 321}
    assert stack.wait_result("w-2")["status"] == "ok"
    assert stack.wait_result("w-3")["status"] == "ok"
    assert stack.read(SETPOINT) == 321
    assert stack.read(RATIO) == -12.5
    assert stack.read(ENABLE) is True
    assert stack.tags_written() == ["line1.setpoint", "line1.ratio", "line1.enable"]


def test_write_tag_through_hub_emulator(base: Path, certs: Path) -> None:
    devices = {DEVICE_ID: {"primary_key": DEVICE_KEY}}
    with HubStack(certs, base / "hub", devices) as hub, \
            started_stack(base, certs, azure_config(base, certs), EVENTS_FILTER, hub) as running:
        running.wait_subscribed()
        running.wait_writable()

        running.send({"command": "write_tag", "request_id": "h-1", "tag": "line1.setpoint",
                      "value": 123})

        assert running.wait_result("h-1")["status"] == "ok"
        assert running.read(SETPOINT) == 123


def test_write_tag_bit_and_string(stack: CommandStack) -> None:
    stack.send({"command": "write_tag", "request_id": "b-1", "tag": "line1.mode_bit",
                "value": True})
    stack.send({"command": "write_tag", "request_id": "b-2", "tag": "line1.recipe",
                "value": "PVC-20"})

    assert stack.wait_result("b-1")["status"] == "ok"
    assert stack.wait_result("b-2")["status"] == "ok"
    assert stack.read(MODE_BIT) is True
    assert stack.read(RECIPE) == "PVC-20"


def test_write_tag_rejections_write_nothing(stack: CommandStack) -> None:
    before = stack.read(SETPOINT)

    stack.send({"command": "write_tag", "request_id": "r-1", "tag": "line1.check", "value": 1})
    stack.send({"command": "write_tag", "request_id": "r-2", "tag": "line1.setpoint",
                "value": 501})
    stack.send({"command": "write_tag", "request_id": "r-3", "tag": "line1.nothing",
                "value": 1})
    stack.send({"command": "write_tag", "request_id": "r-4", "tag": "line1.setpoint",
                "value": [1]})
    stack.send({"command": "write_tag", "request_id": "r-5", "tag": "line1.enable",
                "value": 1})

    read_only = stack.wait_result("r-1")
    out_of_range = stack.wait_result("r-2")
    assert read_only["status"] == "rejected"
    assert read_only["reason"] == "not writable"
    assert out_of_range["status"] == "rejected"
    assert out_of_range["reason"] == "out of range"
    assert "above max_value 500" in out_of_range["message"]
    assert stack.wait_result("r-3")["reason"] == "unknown tag"
    assert stack.wait_result("r-4")["reason"] == "invalid argument"
    assert stack.wait_result("r-5")["reason"] == "invalid value"
    assert stack.read(SETPOINT) == before
    assert stack.read(ENABLE) is False
    assert stack.tags_written() == []


def test_unknown_and_malformed_commands_rejected(stack: CommandStack) -> None:
    stack.send({"command": "reboot", "request_id": "u-1"})
    stack.send(b'{"command": "write_tag", "request_id": "m-1", "tag": ')
    stack.send(b"[1, 2]")

    unknown = stack.wait_result("u-1")
    assert unknown["status"] == "rejected"
    assert unknown["reason"] == "unknown command"
    assert "write_tag" in unknown["message"]

    def malformed() -> list[dict[str, Any]]:
        return [result for _topic, result in stack.results() if result["request_id"] is None]

    results = wait_until(lambda: len(malformed()) >= 2 and malformed(), 15,
                         "two results for malformed bodies")
    assert [result["reason"] for result in results] == ["malformed", "malformed"]
    assert [result["status"] for result in results] == ["rejected", "rejected"]


def test_write_tag_times_out_when_reader_hangs(stack: CommandStack) -> None:
    gateway = stack.gateway
    uplink_pid = gateway.pid("uplink")
    reader_pid = gateway.pid("plc_reader")

    # A stopped reader keeps its socket connected but never replies.
    os.kill(reader_pid, signal.SIGSTOP)
    try:
        stack.send({"command": "write_tag", "request_id": "t-1", "tag": "line1.setpoint",
                    "value": 111})
        result = stack.wait_result("t-1", timeout_s=WRITE_TIMEOUT_S + 10)
    finally:
        os.kill(reader_pid, signal.SIGKILL)

    assert result["status"] == "failed"
    assert result["reason"] == "timeout"
    assert "may or may not have happened" in result["message"]
    wait_until(lambda: gateway.state("plc_reader") == "RUNNING"
               and gateway.pid("plc_reader") != reader_pid, 30, "the reader restarted")
    assert gateway.pid("uplink") == uplink_pid
    assert stack.read(SETPOINT) != 111

    # The restarted reader binds the command socket again, and the uplink reconnects to it.
    def written() -> bool:
        request_id = f"t-2-{len(stack.results())}"
        stack.send({"command": "write_tag", "request_id": request_id, "tag": "line1.setpoint",
                    "value": 222})
        return stack.wait_result(request_id)["status"] == "ok"

    wait_until(written, 30, "a write through the restarted reader", step_s=0.5)
    assert stack.read(SETPOINT) == 222


def test_write_tag_fails_at_once_without_reader(stack: CommandStack) -> None:
    result = stack.gateway.supervisorctl("stop", "plcbridge:plc_reader")
    assert "stopped" in result.stdout, result.stdout + result.stderr

    stack.send({"command": "write_tag", "request_id": "s-1", "tag": "line1.setpoint",
                "value": 7})

    # The reason shows that the uplink did not wait for write_timeout_s.
    failed = stack.wait_result("s-1")
    assert failed["status"] == "failed"
    assert failed["reason"] == "reader unavailable"
    assert stack.gateway.state("uplink") == "RUNNING"
    assert stack.read(SETPOINT) != 7


def mqtt_mode_config(base: Path, plc_port: int, broker_port: int, ca_file: Path) -> str:
    return gateway_toml(
        gateway={**gateway_dirs(base), "log_level": "INFO"},
        plc={"host": "127.0.0.1", "port": plc_port, "timeout_s": 0.5},
        tag_groups=[{"name": "fast", "poll_interval_ms": 100},
                    {"name": "slow", "poll_interval_ms": 200}],
        tags=[*simulator_tags("line1.counter"), SETPOINT],
        uplink={"mode": "mqtt", "port": broker_port, "connect_timeout_s": 2.0,
                "reconnect_min_s": 0.2, "reconnect_max_s": 2.0},
        broker={"host": "localhost", "client_id": "gw-mqtt",
                "command_topic": "plcbridge/{client_id}/commands",
                "event_topic": "plcbridge/{client_id}/events/{kind}"},
        credentials={"ca_file": str(ca_file), "check_interval_s": 0.2},
    )


def test_mqtt_mode_command_and_result_topics(base: Path, certs: Path) -> None:
    def config_text(plc_port: int, broker_port: int) -> str:
        return mqtt_mode_config(base, plc_port, broker_port, certs / "ca.pem")

    with started_stack(base, certs, config_text, "plcbridge/gw-mqtt/events/#") as running:
        cloud = running.cloud

        # Until the uplink subscribes and the reader takes writes, a write gets no result
        # or a failed one, so each attempt has its own request_id.
        def written() -> list[tuple[str, dict[str, Any]]]:
            cloud.client.publish("plcbridge/gw-mqtt/commands", json.dumps(
                {"command": "write_tag", "request_id": f"q-{len(cloud.messages)}",
                 "tag": "line1.setpoint", "value": 77}).encode(), qos=1)
            results = [(topic, json.loads(payload)) for topic, payload in cloud.messages
                       if b'"command-result"' in payload]
            return [(topic, result) for topic, result in results if result["status"] == "ok"]

        topic, result = wait_until(written, 30, "a write in mqtt mode", step_s=0.5)[0]

        assert topic == "plcbridge/gw-mqtt/events/command-result"
        assert result["tag"] == "line1.setpoint"
        assert running.read(SETPOINT) == 77
