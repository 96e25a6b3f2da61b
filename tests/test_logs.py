"""The shared log format: key=value fields that stay on one line whatever their values."""

from __future__ import annotations

import io
import logging

import pytest

from common.logs import RedactingFormatter, fields, redact


def test_fields_plain_values_unquoted() -> None:
    assert fields(port=8883, peer="127.0.0.1:5000", path="C:\\data") == (
        "port=8883 peer=127.0.0.1:5000 path=C:\\data"
    )


def test_fields_spaces_and_quotes_quoted() -> None:
    assert fields(reason="token expired", empty="") == 'reason="token expired" empty=""'
    assert fields(text='say "hi"') == 'text="say \\"hi\\""'
    assert fields(text='a\\b "c"') == 'text="a\\\\b \\"c\\""'


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("x\nINFO forged", '"x\\nINFO forged"'),
        ("x\r\nINFO forged", '"x\\r\\nINFO forged"'),
        ("a\tb", '"a\\tb"'),
        ("nul\x00", '"nul\\x00"'),
        ("escape\x1b[31m", '"escape\\x1b[31m"'),
        ("next\x85line", '"next\\x85line"'),
        ("line\u2028separator", '"line\\u2028separator"'),
        ("form\x0cfeed", '"form\\x0cfeed"'),
    ],
)
def test_fields_control_characters_escaped(value: str, expected: str) -> None:
    text = fields(client_id=value)
    assert text == f"client_id={expected}"
    assert len(text.splitlines()) == 1


def test_fields_forged_line_stays_in_one_record() -> None:
    # A client id that tries to append a log line of its own, as an MQTT client may send.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger("plcbridge.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        forged = "x\n2026-12-04 00:00:00,000 INFO plcbridge.hub_emulator connect_accepted"
        logger.warning("connect_rejected %s", fields(client_id=forged, reason="unknown"))
    finally:
        logger.removeHandler(handler)

    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("WARNING plcbridge.test_logs connect_rejected client_id=")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sr=hub&SIG=abc%2B&se=1", "sr=hub&SIG=<redacted>&se=1"),
        ("HostName=h;sharedaccesskey=a2V5;DeviceId=d",
         "HostName=h;sharedaccesskey=<redacted>;DeviceId=d"),
        ("Password: hunter2, next", "Password: <redacted>, next"),
        # Non-ASCII text takes the full scans, where the long s matches s.
        ("\u017fig=abc é", "\u017fig=<redacted> é"),
        ('{"page":"[{\\"name\\":\\"line1.speed\\",\\"value\\":1.5}]"}',
         '{"page":"[{\\"name\\":\\"line1.speed\\",\\"value\\":1.5}]"}'),
    ],
)
def test_redact_secrets_any_case(text: str, expected: str) -> None:
    assert redact(text) == expected
