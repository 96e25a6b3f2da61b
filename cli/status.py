"""`plcbridge status`: the gateway's health on one screen, or as JSON, and as an exit code.

Sources, none of which this command writes:
- supervisord, asked live for each program's state, pid and start time;
- <runtime_dir>/health-status.json, which the uplink rewrites every second: the PLC link,
  the uplink, credentials and clock, and each program's recent restarts;
- <runtime_dir>/buffer-status.json, which the buffer rewrites every second;
- <runtime_dir>/alerts-uplink.json, the open alerts, kept even while the uplink is stopped.

Exit codes: 0 when the gateway runs with no open alert, 1 when an alert is open or the
uplink does not report its health, 4 when the gateway is not running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from cli.launch import load_config_for_operator
from common.alerts import alerts_path, buffer_summary, read_alerts_file
from common.config import Config
from common.supervisor_rpc import SupervisorClient, SupervisorUnavailableError

HEALTH_FILE = "health-status.json"  # the name that processes/uplink_health.py writes
BUFFER_STATUS_FILE = "buffer-status.json"  # the name that processes/buffer.py writes

# Both files are rewritten every second; a busy process can delay that a little.
STALE_AFTER_S = 5.0
SUPERVISOR_TIMEOUT_S = 5.0

EXIT_OK = 0
EXIT_UNHEALTHY = 1
EXIT_NOT_RUNNING = 4


def status(args: argparse.Namespace) -> int:
    """Print the gateway's status and return 0 when healthy, 1 with an open alert, 4 when down."""
    config = load_config_for_operator(args.config, "status")
    report = gather(config)
    if args.json:
        print(json.dumps(report, sort_keys=True, default=str))
    else:
        print(format_report(report))

    if not report["running"]:
        print(f"plcbridge status: the gateway is not running: {report['problem']}",
              file=sys.stderr)
        return EXIT_NOT_RUNNING
    if report["problem"]:
        print(f"plcbridge status: {report['problem']}", file=sys.stderr)
        return EXIT_UNHEALTHY
    if report["alerts"]:
        names = ", ".join(alert["name"] for alert in report["alerts"])
        print(f"plcbridge status: {len(report['alerts'])} open alerts: {names}",
              file=sys.stderr)
        return EXIT_UNHEALTHY
    return EXIT_OK


def gather(config: Config) -> dict[str, Any]:
    """Collect every figure into one JSON-ready object."""
    runtime_dir = config.gateway.runtime_dir
    programs, supervisor_error = _programs(config)
    health = _fresh(_read_json(runtime_dir / HEALTH_FILE))
    buffer = _fresh(_read_json(runtime_dir / BUFFER_STATUS_FILE))
    alerts = read_alerts_file(alerts_path(runtime_dir, "uplink")) or {}
    # The provisioning program keeps its own file, because it runs before the uplink can.
    provisioning = read_alerts_file(alerts_path(runtime_dir, "provisioning")) or {}

    # Restart counts come from the uplink's monitor, which watches supervisord all the time.
    for name, record in (health or {}).get("programs", {}).items():
        if name in programs:
            programs[name]["restarts"] = len(record.get("restart_ts_ms", []))

    problem = ""
    running = supervisor_error is None or health is not None or buffer is not None
    if not running:
        problem = f"{supervisor_error}, and no process wrote its status in {runtime_dir}"
    elif health is None:
        problem = (f"the uplink has not written {runtime_dir / HEALTH_FILE} in the last "
                   f"{STALE_AFTER_S:g} s, so the alerts and link figures are unknown; check "
                   "the uplink's state and log")

    health = health or {}
    return {
        "running": running,
        "problem": problem,
        "supervisord": supervisor_error or "reachable",
        "programs": programs,
        "plc": health.get("plc"),
        "buffer": buffer_summary(buffer),
        "uplink": health.get("uplink"),
        "credentials": health.get("credentials"),
        "alerts": [*alerts.get("open", []), *provisioning.get("open", [])],
        "restart_loop_window_s": config.alerts.restart_loop_window_s,
    }


def _programs(config: Config) -> tuple[dict[str, dict[str, Any]], str | None]:
    client = SupervisorClient(config.supervisor_socket, SUPERVISOR_TIMEOUT_S)
    try:
        infos = client.all_process_info()
    except SupervisorUnavailableError as exc:
        return {}, str(exc)
    programs = {}
    for info in infos:
        if info.get("group") != config.supervisor.group:
            continue
        running = info.get("statename") == "RUNNING"
        programs[str(info.get("name"))] = {
            "state": info.get("statename"),
            "pid": info.get("pid"),
            "uptime_s": int(info["now"] - info["start"]) if running else None,
            "restarts": None,
        }
    return programs, None



def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _fresh(document: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return the document when its process still runs and wrote it recently."""
    if document is None or not document.get("running"):
        return None
    if time.time() - document.get("ts_ms", 0) / 1000 > STALE_AFTER_S:
        return None
    return document


# -- the screen ---------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    lines = [_line("gateway", "running" if report["running"] else "NOT RUNNING")]
    lines += _program_lines(report)
    lines += _plc_lines(report.get("plc"))
    lines.append(_buffer_line(report.get("buffer")))
    lines.append(_uplink_line(report.get("uplink")))
    lines.append(_credentials_line(report.get("credentials")))
    lines += _alert_lines(report["alerts"])
    return "\n".join(lines)


def _line(label: str, text: str) -> str:
    return f"{label:<12}{text}"


def _time(ts_ms: Any) -> str:
    if not isinstance(ts_ms, int | float) or not ts_ms:
        return "never"
    return datetime.fromtimestamp(ts_ms / 1000).isoformat(sep=" ", timespec="seconds")


def _program_lines(report: dict[str, Any]) -> list[str]:
    if not report["programs"]:
        return [_line("programs", f"unknown: {report['supervisord']}")]
    window = f"{report['restart_loop_window_s']:g} s"
    return [
        _line(name, f"{info['state']}, pid {info['pid']}, up {info['uptime_s']} s, "
                    f"{info['restarts'] if info['restarts'] is not None else '?'} restarts "
                    f"in {window}")
        for name, info in sorted(report["programs"].items())
    ]


def _plc_lines(plc: dict[str, Any] | None) -> list[str]:
    if plc is None:
        return [_line("plc", "unknown: no counters from the reader")]
    lines = []
    for device, figures in sorted((plc.get("devices") or {}).items()):
        lines.append(_line(f"plc {device}",
                           f"{figures.get('state')}, last good read "
                           f"{_time(figures.get('last_good_ts_ms'))}, "
                           f"{figures.get('bad_tags')} bad tags"))
    return lines or [_line("plc", f"connected={plc.get('plc_connected')}")]


def _buffer_line(buffer: dict[str, Any] | None) -> str:
    if buffer is None:
        return _line("buffer", "unknown: the buffer has not written its status")
    return _line("buffer", f"{buffer['pages']} pages, {buffer['bytes']} bytes, oldest sample "
                           f"{buffer['oldest_sample_age_s']} s old, "
                           f"{buffer['dropped_samples']} samples dropped")


def _uplink_line(uplink: dict[str, Any] | None) -> str:
    if uplink is None:
        return _line("uplink", "unknown")
    state = "connected" if uplink["connected"] else "disconnected"
    return _line("uplink", f"{state} since {_time(uplink['since_ts_ms'])}, last PUBACK "
                           f"{_time(uplink['last_puback_ts_ms'])}, "
                           f"{uplink['publish_rate']} pages/s")


def _credentials_line(credentials: dict[str, Any] | None) -> str:
    if credentials is None:
        return _line("credentials", "unknown")
    expiry = credentials.get("expiry_s")
    expiry_text = "no expiry" if expiry is None else (
        f"expires {_time(expiry * 1000)}, {credentials.get('time_left_s')} s left")
    clock = credentials.get("clock") or {}
    text = (f"{credentials.get('scheme')}, {expiry_text}; clock {clock.get('state')}, "
            f"offset {clock.get('offset_s')} s")
    credential_set = credentials.get("set") or {}
    if credential_set.get("active") == "last_good":
        rejected = ", ".join(credential_set.get("rejected_files") or []) or "the new files"
        text += (f"; ON THE LAST GOOD SET saved {_time(credential_set.get('last_good_saved_ms'))}"
                 f", the hub rejected {rejected}")
    return _line("credentials", text)


def _alert_lines(alerts: list[dict[str, Any]]) -> list[str]:
    if not alerts:
        return [_line("alerts", "none")]
    return [
        _line("ALERT", f"{alert['name']}{'/' + alert['key'] if alert.get('key') else ''} "
                       f"since {_time(alert.get('raised_ts_ms'))}: {alert.get('detail')}")
        for alert in alerts
    ]
