"""End-to-end tests: the PLC simulator, mosquitto over TLS, and the four processes under
supervisord, started with `plcbridge run` as an operator would.

The simulator serves self-checking values, so every sample that reaches the subscriber can
be checked against what was served. The reader's (epoch, seq) numbering shows any sample
that went missing on the way.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.payload import parse_page
from tests.support.broker import Broker, SilentServer, Subscriber
from tests.support.delivery import DeliveryReport, analyse
from tests.support.gateway import ROOT, Gateway, gateway_config, wait_until
from tests.support.plc import PlcSimulator

pytestmark = pytest.mark.integration

TOPIC_FILTER = "devices/+/messages/events/#"
PROGRAMS = ("buffer", "plc_reader", "uplink", "credential_watcher")


@dataclass
class Stack:
    base: Path
    plc: PlcSimulator
    broker: Broker
    subscriber: Subscriber
    gateway: Gateway

    def pages(self) -> list[tuple[int, list[dict[str, Any]]]]:
        # Alerts and health reports share the telemetry topic, marked by a property.
        return [parse_page(payload) for topic, payload in self.subscriber.messages
                if "plcbridge-kind=" not in topic]

    def report(self) -> DeliveryReport:
        return analyse(self.pages())

    def sample_count(self) -> int:
        return sum(len(samples) for _seq, samples in self.pages())

    def wait_for_samples(self, count: int, timeout_s: float = 30.0) -> None:
        start = self.sample_count()
        wait_until(
            lambda: self.sample_count() >= start + count,
            timeout_s,
            f"{count} more samples at the subscriber",
            step_s=0.2,
        )

    def drain_reader(self) -> dict[int, int]:
        """Stop the reader, wait until everything it read has arrived, return samples per epoch.

        The reader logs its epoch's sample total when it stops, which gives the number of
        samples each epoch must deliver, the tail included.
        """
        result = self.gateway.supervisorctl("stop", "plcbridge:plc_reader")
        assert "stopped" in result.stdout, result.stdout + result.stderr
        totals = reader_totals(self.gateway.log("plc_reader"))

        def complete() -> bool:
            report = self.report()
            return all(
                report.max_seq(epoch) + 1 >= total for epoch, total in totals.items() if total
            )

        wait_until(complete, 30, f"every sample of epochs {totals} at the subscriber", 0.2)
        return totals


def reader_totals(log: str) -> dict[int, int]:
    """Return {epoch: samples read} from the reader's reader_stopped log lines."""
    totals = {}
    for line in log.splitlines():
        if "reader_stopped" not in line:
            continue
        values = dict(part.split("=", 1) for part in line.split() if "=" in part)
        totals[int(values["epoch"])] = int(values["samples"])
    return totals


def start_stack(base: Path, certs: Path, broker_port: int | None = None, **config: Any) -> Stack:
    plc = PlcSimulator(base)
    broker = Broker(certs, base / "mosquitto", persistence=True)
    plc.start()
    broker.start()
    subscriber = Subscriber(broker.port, broker.ca_file, TOPIC_FILTER, persistent_session=True)
    subscriber.start()
    assert plc.port is not None
    text = gateway_config(base, plc.port, broker_port or broker.port, certs / "ca.pem", **config)
    gateway = Gateway(base, text)
    return Stack(base, plc, broker, subscriber, gateway)


@pytest.fixture
def stack(base: Path, certs: Path) -> Iterator[Stack]:
    running = start_stack(base, certs)
    try:
        running.gateway.start()
        yield running
    finally:
        stop_stack(running)


def stop_stack(running: Stack) -> None:
    running.gateway.stop()
    running.subscriber.stop()
    running.broker.stop()
    running.plc.stop()


def assert_complete(report: DeliveryReport, totals: dict[int, int]) -> None:
    """Check that each epoch arrived without a gap and with correct values."""
    assert report.value_errors == []
    for epoch, total in totals.items():
        assert report.gaps(epoch) == [], f"epoch {epoch} has gaps"
        assert report.max_seq(epoch) + 1 == total, f"epoch {epoch} tail missing"


def test_gateway_delivers_every_sample(stack: Stack) -> None:
    stack.wait_for_samples(500)
    totals = stack.drain_reader()
    report = stack.report()

    assert len(totals) == 1
    assert_complete(report, totals)
    topics = {topic for topic, _payload in stack.subscriber.messages}
    assert all(topic.startswith("devices/e2e-device/messages/events/") for topic in topics)
    assert all("%24.mid=" in topic or "$.mid=" in topic for topic in topics)
    names = {sample["name"] for _seq, samples in stack.pages() for sample in samples}
    assert names == {
        "line1.counter", "line1.sine", "line1.check", "line1.temperature_c",
        "plc.serial_number", "line1.running",
    }
    serials = {
        sample["value"] for _seq, samples in stack.pages() for sample in samples
        if sample["name"] == "plc.serial_number"
    }
    assert serials == {22091017}


def test_gateway_restart_each_program_loses_nothing(stack: Stack) -> None:
    for program in PROGRAMS:
        stack.wait_for_samples(200)
        result = stack.gateway.supervisorctl("restart", f"plcbridge:{program}")
        assert "started" in result.stdout, result.stdout + result.stderr
    stack.wait_for_samples(200)
    totals = stack.drain_reader()
    report = stack.report()

    # The reader's restart starts a second epoch; both must be complete.
    assert len(totals) == 2
    assert_complete(report, totals)
    print(f"redelivered: {report.duplicate_pages} pages, {report.duplicate_samples} samples")


def test_gateway_kill9_buffer_and_uplink_loses_nothing(stack: Stack) -> None:
    for program in ("buffer", "uplink"):
        stack.wait_for_samples(200)
        stack.gateway.kill9(program)
    stack.wait_for_samples(200)
    totals = stack.drain_reader()
    report = stack.report()

    assert len(totals) == 1
    assert_complete(report, totals)
    print(f"redelivered: {report.duplicate_pages} pages, {report.duplicate_samples} samples")


def test_gateway_kill9_reader_starts_new_epoch(stack: Stack) -> None:
    stack.wait_for_samples(200)
    stack.gateway.kill9("plc_reader")
    stack.wait_for_samples(200)
    totals = stack.drain_reader()
    report = stack.report()

    # The killed epoch logged no total: it may lose its unacknowledged tail, never its middle.
    epochs = sorted(report.seqs_by_epoch)
    assert len(epochs) == 2
    killed, current = epochs
    assert list(totals) == [current]
    assert report.gaps(killed) == []
    assert report.gaps(current) == []
    assert report.max_seq(current) + 1 == totals[current]
    assert min(report.seqs_by_epoch[current]) == 0
    assert report.value_errors == []


def test_gateway_broker_outage_delivers_backlog_in_order(stack: Stack) -> None:
    stack.wait_for_samples(200)
    stack.broker.stop()
    outage_began = time.monotonic()
    wait_until(
        lambda: stack.gateway.log("uplink").count("disconnected") > 0, 10, "uplink disconnect"
    )
    received_before = len(stack.subscriber.messages)

    # Samples read during the outage wait in the buffer.
    wait_until(lambda: time.monotonic() - outage_began >= 30, 40, "a 30 s outage", 0.5)
    stack.broker.start()
    stack.wait_for_samples(200, timeout_s=60)
    totals = stack.drain_reader()
    report = stack.report()
    assert_complete(report, totals)

    # The backlog arrives oldest first: page_seq never goes back, except for redeliveries.
    after = [page_seq for page_seq, _samples in stack.pages()[received_before:]]
    first_seen = []
    for page_seq in after:
        if page_seq not in first_seen:
            first_seen.append(page_seq)
    assert first_seen == sorted(first_seen)


def test_gateway_silent_broker_keeps_reading(base: Path, certs: Path) -> None:
    silent = SilentServer()
    running = start_stack(base, certs, broker_port=silent.port)
    try:
        running.gateway.start()
        wait_until(
            lambda: "connect timeout" in running.gateway.log("uplink"), 20,
            "the uplink's connect timeout in its log",
        )
        wait_until(lambda: silent.accepted >= 2, 20, "a second connect attempt")

        # Reads and buffering go on: the reader's counters keep growing.
        assert running.gateway.state("plc_reader") == "RUNNING"
        assert running.gateway.state("buffer") == "RUNNING"

        began = time.monotonic()
        result = running.gateway.supervisorctl("stop", "plcbridge:uplink")
        assert "stopped" in result.stdout, result.stdout + result.stderr
        assert time.monotonic() - began < 10  # stopwaitsecs in supervisord.conf
        assert running.gateway.state("uplink") == "STOPPED"
    finally:
        stop_stack(running)
        silent.close()


@pytest.mark.parametrize("program", PROGRAMS)
def test_process_bad_config_exits_clearly(base: Path, program: str) -> None:
    bad = base / "bad.toml"
    bad.write_text('[gateway]\nlog_levle = "INFO"\n')
    cases = {
        "missing file": (base / "absent.toml", "not found"),
        "unknown key": (bad, "gateway.log_levle"),
    }
    for path, expected in cases.values():
        result = subprocess.run(
            [sys.executable, "-m", f"processes.{program}", "--config", str(path)],
            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
        )
        assert result.returncode == 2
        assert expected in result.stderr
        assert str(path.name) in result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_process_wrong_type_and_unreadable_ca(base: Path, certs: Path) -> None:
    text = gateway_config(base, 1502, 18883, certs / "ca.pem")
    wrong_type = base / "wrong-type.toml"
    wrong_type.write_text(text.replace("port = 1502", 'port = "1502"'))
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "check-config", "--config", str(wrong_type)],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2
    assert "plc.port" in result.stderr
    assert "'1502'" in result.stderr
    assert "Traceback" not in result.stderr

    # Root reads any file whatever its mode, so a folder replaces an unreadable CA file.
    ca_folder = base / "ca-folder"
    ca_folder.mkdir()
    bad_ca = base / "bad-ca.toml"
    bad_ca.write_text(text.replace(str(certs / "ca.pem"), str(ca_folder)))
    (base / "connection-string.txt").write_text(
        "HostName=localhost;DeviceId=d;SharedAccessKey=a2V5\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "processes.uplink", "--config", str(bad_ca)],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert str(ca_folder) in output
    assert "Traceback" not in output


def test_tap_follows_running_gateway(stack: Stack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "tap", "--config", str(stack.gateway.config),
         "--json", "--count", "8", "--timeout-s", "15"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    processes = {json.loads(line)["process"] for line in result.stdout.splitlines() if line}
    assert len(processes) >= 2


def test_gateway_sigterm_stops_everything(stack: Stack) -> None:
    # A SIGTERM that arrives while a program still imports ends it without its log lines.
    stack.gateway.wait_started()
    pids = [stack.gateway.pid(name) for name in PROGRAMS]
    assert stack.gateway.process is not None
    stack.gateway.process.send_signal(signal.SIGTERM)
    stack.gateway.process.wait(timeout=60)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text().lower()

    # supervisord signals all four at once; the buffer must still commit the reader's flush.
    reader_log = stack.gateway.log("plc_reader")
    assert "reader_stopped" in reader_log
    assert "ingest_flush_incomplete" not in reader_log
    assert "unacked_batches=0" in reader_log


def process_state(pid: int) -> str:
    """Return the one-letter state of a process from /proc, or "gone"."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    # The command name in parentheses may hold spaces, so the state follows the last ")".
    return stat.rsplit(")", 1)[1].split()[0]


def test_gateway_supervisord_kill9_stops_programs(stack: Stack) -> None:
    pids = [stack.gateway.pid(name) for name in PROGRAMS]
    assert stack.gateway.process is not None
    stack.gateway.process.send_signal(signal.SIGKILL)
    stack.gateway.process.wait(timeout=10)

    # Orphans would hold the buffer's and the reader's locks against the next start. A
    # program that has exited but waits for the container's init to reap it holds no lock
    # any more, so a zombie counts as gone.
    def running() -> list[str]:
        states = {name: (pid, process_state(pid)) for name, pid in zip(PROGRAMS, pids, strict=True)}
        return [f"{name} pid {pid} state {state}" for name, (pid, state) in states.items()
                if state not in ("gone", "Z")]

    try:
        wait_until(lambda: not running(), 20, "the four programs to exit after supervisord died")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still running: {running()}") from None

    stack.gateway.start()
    stack.wait_for_samples(100)
