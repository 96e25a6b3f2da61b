"""Cloud-to-device commands: parse a message body, dispatch it by name, report one result.

A command is a UTF-8 JSON object of at most 64 KiB:

    {"command": "<name>", "request_id": "<1-64 of A-Z a-z 0-9 . _ : ->", ...arguments}

The handler table maps a command name to a function that takes the parsed Command. A
handler returns its CommandResult at once, or returns None and later calls the dispatcher's
report() exactly once. write_tag does the latter, because it waits for the reader. A body that
cannot be parsed, or that names no known command, is rejected here with a reason.

Arguments may be secret (a connection string, a key), so nothing here logs or publishes
argument values. Only the command name, the request id, the status and the reason go out.
docs/commands.md describes the result body.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.logs import fields

# IoT Hub accepts cloud-to-device messages of at most 64 KiB, and mqtt mode uses the same
# bound, so a larger body is rejected before it is parsed.
MAX_COMMAND_BYTES = 64 * 1024

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

# A longer command name is cut to this length in the result and the log.
MAX_NAME_CHARS = 64

STATUS_OK = "ok"
STATUS_REJECTED = "rejected"
STATUS_FAILED = "failed"

REASON_TOO_LARGE = "too large"
REASON_MALFORMED = "malformed"
REASON_UNKNOWN_COMMAND = "unknown command"
REASON_INVALID_ARGUMENT = "invalid argument"


@dataclass(frozen=True)
class Command:
    """One parsed command. arguments are every key but command and request_id."""

    name: str
    request_id: str
    arguments: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True)
class CommandResult:
    """The one result of a command, sent to the cloud and on the tap.

    request_id and command are None when the body did not contain a valid one. details are
    extra fields of the result body, such as the tag and the value written; they must never
    contain a secret.
    """

    request_id: str | None
    command: str | None
    status: str
    reason: str | None = None
    message: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "command": self.command,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            **self.details,
        }


def ok(command: Command, message: str = "", **details: Any) -> CommandResult:
    return CommandResult(command.request_id, command.name, STATUS_OK, None, message, details)


def rejected(command: Command, reason: str, message: str, **details: Any) -> CommandResult:
    return CommandResult(command.request_id, command.name, STATUS_REJECTED, reason, message,
                         details)


def failed(command: Command, reason: str, message: str, **details: Any) -> CommandResult:
    return CommandResult(command.request_id, command.name, STATUS_FAILED, reason, message,
                         details)


class CommandError(Exception):
    """A body that is not a valid command, with what could be read of it for the result."""

    def __init__(self, message: str, reason: str, request_id: str | None = None,
                 command: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.request_id = request_id
        self.command = command

    def result(self) -> CommandResult:
        return CommandResult(self.request_id, self.command, STATUS_REJECTED, self.reason,
                             str(self))


def parse_command(payload: bytes) -> Command:
    """Parse a message body into a Command; raise CommandError with the reason when invalid."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(
            f"the message body has {len(payload)} bytes, more than the {MAX_COMMAND_BYTES} "
            "that a command may have", REASON_TOO_LARGE)

    try:
        document = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CommandError(f"the message body is not UTF-8: {exc.reason} at byte {exc.start}",
                           REASON_MALFORMED) from exc
    except RecursionError as exc:
        raise CommandError("the message body is JSON nested too deeply",
                           REASON_MALFORMED) from exc
    except ValueError as exc:
        # json.JSONDecodeError's text gives the position but never quotes the body.
        raise CommandError(f"the message body is not JSON: {exc}", REASON_MALFORMED) from exc
    if not isinstance(document, dict):
        raise CommandError(
            f"the message body is a JSON {type(document).__name__}, not an object",
            REASON_MALFORMED)

    # The request id comes first, so that a result about a bad command name can carry it.
    request_id = document.get("request_id")
    valid_id = request_id if isinstance(request_id, str) and REQUEST_ID.fullmatch(request_id) \
        else None
    name = document.get("command")
    valid_name = name[:MAX_NAME_CHARS] if isinstance(name, str) and name else None
    if valid_id is None:
        raise CommandError(
            "request_id is missing or invalid; expected 1 to 64 characters of A-Z, a-z, "
            "0-9, '.', '_', ':' and '-'", REASON_MALFORMED, command=valid_name)
    if valid_name is None:
        raise CommandError("command is missing or not a non-empty string", REASON_MALFORMED,
                           request_id=valid_id)

    arguments = {key: value for key, value in document.items()
                 if key not in ("command", "request_id")}
    return Command(valid_name, valid_id, arguments)


Handler = Callable[[Command], CommandResult | None]


class CommandDispatcher:
    """Parses each cloud-to-device message, runs its handler and reports its one result."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        publish_result: Callable[[CommandResult], None],
        logger: logging.Logger,
    ) -> None:
        self._handlers = dict(handlers)
        self._publish_result = publish_result
        self._logger = logger
        self.received = 0
        self.results: dict[str, int] = {STATUS_OK: 0, STATUS_REJECTED: 0, STATUS_FAILED: 0}

    @property
    def commands(self) -> tuple[str, ...]:
        return tuple(sorted(self._handlers))

    def dispatch(self, payload: bytes, topic: str) -> None:
        """Run the command in payload, which arrived on topic; report a rejection at once."""
        self.received += 1
        try:
            command = parse_command(payload)
        except CommandError as exc:
            self._logger.warning(
                "command_rejected %s",
                fields(topic=topic, bytes=len(payload), reason=exc.reason, error=exc,
                       request_id=exc.request_id, command=exc.command))
            self.report(exc.result())
            return

        handler = self._handlers.get(command.name)
        self._logger.info(
            "command_received %s",
            fields(command=command.name, request_id=command.request_id, bytes=len(payload),
                   arguments=",".join(sorted(command.arguments))))
        if handler is None:
            known = ", ".join(self.commands)
            self.report(rejected(command, REASON_UNKNOWN_COMMAND,
                                 f"unknown command {command.name!r}; known commands: {known}"))
            return

        result = handler(command)
        if result is not None:
            self.report(result)

    def report(self, result: CommandResult) -> None:
        """Log the result of a command and hand it to the uplink to publish."""
        self.results[result.status] = self.results.get(result.status, 0) + 1
        level = logging.INFO if result.status == STATUS_OK else logging.WARNING
        self._logger.log(
            level, "command_result %s",
            fields(command=result.command, request_id=result.request_id, status=result.status,
                   reason=result.reason, message=result.message))
        self._publish_result(result)


# Results go to the cloud like alerts, as publishes with negative page numbers, from this one
# down. The range lies between the alerts' (-1 down) and the health message's -(2**62), so a
# PUBACK's page number identifies the kind of message it acknowledges.
RESULT_PAGE_SEQ_FIRST = -(2**61)
RESULT_PAGE_SEQ_LAST = -(2**62) + 1

# Results not yet acknowledged by the broker are kept up to this number, oldest dropped first.
MAX_UNACKED_RESULTS = 1000


class ResultOutbox:
    """Results that the broker has not acknowledged, sent again on every new connection.

    A result whose PUBACK was lost may reach the cloud twice, with the same request_id both
    times, so the cloud can drop the copy.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._unacked: dict[int, bytes] = {}
        self._sent_on: dict[int, int] = {}
        self._added = 0
        self.dropped = 0

    def add(self, result: CommandResult) -> None:
        page_seq = RESULT_PAGE_SEQ_FIRST - self._added % (RESULT_PAGE_SEQ_FIRST
                                                           - RESULT_PAGE_SEQ_LAST)
        self._added += 1
        body = _strict_json_values({"kind": "command-result", **result.body()})
        self._unacked[page_seq] = json.dumps(body, separators=(",", ":"), default=str,
                                             allow_nan=False).encode()
        if len(self._unacked) > MAX_UNACKED_RESULTS:
            oldest = next(iter(self._unacked))
            del self._unacked[oldest]
            self._sent_on.pop(oldest, None)
            self.dropped += 1
            self._logger.warning("command_result_dropped %s", fields(
                unacked=MAX_UNACKED_RESULTS, dropped=self.dropped,
                consequence="the cloud never receives the oldest unacknowledged result"))

    def owns(self, page_seq: int) -> bool:
        return RESULT_PAGE_SEQ_LAST <= page_seq <= RESULT_PAGE_SEQ_FIRST

    def due(self, connection: int) -> list[tuple[int, bytes]]:
        """Return the results not yet sent on this connection, as (page_seq, payload)."""
        messages = []
        for page_seq, payload in self._unacked.items():
            if self._sent_on.get(page_seq) != connection:
                self._sent_on[page_seq] = connection
                messages.append((page_seq, payload))
        return messages

    def acknowledged(self, page_seq: int) -> bytes | None:
        """Forget an acknowledged result and return its payload, or None if unknown."""
        self._sent_on.pop(page_seq, None)
        return self._unacked.pop(page_seq, None)


def _strict_json_values(value: Any) -> Any:
    """Return value with NaN and the infinities as strings, which strict JSON parsers take.

    A result echoes the command's arguments, and Python's json module reads NaN and
    Infinity in a command body that a cloud-side parser would reject in the result.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _strict_json_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json_values(item) for item in value]
    return value
