"""Decoding of ZeroMQ messages: malformed headers become the ValueError that callers handle."""

from __future__ import annotations

import pytest

from common import wire


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"[" * 100_000, "header is nested too deeply: 100000 bytes"),
        (b'{"epoch": ' + b"[" * 5000 + b"]" * 5000 + b"}", "header is nested too deeply"),
        (b'{"epoch": 1e999}', "header number out of range: 1e999"),
        (b'{"epoch": -1e999}', "header number out of range: -1e999"),
        (b'{"epoch": Infinity}', "header contains Infinity, which is not a JSON number"),
        (b'{"epoch": NaN}', "header contains NaN"),
        (b"[1]", "header is not a JSON object"),
    ],
    ids=["nested-list", "nested-value", "huge-number", "huge-negative", "infinity", "nan",
         "list"],
)
def test_wire_decode_bad_header_raises_value_error(header: bytes, expected: str) -> None:
    with pytest.raises(ValueError) as caught:
        wire.decode([wire.ACK, header])

    assert expected in str(caught.value)


def test_wire_decode_round_trip() -> None:
    frames = wire.encode(wire.PAGE, {"page_seq": 3, "count": 2, "ratio": 0.5}, b"[]")

    message = wire.decode(frames)

    assert message.kind == wire.PAGE
    assert message.header == {"page_seq": 3, "count": 2, "ratio": 0.5}
    assert message.payload == b"[]"
