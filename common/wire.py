"""The ZeroMQ contract between the gateway's processes.

This module owns every endpoint, every message shape and which side binds. Each message is a
multipart ZeroMQ message: a kind frame, a JSON header frame and, for batches and pages, a
payload frame that is passed through unparsed.

    ingest (ipc://<runtime_dir>/ingest.sock): the buffer binds a ROUTER, the reader connects
    a DEALER.
        reader -> buffer  batch  {"epoch", "batch_seq", "count"}  payload: JSON array of samples
        buffer -> reader  ack    {"epoch", "batch_seq",           every batch up to batch_seq
                                  "rejected_samples",             is committed to LMDB, or
                                  "rejected_batches"}             rejected (see below)

    delivery (ipc://<runtime_dir>/delivery.sock): the buffer binds a ROUTER, the uplink
    connects a DEALER.
        uplink -> buffer  link    {"session", "state": "up"|"down", "free"}
        uplink -> buffer  puback  {"session", "page_seq"}         the broker acknowledged it
        buffer -> uplink  page    {"page_seq", "count"}           payload: the page's JSON

    command (ipc://<runtime_dir>/command.sock): the reader binds a ROUTER, the uplink
    connects a DEALER.
        uplink -> reader  write    {"write_id", "request_id",    write value to the tag, unless
                                    "tag", "value",              the reader takes it up after
                                    "deadline_ms"}               deadline_ms (see below)
        reader -> uplink  written  {"write_id", "request_id",    the result of that write
                                    "tag", "status", "reason",
                                    "message", "value"}

    tap (ipc://<runtime_dir>/tap-<process>.sock): each process binds an XPUB socket.
        topic "<process>", then one JSON object with "ts_ms", "process", "kind" and fields.
        topic "data.<process>", kind "data": a copy of the data passing through, sent only
        while a subscriber subscribes to that topic (see common/tap.py).

The reader numbers its batches from 0 in each epoch and resends every unacknowledged batch
after plc.ack_timeout_s. So the buffer stores a batch only when its batch_seq is one above
the last it committed for that epoch, and acknowledges a resent one without storing it.

When the store is full and buffer.overflow_policy is "reject-new", or the map or disk is full
under that policy, the buffer does not store a batch but still acknowledges it, so the reader
does not send it again. rejected_samples and rejected_batches count the samples and batches
that the buffer rejected in the ack's epoch so far, committed like the batches themselves.
They are totals, so an ack that is lost costs no count: the reader adds the increase over
the totals it last saw. An ack for an epoch other than the buffer's current one leaves both
out, and a reader treats them as absent, as it does with an older buffer.

A write's status is "ok" (value was written), "rejected" (nothing was sent to the PLC:
unknown or read-only tag, value out of range or of the wrong kind) or "failed" (with the
reason of the Modbus failure; after a timeout the PLC may or may not have taken the value).
deadline_ms is on CLOCK_MONOTONIC in milliseconds (Python's time.monotonic()), which every
process of one boot shares. The uplink stops waiting for the result at that time and reports
a timeout. The reader sends the Modbus request only before deadline_ms, and otherwise
returns "failed" with reason "timeout" without sending it, so no write leaves for the PLC
after the cloud received a timeout result for it. The uplink's DEALER sets ZMQ_IMMEDIATE,
so a write to a reader that is not running fails at once instead of waiting in a queue
for the next reader.

The uplink opens a new session for every MQTT connection. A session starts with "free" pages
of credit, each puback returns one, and the buffer hands out pages oldest first within that
credit. A new session, or state "down", makes every page that was handed out but not
acknowledged eligible again. The uplink repeats its link message every second, so a
restarted buffer learns the state without waiting for a change.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

INGEST = "ingest"
DELIVERY = "delivery"
COMMAND = "command"

BATCH = b"batch"
ACK = b"ack"
LINK = b"link"
PUBACK = b"puback"
PAGE = b"page"
WRITE = b"write"
WRITTEN = b"written"

PROCESS_NAMES = ("plc_reader", "buffer", "uplink", "credential_watcher")

# Batches and pages are large, so a few hundred queued ones are plenty. Beyond that the
# sender gets EAGAIN and keeps the data in its own bounded queue.
DATA_HWM = 200

# Writes come one per cloud command, so a short queue is plenty; a full one fails the write.
COMMAND_HWM = 100

# A tap drops messages for a slow subscriber rather than slow down the gateway.
TAP_HWM = 10_000


def endpoint(runtime_dir: Path, name: str) -> str:
    """Return the ipc:// address of an endpoint in the runtime folder."""
    return f"ipc://{runtime_dir}/{name}.sock"


def tap_endpoint(runtime_dir: Path, process: str) -> str:
    return endpoint(runtime_dir, f"tap-{process}")


def make_socket(
    context: zmq.Context[zmq.Socket[bytes]], kind: int, hwm: int, linger_ms: int
) -> zmq.Socket[bytes]:
    """Create a socket with an explicit high-water mark and LINGER, as every socket here has."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, linger_ms)
    return sock


@dataclass(frozen=True)
class Message:
    kind: bytes
    header: dict[str, Any]
    payload: bytes | None = None


def encode(kind: bytes, header: dict[str, Any], payload: bytes | None = None) -> list[bytes]:
    frames = [kind, json.dumps(header, separators=(",", ":")).encode()]
    if payload is not None:
        frames.append(payload)
    return frames


def decode(frames: list[bytes]) -> Message:
    """Parse the frames of one message; raise ValueError for a malformed one."""
    if len(frames) not in (2, 3):
        raise ValueError(f"expected 2 or 3 frames, got {len(frames)}")
    try:
        header = json.loads(frames[1], parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError as exc:
        # A header nested a few thousand levels deep exhausts the parser's recursion limit.
        raise ValueError(f"header is nested too deeply: {len(frames[1])} bytes") from exc
    if not isinstance(header, dict):
        raise ValueError(f"header is not a JSON object: {frames[1][:80]!r}")
    return Message(frames[0], header, frames[2] if len(frames) == 3 else None)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"header number out of range: {text[:40]}")
    return value


def _no_constant(name: str) -> float:
    # json.loads accepts Infinity, -Infinity and NaN, which JSON does not allow.
    raise ValueError(f"header contains {name}, which is not a JSON number")
