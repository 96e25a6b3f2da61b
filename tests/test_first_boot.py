"""A gateway's first boot with DPS, and its move to a second hub, through the DPS and hub
emulators over TLS, the PLC simulator and the processes under supervisord."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.payload import parse_page
from tests.support.broker import Subscriber
from tests.support.delivery import analyse
from tests.support.dps import (
    DEVICE_KEY,
    REGISTRATION_ID,
    DpsStack,
    group_enrollment,
    open_alerts,
    run_cli,
    write_config,
)
from tests.support.gateway import Gateway
from tests.support.hub import HubStack
from tests.support.plc import PlcSimulator
from tests.support.waiting import wait_until
from tests.test_gateway import reader_totals

pytestmark = pytest.mark.integration

TOPIC_FILTER = "devices/+/messages/events/#"


@dataclass
class FirstBoot:
    base: Path
    plc: PlcSimulator
    hub: HubStack
    dps: DpsStack
    gateway: Gateway
    subscriber: Subscriber

    def pages(self, subscriber: Subscriber | None = None) -> list[tuple[int, list[Any]]]:
        return [parse_page(payload)
                for topic, payload in (subscriber or self.subscriber).messages
                if "plcbridge-kind=" not in topic]

    def samples(self, subscriber: Subscriber | None = None) -> int:
        return sum(len(samples) for _seq, samples in self.pages(subscriber))

    def buffered_pages(self) -> int:
        try:
            status = json.loads((self.base / "run" / "buffer-status.json").read_text())
        except (OSError, ValueError):
            return 0
        return int(status.get("pages", 0))

    def drain_reader(self, subscribers: list[Subscriber]) -> dict[int, int]:
        """Stop the reader and wait until every sample it read arrived at the subscribers."""
        result = self.gateway.supervisorctl("stop", "plcbridge:plc_reader")
        assert "stopped" in result.stdout, result.stdout + result.stderr
        totals = reader_totals(self.gateway.log("plc_reader"))

        def complete() -> bool:
            report = analyse([page for sub in subscribers for page in self.pages(sub)])
            return all(report.max_seq(epoch) + 1 >= total for epoch, total in totals.items()
                       if total)

        wait_until(complete, 60, f"every sample of epochs {totals}", 0.2)
        return totals


@pytest.fixture
def first_boot(base: Path, certs: Path) -> Iterator[FirstBoot]:
    plc = PlcSimulator(base)
    hub = HubStack(certs, base / "hub-a", {REGISTRATION_ID: {"primary_key": DEVICE_KEY}})
    dps = DpsStack(certs, base / "dps", group_enrollment("localhost"))
    started: list[Any] = []
    try:
        for component in (plc, hub, dps):
            component.start()
            started.append(component)
        # DPS responds "disabled" until the test clears the fault, so the gateway reads and
        # buffers for a while with no hub.
        dps.set_faults(disabled=True)
        assert plc.port is not None
        write_config(base, certs, dps.port, plc.port, hub.mqtt_port)
        gateway = Gateway(base, (base / "plcbridge.toml").read_text(), REGISTRATION_ID)
        gateway.connection_string.unlink()
        subscriber = Subscriber(hub.broker.port, hub.ca_file, TOPIC_FILTER,
                                persistent_session=True)
        subscriber.start()
        started.append(subscriber)
        gateway.start()
        started.append(gateway)
        yield FirstBoot(base, plc, hub, dps, gateway, subscriber)
    finally:
        for component in reversed(started):
            component.stop()


def provision_after_buffering(boot: FirstBoot) -> float:
    """Let the gateway buffer without a hub, then let DPS assign it; return the file's mtime."""
    wait_until(lambda: open_alerts(boot.base), 30, "the provisioning alert")
    assert "waiting_for_provisioning" in boot.gateway.log("uplink")
    assert "waiting_for_provisioning" in boot.gateway.log("credential_watcher")
    assert "credentials_invalid" not in boot.gateway.log("credential_watcher")
    wait_until(lambda: boot.buffered_pages() >= 5, 30, "pages in the buffer before provisioning")
    assert boot.samples() == 0

    boot.dps.set_faults()
    connection = boot.base / "connection-string.txt"
    wait_until(connection.exists, 30, "the connection string file written by provisioning")
    wait_until(lambda: boot.samples() > 0, 30, "samples at the hub after provisioning")
    assert open_alerts(boot.base) == []
    assert stat.S_IMODE(connection.stat().st_mode) == 0o600
    return connection.stat().st_mtime


def test_first_boot_delivers_buffered_samples(first_boot: FirstBoot) -> None:
    provisioned_s = provision_after_buffering(first_boot)
    first_boot.subscriber.wait_for(lambda _m: first_boot.samples() > 200, 30, "more samples")

    totals = first_boot.drain_reader([first_boot.subscriber])
    report = analyse(first_boot.pages())

    assert len(totals) == 1
    for epoch in totals:
        assert report.gaps(epoch) == []
    timestamps = [sample["ts_ms"] for _seq, samples in first_boot.pages() for sample in samples]
    assert min(timestamps) < provisioned_s * 1000 < max(timestamps)
    assert report.value_errors == []
    # An uplink that waited for the file runs now only because the watcher restarted it.
    # The watcher logs the restart once supervisord reports the new uplink RUNNING, which
    # on a loaded machine can come after the first pages, so the line is waited for.
    gateway = first_boot.gateway
    if "waiting_for_provisioning" in gateway.log("uplink"):
        wait_until(lambda: "uplink_restarted" in gateway.log("credential_watcher"), 30,
                   "the credential watcher to log the uplink's restart")


def test_reprovision_moves_to_second_hub(first_boot: FirstBoot, base: Path,
                                        certs: Path) -> None:
    provision_after_buffering(first_boot)
    port = first_boot.hub.mqtt_port
    with HubStack(certs, base / "hub-b", {REGISTRATION_ID: {"primary_key": DEVICE_KEY}},
                  hub_host="127.0.0.2", extra_args=("--listen", f"127.0.0.2:{port}")) as hub_b:
        subscriber_b = Subscriber(hub_b.broker.port, hub_b.ca_file, TOPIC_FILTER,
                                  persistent_session=True)
        subscriber_b.start()
        try:
            first_boot.dps.set_enrollments(group_enrollment("127.0.0.2"))
            result = run_cli("provision", "--config", str(first_boot.gateway.config), "--force")
            assert result.returncode == 0, result.stderr
            assert "hub=127.0.0.2" in result.stdout
            connection = (base / "connection-string.txt").read_text()
            assert connection.startswith("HostName=127.0.0.2;")

            wait_until(lambda: first_boot.samples(subscriber_b) > 100, 60,
                       "samples at the second hub")
            totals = first_boot.drain_reader([first_boot.subscriber, subscriber_b])
            report = analyse(first_boot.pages() + first_boot.pages(subscriber_b))
            for epoch in totals:
                assert report.gaps(epoch) == []
            assert report.value_errors == []
        finally:
            subscriber_b.stop()
