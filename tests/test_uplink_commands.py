"""Command parsing and dispatch: valid bodies, every kind of malformed one, the handler table."""

from __future__ import annotations

import json
import logging

import pytest

from processes.uplink_commands import (
    MAX_COMMAND_BYTES,
    MAX_UNACKED_RESULTS,
    Command,
    CommandDispatcher,
    CommandError,
    CommandResult,
    ResultOutbox,
    ok,
    parse_command,
)
from processes.uplink_health import HEALTH_PAGE_SEQ

LOGGER = logging.getLogger("plcbridge.test_uplink_commands")


def body(**document: object) -> bytes:
    return json.dumps(document).encode()


def test_parse_command_valid() -> None:
    command = parse_command(body(command="write_tag", request_id="r-1.a:B_2", tag="t",
                                 value=5))

    assert command.name == "write_tag"
    assert command.request_id == "r-1.a:B_2"
    assert command.arguments == {"tag": "t", "value": 5}


def test_parse_command_accepts_max_size() -> None:
    prefix = body(command="x", request_id="r", pad="")[:-2]
    padded = prefix + b"a" * (MAX_COMMAND_BYTES - len(prefix) - 2) + b'"}'

    assert len(padded) == MAX_COMMAND_BYTES
    assert parse_command(padded).name == "x"


@pytest.mark.parametrize(
    ("payload", "reason", "message", "request_id", "command"),
    [
        (b"{" + b" " * MAX_COMMAND_BYTES + b"}", "too large", "more than the 65536", None, None),
        (b"\xff\xfe{}", "malformed", "not UTF-8", None, None),
        (b'{"command": "x", ', "malformed", "not JSON", None, None),
        (b"[1, 2]", "malformed", "JSON list, not an object", None, None),
        (b'"write_tag"', "malformed", "JSON str, not an object", None, None),
        (b"[" * 30_000 + b"]" * 30_000, "malformed", None, None, None),
        (body(command="write_tag"), "malformed", "request_id is missing", None, "write_tag"),
        (body(command="write_tag", request_id=""), "malformed", "request_id", None, "write_tag"),
        (body(command="write_tag", request_id="a" * 65), "malformed", "request_id", None,
         "write_tag"),
        (body(command="write_tag", request_id="a b"), "malformed", "request_id", None,
         "write_tag"),
        (body(command="write_tag", request_id=7), "malformed", "request_id", None, "write_tag"),
        (body(request_id="r1"), "malformed", "command is missing", "r1", None),
        (body(command="", request_id="r1"), "malformed", "command is missing", "r1", None),
        (body(command=["write_tag"], request_id="r1"), "malformed", "command", "r1", None),
    ],
    ids=["too-large", "not-utf8", "truncated-json", "array", "string", "deep-nesting",
         "no-request-id", "empty-request-id", "long-request-id", "space-in-request-id",
         "numeric-request-id", "no-command", "empty-command", "list-command"],
)
def test_parse_command_rejects(payload: bytes, reason: str, message: str | None,
                               request_id: str | None, command: str | None) -> None:
    with pytest.raises(CommandError) as caught:
        parse_command(payload)

    assert caught.value.reason == reason
    if message is not None:
        assert message in str(caught.value)
    assert caught.value.request_id == request_id
    assert caught.value.command == command


def test_parse_command_never_quotes_arguments() -> None:
    secret = "HostName=h;DeviceId=d;SharedAccessKey=c2VjcmV0"
    payload = body(command="rotate", connection_string=secret)

    with pytest.raises(CommandError) as caught:
        parse_command(payload)

    assert "c2VjcmV0" not in str(caught.value)
    assert "c2VjcmV0" not in repr(parse_command(body(command="rotate", request_id="r",
                                                     connection_string=secret)))


class Recorder:
    def __init__(self) -> None:
        self.results: list[CommandResult] = []

    def __call__(self, result: CommandResult) -> None:
        self.results.append(result)


def test_dispatcher_runs_handler() -> None:
    recorder = Recorder()
    dispatcher = CommandDispatcher({"ping": lambda command: ok(command, pong=True)}, recorder,
                                   LOGGER)

    dispatcher.dispatch(body(command="ping", request_id="r1"), "topic")

    assert [result.body() for result in recorder.results] == [
        {"request_id": "r1", "command": "ping", "status": "ok", "reason": None, "message": "",
         "pong": True}]


def test_dispatcher_deferred_result() -> None:
    recorder = Recorder()
    waiting: list[Command] = []

    def defer(command: Command) -> None:
        waiting.append(command)

    dispatcher = CommandDispatcher({"slow": defer}, recorder, LOGGER)

    dispatcher.dispatch(body(command="slow", request_id="r2"), "topic")
    assert recorder.results == []
    dispatcher.report(ok(waiting[0]))

    assert [result.status for result in recorder.results] == ["ok"]
    assert dispatcher.results["ok"] == 1


def test_dispatcher_rejects_unknown_command() -> None:
    recorder = Recorder()
    dispatcher = CommandDispatcher({"ping": lambda command: ok(command)}, recorder, LOGGER)

    dispatcher.dispatch(body(command="reboot", request_id="r3"), "topic")

    result = recorder.results[0]
    assert result.status == "rejected"
    assert result.reason == "unknown command"
    assert result.request_id == "r3"
    assert result.command == "reboot"
    assert "known commands: ping" in result.message


def test_dispatcher_rejects_malformed_body(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    dispatcher = CommandDispatcher({}, recorder, LOGGER)

    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        dispatcher.dispatch(b'{"password": "hunter2", ', "topic")

    assert recorder.results[0].status == "rejected"
    assert recorder.results[0].reason == "malformed"
    assert recorder.results[0].request_id is None
    assert "hunter2" not in caplog.text
    assert dispatcher.results["rejected"] == 1


def test_dispatcher_logs_no_argument_values(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    dispatcher = CommandDispatcher({"rotate": lambda command: ok(command)}, recorder, LOGGER)

    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        dispatcher.dispatch(body(command="rotate", request_id="r4", key="c2VjcmV0"), "topic")

    assert "arguments=key" in caplog.text
    assert "c2VjcmV0" not in caplog.text


def result(request_id: str) -> CommandResult:
    return CommandResult(request_id, "write_tag", "ok")


def test_result_outbox_resends_until_acknowledged() -> None:
    outbox = ResultOutbox(LOGGER)
    outbox.add(result("a"))
    outbox.add(result("b"))

    first = outbox.due(1)
    assert [json.loads(payload)["request_id"] for _seq, payload in first] == ["a", "b"]
    assert outbox.due(1) == []
    outbox.acknowledged(first[0][0])
    again = outbox.due(2)

    assert [json.loads(payload)["request_id"] for _seq, payload in again] == ["b"]
    assert json.loads(again[0][1])["kind"] == "command-result"


def test_result_outbox_page_seqs_distinct() -> None:
    outbox = ResultOutbox(LOGGER)
    outbox.add(result("a"))
    page_seq = outbox.due(1)[0][0]

    assert outbox.owns(page_seq)
    assert page_seq < 0
    assert not outbox.owns(-1)
    assert not outbox.owns(HEALTH_PAGE_SEQ)
    assert not outbox.owns(0)


def test_result_outbox_drops_oldest_beyond_max() -> None:
    outbox = ResultOutbox(LOGGER)
    for number in range(MAX_UNACKED_RESULTS + 1):
        outbox.add(result(f"r{number}"))

    due = outbox.due(1)

    assert len(due) == MAX_UNACKED_RESULTS
    assert json.loads(due[0][1])["request_id"] == "r1"
    assert outbox.dropped == 1


def test_result_outbox_sends_strict_json() -> None:
    outbox = ResultOutbox(LOGGER)
    command_result = result("a")
    command_result.details.update(tag=float("nan"), value=[float("inf"), 1.5])
    outbox.add(command_result)

    [(_seq, payload)] = outbox.due(1)

    def reject_constant(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name} in a result")

    body = json.loads(payload, parse_constant=reject_constant)
    assert body["tag"] == "nan"
    assert body["value"] == ["inf", 1.5]
