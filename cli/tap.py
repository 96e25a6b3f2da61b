"""`plcbridge tap`: print the events and counters that the gateway's processes publish."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import zmq

from cli.launch import load_config_for_operator
from common import wire
from common.logs import fields
from common.tap import data_topic

EXIT_OK = 0
EXIT_TOO_FEW = 1


def tap(args: argparse.Namespace) -> int:
    """Subscribe to the chosen processes' taps and print messages until a limit or Ctrl-C."""
    config = load_config_for_operator(args.config, "tap")
    processes = args.processes or list(wire.PROCESS_NAMES)

    # A shell that started us in the background may have set SIGINT to be ignored; Ctrl-C
    # or kill -INT must still end the tap.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = wire.make_socket(context, zmq.SUB, wire.TAP_HWM, linger_ms=0)
    try:
        # Inside the try, so a Ctrl-C right after the warnings still exits with 0.
        _warn_about_missing_sockets(config.gateway.runtime_dir, processes)
        for process in processes:
            sock.connect(wire.tap_endpoint(config.gateway.runtime_dir, process))
            sock.setsockopt(zmq.SUBSCRIBE, process.encode())
            # The process copies its data to the tap only while someone subscribes to it.
            if args.data:
                sock.setsockopt(zmq.SUBSCRIBE, data_topic(process))
        received = _print_messages(sock, args.count, args.timeout_s, args.json, sys.stdout)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # The reader of our output went away, as `plcbridge tap | head` does. Point stdout at
        # /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        sock.close(linger=0)
        context.term()

    if args.count is not None and received < args.count:
        print(f"plcbridge tap: received {received} of {args.count} messages in "
              f"{args.timeout_s:g} s", file=sys.stderr)
        return EXIT_TOO_FEW
    return EXIT_OK


def _print_messages(sock: zmq.Socket[bytes], count: int | None, timeout_s: float | None,
                    raw_json: bool, out: TextIO) -> int:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    received = 0
    while count is None or received < count:
        wait_ms = 1000 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        if deadline is not None and wait_ms == 0:
            break
        if not sock.poll(wait_ms):
            continue

        frames = sock.recv_multipart()
        line = _format_message(frames, raw_json)
        if line is None:
            continue
        print(line, file=out, flush=True)
        received += 1
    return received


def _format_message(frames: list[bytes], raw_json: bool) -> str | None:
    """Return the output line of one tap message, or None after a warning for a malformed one."""
    body = frames[-1].decode("utf-8", errors="replace")
    try:
        message = json.loads(body)
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        print(f"plcbridge tap: skipped a malformed message ({exc}): {body[:120]!r}",
              file=sys.stderr)
        return None
    if raw_json:
        return body
    return format_human(message)


def format_human(message: dict[str, Any]) -> str:
    """Format a tap message as `time process kind key=value ...` in local time."""
    values = dict(message)
    ts_ms = values.pop("ts_ms", None)
    process = values.pop("process", "?")
    kind = values.pop("kind", "?")
    stamp = "?"
    if isinstance(ts_ms, int | float):
        stamp = datetime.fromtimestamp(ts_ms / 1000).isoformat(sep=" ", timespec="milliseconds")
    parts = [stamp, str(process), str(kind)]
    parts.extend(_render(key, value) for key, value in values.items())
    return " ".join(parts)


def _render(key: str, value: Any) -> str:
    """Format one field as key=value: a list of plain values comma-joined, a table as JSON."""
    if isinstance(value, list) and all(isinstance(item, str | int | float) for item in value):
        value = ",".join(str(item) for item in value)
    if isinstance(value, str):
        return fields(**{key: value})
    return f"{key}={json.dumps(value, separators=(',', ':'))}"


def _warn_about_missing_sockets(runtime_dir: Path, processes: list[str]) -> None:
    # ZeroMQ connects to an ipc:// path that does not exist yet, or that a stopped process
    # left behind, and waits for it silently, so warn about each process that is not there.
    for process in processes:
        path = Path(wire.tap_endpoint(runtime_dir, process).removeprefix("ipc://"))
        if not path.exists():
            print(f"plcbridge tap: no tap socket at {path} yet; is {process} running? "
                  "Waiting for it.", file=sys.stderr)
        elif not _listening(path):
            print(f"plcbridge tap: nothing listens on {path}; {process} is not running. "
                  "Waiting for it.", file=sys.stderr)


def _listening(path: Path) -> bool:
    """Return whether a process accepts connections on the Unix socket at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
