"""The write_tag command: the uplink sends a write request to the reader and waits, bounded.

`{"command": "write_tag", "request_id": "r1", "tag": "<name>", "value": <value>}`, where the
value is a number, true or false, or a string, as the tag's type takes.

The uplink rejects a tag that the configuration does not have or that is not writable
itself, so those answers come even while the reader is down. Everything else (the value's
kind and range, the encoding, the Modbus request) is the reader's, over the command socket
of common/wire.py. The uplink's main thread owns the DEALER, polls it, and calls expire()
on every pass, so a reader that never answers costs a "failed" result with reason
"timeout" after uplink.write_timeout_s, and never blocks the uplink.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from common import wire
from common.config import Config, Tag
from common.logs import fields
from processes.uplink_commands import (
    REASON_INVALID_ARGUMENT,
    Command,
    CommandResult,
    failed,
    ok,
    rejected,
)

COMMAND = "write_tag"

REASON_UNKNOWN_TAG = "unknown tag"
REASON_NOT_WRITABLE = "not writable"
REASON_TIMEOUT = "timeout"
REASON_READER_UNAVAILABLE = "reader unavailable"


@dataclass(frozen=True)
class PendingWrite:
    command: Command
    tag: str
    deadline_s: float


class TagWriter:
    """Sends write_tag commands to the reader and reports each one's result exactly once."""

    def __init__(
        self,
        config: Config,
        context: zmq.Context[zmq.Socket[bytes]],
        report: Callable[[CommandResult], None],
        logger: logging.Logger,
    ) -> None:
        self._tags = {tag.name: tag for tag in config.plc.tags}
        self._timeout_s = config.uplink.write_timeout_s
        self._report = report
        self._logger = logger
        self._pending: dict[int, PendingWrite] = {}
        self._write_ids = itertools.count(1)
        self.endpoint = wire.endpoint(config.gateway.runtime_dir, wire.COMMAND)

        self.socket = wire.make_socket(context, zmq.DEALER, wire.COMMAND_HWM, linger_ms=0)
        # Without a connected reader a send fails at once, so no write waits in a queue to
        # reach the PLC long after the cloud received a result saying it failed.
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.connect(self.endpoint)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def handle(self, command: Command) -> CommandResult | None:
        """Check the arguments and the tag and send the write; return a result only on failure."""
        name, value = command.arguments.get("tag"), command.arguments.get("value")
        tag = self._tags.get(name) if isinstance(name, str) else None
        problem = _argument_problem(name, value, command.arguments)
        if problem:
            return rejected(command, REASON_INVALID_ARGUMENT, problem, tag=name)
        if tag is None:
            return rejected(command, REASON_UNKNOWN_TAG,
                            f"no tag named {name!r} in the configuration", tag=name, value=value)
        if not tag.writable:
            return rejected(command, REASON_NOT_WRITABLE, _read_only_message(tag), tag=name,
                            value=value)

        write_id = next(self._write_ids)
        deadline_s = time.monotonic() + self._timeout_s
        header = {"write_id": write_id, "request_id": command.request_id, "tag": tag.name,
                  "value": value, "deadline_ms": math.floor(deadline_s * 1000)}
        try:
            self.socket.send_multipart(wire.encode(wire.WRITE, header), zmq.NOBLOCK)
        except zmq.Again:
            return failed(command, REASON_READER_UNAVAILABLE,
                          f"the plc_reader is not connected at {self.endpoint}, or its queue "
                          "is full, so nothing was written; check that it runs",
                          tag=tag.name, value=value)
        self._pending[write_id] = PendingWrite(command, tag.name, deadline_s)
        return None

    def receive(self) -> None:
        """Report the result of every write that the reader returned."""
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = wire.decode(frames)
                if message.kind != wire.WRITTEN:
                    raise ValueError(f"expected a write result, got kind {message.kind!r}")
            except ValueError as exc:
                self._logger.warning("invalid_write_result %s",
                                     fields(error=exc, consequence="message ignored"))
                continue
            self._finish(message.header)

    def _finish(self, header: dict[str, Any]) -> None:
        pending = self._pending.pop(header.get("write_id"), None)  # type: ignore[arg-type]
        if pending is None:
            # The result of a write already reported as timed out: the log keeps the outcome.
            self._logger.warning(
                "late_write_result %s",
                fields(request_id=header.get("request_id"), tag=header.get("tag"),
                       status=header.get("status"), reason=header.get("reason")))
            return
        details = {"tag": pending.tag, "value": header.get("value")}
        status = header.get("status")
        reason = header.get("reason")
        message = str(header.get("message") or "")
        command = pending.command
        if status == "ok":
            self._report(ok(command, message, **details))
        elif status == "rejected":
            self._report(rejected(command, str(reason), message, **details))
        else:
            self._report(failed(command, str(reason), message, **details))

    def expire(self) -> None:
        """Report a timeout for every write whose result did not come in time."""
        now = time.monotonic()
        for write_id, pending in list(self._pending.items()):
            if now < pending.deadline_s:
                continue
            del self._pending[write_id]
            self._report(failed(
                pending.command, REASON_TIMEOUT,
                f"the plc_reader did not answer within {self._timeout_s:g} s "
                "(uplink.write_timeout_s); the write may or may not have happened",
                tag=pending.tag, value=pending.command.arguments.get("value")))

    def close(self) -> None:
        self.socket.close()


def _argument_problem(name: Any, value: Any, arguments: Any) -> str:
    if not isinstance(name, str) or not name:
        return "tag is missing or not a non-empty string"
    if "value" not in arguments:
        return "value is missing"
    if not isinstance(value, bool | int | float | str):
        return ("value must be a number, true or false, or a string, not a JSON "
                f"{type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        return f"value must be a finite number, not {value!r}"
    return ""


def _read_only_message(tag: Tag) -> str:
    return (f"tag {tag.name!r} is not marked writable; set writable = true on it in the "
            "configuration to allow writes from the cloud")
