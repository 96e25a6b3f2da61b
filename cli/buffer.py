"""`plcbridge buffer`: show what the buffer contains, what it dropped and how fast it moves.

The buffer writes its figures to <runtime_dir>/buffer-status.json every second, replacing
the file atomically, so this command never opens the LMDB store itself. A status file whose
process is gone, or that is older than STALE_AFTER_S, means the buffer is not running. The
command then prints the last figures it finds, marked as such, and exits with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from cli.launch import load_config_for_operator

STATUS_FILE = "buffer-status.json"  # the name that processes/buffer.py writes

# The buffer rewrites the file every second, and a busy commit can delay it a little.
STALE_AFTER_S = 5.0

EXIT_OK = 0
EXIT_NOT_RUNNING = 1


def buffer(args: argparse.Namespace) -> int:
    """Print the buffer's status, as a table or with --json as one JSON object."""
    config = load_config_for_operator(args.config, "buffer")
    path = config.gateway.runtime_dir / STATUS_FILE
    if not path.exists():
        print(f"plcbridge buffer: the buffer is not running, or the gateway never started "
              f"with this configuration: no status file at {path}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    try:
        status = read_status(path)
    except InvalidStatus as exc:
        print(f"plcbridge buffer: the status file {path} is invalid: {exc}. A running buffer "
              "replaces it every second, so the buffer is not running; check its log",
              file=sys.stderr)
        return EXIT_NOT_RUNNING

    # A status written before the clock was set back has a ts_ms in the future, and is as
    # old as one written that long ago.
    age_s = abs(time.time() - status["ts_ms"] / 1000)
    problem = not_running_reason(status, age_s)
    status["status_age_s"] = round(age_s, 1)
    status["running"] = problem is None
    if args.json:
        print(json.dumps(status, sort_keys=True))
    else:
        print(format_status(status))

    # A buffer waiting for its store runs, but stores and delivers nothing.
    store_error = status.get("store_error")
    if problem is None and store_error is not None:
        print(f"plcbridge buffer: the buffer runs but its store is not open: {store_error}",
              file=sys.stderr)
        return EXIT_NOT_RUNNING
    if problem is not None:
        print(f"plcbridge buffer: the buffer is not running ({problem}); the figures above "
              f"are from {format_time(status.get('ts_ms'))}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    return EXIT_OK


class InvalidStatus(Exception):
    """A status file that is not the JSON object that the buffer writes."""


# The status fields that the table formats, with the JSON types each may have. The buffer
# writes more fields, which are shown with --json only and not checked.
NUMBER = (int, float)
STATUS_FIELDS: dict[str, tuple[type, ...]] = {
    "pid": (int,), "running": (bool,), "path": (str,), "pages": NUMBER, "bytes": NUMBER,
    "max_bytes": NUMBER, "open_samples": NUMBER, "oldest_ts_ms": (*NUMBER, type(None)),
    "newest_ts_ms": (*NUMBER, type(None)), "link": (str,), "in_flight": NUMBER,
    "gap_records": NUMBER, "gaps_open": (list,), "overflow_policy": (str,),
    "dropped_by_reason": (dict,), "commits_per_s": NUMBER, "ingest_samples_per_s": NUMBER,
    "drain_pages_per_s": NUMBER, "drain_samples_per_s": NUMBER, "store_error": (str,),
}

# Times outside this range cannot be formatted as dates, so they are treated as damage.
MAX_TS_MS = 253_402_300_799_000  # 9999-12-31 23:59:59 UTC


def read_status(path: Path) -> dict[str, Any]:
    """Read and check the status object. Raise InvalidStatus naming the bad part."""
    try:
        status = json.loads(path.read_text())
    except OSError as exc:
        raise InvalidStatus(f"cannot read it: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise InvalidStatus(f"not JSON: {exc}") from exc
    if not isinstance(status, dict):
        raise InvalidStatus(f"expected a JSON object, found {type(status).__name__}")

    ts_ms = status.get("ts_ms")
    if isinstance(ts_ms, bool) or not isinstance(ts_ms, NUMBER) or not 0 <= ts_ms <= MAX_TS_MS:
        raise InvalidStatus(f"ts_ms is {ts_ms!r}, expected a time in milliseconds")
    for key, types in STATUS_FIELDS.items():
        value = status.get(key)
        if key in status and (not isinstance(value, types)
                              or (isinstance(value, bool) and bool not in types)):
            raise InvalidStatus(f"{key} is {value!r}, of an unexpected type")
    for reason, counts in status.get("dropped_by_reason", {}).items():
        if not isinstance(counts, dict):
            raise InvalidStatus(f"dropped_by_reason.{reason} is {counts!r}, expected an object")
    if not all(isinstance(reason, str) for reason in status.get("gaps_open", [])):
        raise InvalidStatus(f"gaps_open is {status['gaps_open']!r}, expected reason names")
    for key in ("oldest_ts_ms", "newest_ts_ms"):
        value = status.get(key)
        if value is not None and not 0 <= value <= MAX_TS_MS:
            raise InvalidStatus(f"{key} is {value!r}, expected a time in milliseconds")
    return status


def not_running_reason(status: dict[str, Any], age_s: float) -> str | None:
    """Return why the status shows a buffer that is not running, or None when it runs."""
    if not status.get("running"):
        return "it stopped cleanly"
    pid = status.get("pid")
    if not isinstance(pid, int) or not process_exists(pid):
        return f"its process {pid} is gone"
    if age_s > STALE_AFTER_S:
        return f"its status time is {age_s:.0f} s away from the current time"
    return None


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # the process exists but belongs to another user
    return True


def format_time(ts_ms: Any) -> str:
    if not isinstance(ts_ms, int | float):
        return "-"
    return datetime.fromtimestamp(ts_ms / 1000).isoformat(sep=" ", timespec="milliseconds")


def format_status(status: dict[str, Any]) -> str:
    """Format the status as labelled lines, with times in local time."""
    get = status.get
    state = "running" if get("running") else "not running"
    max_bytes = get("max_bytes") or 0
    used = f" ({100 * get('bytes', 0) / max_bytes:.1f} % of max_bytes {max_bytes})" \
        if max_bytes else ""
    lines = [
        ("buffer", f"{state}, pid {get('pid')}, figures from {format_time(get('ts_ms'))}"),
        ("store", str(get("path", "-")) + (f", not open: {get('store_error')}"
                                            if get("store_error") else "")),
        ("held", f"{get('pages', 0)} pages, {get('bytes', 0)} bytes{used}, "
                 f"{get('open_samples', 0)} samples in the open page"),
        ("samples", f"oldest {format_time(get('oldest_ts_ms'))}, "
                    f"newest {format_time(get('newest_ts_ms'))}"),
        ("link", f"{get('link', '-')}, {get('in_flight', 0)} pages in flight"),
        ("gaps", format_gaps(get("gap_records", 0), get("gaps_open") or [])),
        ("policy", str(get("overflow_policy", "-"))),
        ("dropped", format_drops(get("dropped_by_reason") or {})),
        ("rates", f"{get('commits_per_s', 0)} commits/s, {get('ingest_samples_per_s', 0)} "
                  f"samples/s in; {get('drain_pages_per_s', 0)} pages/s, "
                  f"{get('drain_samples_per_s', 0)} samples/s out"),
    ]
    return "\n".join(f"{label:<9}{text}" for label, text in lines)


def format_gaps(records: int, open_reasons: list[str]) -> str:
    text = f"{records} gap records waiting for the uplink"
    if open_reasons:
        text += (f"; the drops for {', '.join(open_reasons)} go into a new one when the link "
                 "is up")
    return text


def format_drops(drops: dict[str, Any]) -> str:
    if not drops:
        return "none"
    parts = []
    for reason, counts in sorted(drops.items()):
        text = f"{reason}: {counts.get('pages', 0)} pages, {counts.get('samples', 0)} samples"
        if counts.get("batches"):
            text += f", {counts['batches']} batches"
        parts.append(text)
    return "; ".join(parts)
