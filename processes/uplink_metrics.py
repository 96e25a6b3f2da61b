"""The uplink's optional Prometheus endpoint, serving the health monitor's latest figures.

`[metrics] port` turns it on, bound to `[metrics] host`, loopback by default. The metric
names are listed in docs/operations.md. prometheus-client serves the endpoint on a daemon
thread of its own. That thread only reads the monitor's last snapshot, a dict that the
main thread replaces whole once a second, so no lock is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from common.config import MetricsSettings
from common.logs import fields

Snapshot = Callable[[], dict[str, Any] | None]


class HealthCollector(Collector):
    """Turns the health snapshot into Prometheus metrics at each scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snapshot = self._snapshot()
        if snapshot is None:
            return
        yield from _uplink_metrics(snapshot.get("uplink") or {})
        yield from _buffer_metrics(snapshot.get("buffer"))
        yield from _plc_metrics(snapshot.get("plc"))
        yield from _credential_metrics(snapshot.get("credentials") or {})
        yield from _program_metrics(snapshot.get("programs") or {})
        yield from _alert_metrics(snapshot.get("alerts") or [])


def _gauge(name: str, documentation: str, value: Any) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value or 0))


def _counter(name: str, documentation: str, value: Any) -> CounterMetricFamily:
    # CounterMetricFamily appends _total to the name in the exposition (prometheus-client 0.26).
    return CounterMetricFamily(name, documentation, value=float(value or 0))


def _uplink_metrics(uplink: dict[str, Any]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    yield _gauge("plcbridge_uplink_connected", "1 while the MQTT connection is up",
                 uplink.get("connected"))
    yield _gauge("plcbridge_uplink_last_puback_timestamp_seconds",
                 "Time of the last PUBACK for a page, in Unix seconds; 0 for none yet",
                 (uplink.get("last_puback_ts_ms") or 0) / 1000)
    yield _gauge("plcbridge_uplink_publish_rate_pages", "Pages published per second",
                 uplink.get("publish_rate"))
    yield _counter("plcbridge_uplink_pages_published", "Pages published since the uplink "
                   "started", uplink.get("pages_published"))
    yield _counter("plcbridge_uplink_pubacks", "PUBACKs for pages since the uplink started",
                   uplink.get("pubacks"))
    yield _counter("plcbridge_uplink_reconnects", "MQTT reconnects since the uplink started",
                   uplink.get("reconnects"))


def _buffer_metrics(buffer: dict[str, Any] | None) -> Iterator[GaugeMetricFamily]:
    if buffer is None:
        return
    yield _gauge("plcbridge_buffer_pages", "Pages waiting in the buffer", buffer.get("pages"))
    yield _gauge("plcbridge_buffer_bytes", "Bytes of pages waiting in the buffer",
                 buffer.get("bytes"))
    yield _gauge("plcbridge_buffer_oldest_sample_age_seconds",
                 "Age of the oldest sample in the buffer", buffer.get("oldest_sample_age_s"))
    # The buffer's totals survive its restarts, so this is a gauge rather than a counter.
    yield _gauge("plcbridge_buffer_dropped_samples", "Samples the buffer dropped, by its "
                 "stored totals", buffer.get("dropped_samples"))


def _plc_metrics(plc: dict[str, Any] | None) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    if plc is None:
        return
    connected = GaugeMetricFamily("plcbridge_plc_connected", "1 while the PLC answers",
                                  labels=["device"])
    bad_tags = GaugeMetricFamily("plcbridge_plc_bad_tags", "Bad tags in the last poll",
                                 labels=["device"])
    last_good = GaugeMetricFamily("plcbridge_plc_last_good_read_timestamp_seconds",
                                  "Time of the last answered request, in Unix seconds",
                                  labels=["device"])
    for device, figures in (plc.get("devices") or {}).items():
        connected.add_metric([device], float(figures.get("state") == "connected"))
        bad_tags.add_metric([device], float(figures.get("bad_tags") or 0))
        last_good.add_metric([device], (figures.get("last_good_ts_ms") or 0) / 1000)
    yield connected
    yield bad_tags
    yield last_good
    yield _counter("plcbridge_plc_read_errors", "Requests that gave bad samples, since the "
                   "reader started", plc.get("read_errors"))
    yield _counter("plcbridge_plc_samples", "Samples read since the reader started",
                   plc.get("samples"))


def _credential_metrics(credentials: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    expiry_s = credentials.get("expiry_s")
    if expiry_s is not None:
        yield _gauge("plcbridge_credentials_expiry_timestamp_seconds",
                     "Expiry of the SAS token of the current connection, in Unix seconds",
                     expiry_s)
    clock = credentials.get("clock") or {}
    yield _gauge("plcbridge_clock_offset_seconds", "Offset of the hub's clock from the wall "
                 "clock, as last read", clock.get("offset_s"))


def _program_metrics(programs: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    running = GaugeMetricFamily("plcbridge_program_running", "1 while supervisord reports "
                                "the program RUNNING", labels=["program"])
    restarts = GaugeMetricFamily("plcbridge_program_restarts", "Restarts within "
                                 "alerts.restart_loop_window_s", labels=["program"])
    for name, record in programs.items():
        running.add_metric([name], float(record.get("state") == "RUNNING"))
        restarts.add_metric([name], float(len(record.get("restart_ts_ms") or [])))
    yield running
    yield restarts


def _alert_metrics(alerts: list[dict[str, Any]]) -> Iterator[GaugeMetricFamily]:
    open_alerts = GaugeMetricFamily("plcbridge_alert_open", "1 for each open alert",
                                    labels=["alert", "key"])
    for alert in alerts:
        open_alerts.add_metric([alert["name"], alert.get("key", "")], 1.0)
    yield open_alerts


class MetricsServer:
    """The HTTP endpoint, or nothing when [metrics] port is 0."""

    def __init__(self, settings: MetricsSettings, snapshot: Snapshot,
                 logger: logging.Logger) -> None:
        self._server: Any = None
        if settings.port == 0:
            return
        registry = CollectorRegistry()
        registry.register(HealthCollector(snapshot))
        try:
            self._server, _thread = start_http_server(settings.port, settings.host, registry)
        except OSError as exc:
            # Metrics are a convenience: a taken port must not stop the delivery of data.
            logger.warning("metrics_not_served %s", fields(
                host=settings.host, port=settings.port, error=exc.strerror or exc,
                consequence="no Prometheus endpoint; check [metrics] port and host"))
            return
        logger.info("metrics_served %s", fields(host=settings.host, port=settings.port,
                                                path="/metrics"))

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
