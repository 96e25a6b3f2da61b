"""Read planning and value decoding of common.modbus_tags, on tag maps with known results."""

from __future__ import annotations

import math
import struct

import pytest

from common.config import Tag
from common.modbus_tags import (
    ReadRequest,
    decode_registers,
    decode_tag,
    invalid_value_reason,
    plan_requests,
)


def make_tag(
    name: str,
    address: int,
    value_type: str = "uint16",
    table: str = "holding_register",
    group: str = "fast",
    word_order: str = "big",
    scale: float = 1.0,
    offset: float = 0.0,
) -> Tag:
    return Tag(name, group, table, address, value_type, word_order, scale, offset)


def registers_of(fmt: str, value: float, word_order: str = "big") -> list[int]:
    """Encode value with struct as big-endian registers, then order the words."""
    data = struct.pack(fmt, value)
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return words if word_order == "big" else words[::-1]


def spans(requests: list[ReadRequest]) -> list[tuple[str, str, int, int]]:
    return [(r.group, r.table, r.address, r.count) for r in requests]


# plan_requests


def test_plan_requests_contiguous_tags_one_read() -> None:
    tags = [make_tag("a", 0, "uint32"), make_tag("b", 2, "float32"), make_tag("c", 4)]

    requests = plan_requests(tags, 125, 8)

    assert spans(requests) == [("fast", "holding_register", 0, 5)]
    assert [tag.name for tag in requests[0].tags] == ["a", "b", "c"]


def test_plan_requests_gap_at_limit_merges() -> None:
    tags = [make_tag("a", 0), make_tag("b", 9)]  # hole of 8 registers: 1 to 8

    assert spans(plan_requests(tags, 125, 8)) == [("fast", "holding_register", 0, 10)]


def test_plan_requests_gap_above_limit_splits() -> None:
    tags = [make_tag("a", 0), make_tag("b", 10)]  # hole of 9 registers

    assert spans(plan_requests(tags, 125, 8)) == [
        ("fast", "holding_register", 0, 1),
        ("fast", "holding_register", 10, 1),
    ]


def test_plan_requests_zero_gap_splits_on_any_hole() -> None:
    tags = [make_tag("a", 0), make_tag("b", 1), make_tag("c", 3)]

    assert spans(plan_requests(tags, 125, 0)) == [
        ("fast", "holding_register", 0, 2),
        ("fast", "holding_register", 3, 1),
    ]


def test_plan_requests_1000_registers_eight_reads() -> None:
    tags = [make_tag(f"r{i}", 100 + i) for i in range(1000)]

    requests = plan_requests(tags, 125, 8)

    assert len(requests) == 8
    assert [r.count for r in requests] == [125] * 8
    assert [r.address for r in requests] == [100 + 125 * i for i in range(8)]
    assert sum(len(r.tags) for r in requests) == 1000


def test_plan_requests_span_limit_keeps_values_whole() -> None:
    # After 123 registers of uint16, a float32 at 123-124 fits, but one at 124-125 does not.
    fits = [make_tag(f"r{i}", i) for i in range(123)] + [make_tag("f", 123, "float32")]
    spills = [make_tag(f"r{i}", i) for i in range(124)] + [make_tag("f", 124, "float32")]

    assert spans(plan_requests(fits, 125, 8)) == [("fast", "holding_register", 0, 125)]
    assert spans(plan_requests(spills, 125, 8)) == [
        ("fast", "holding_register", 0, 124),
        ("fast", "holding_register", 124, 2),
    ]


def test_plan_requests_configured_span_limit() -> None:
    tags = [make_tag(f"r{i}", i) for i in range(10)]

    requests = plan_requests(tags, 4, 8)

    assert [(r.address, r.count) for r in requests] == [(0, 4), (4, 4), (8, 2)]


def test_plan_requests_separate_groups_and_tables() -> None:
    tags = [
        make_tag("a", 0),
        make_tag("b", 1, group="slow"),
        make_tag("c", 2, table="input_register"),
        make_tag("d", 3),
        make_tag("e", 0, "bool", table="coil"),
    ]

    assert spans(plan_requests(tags, 125, 8)) == [
        ("fast", "holding_register", 0, 4),
        ("slow", "holding_register", 1, 1),
        ("fast", "input_register", 2, 1),
        ("fast", "coil", 0, 1),
    ]


def test_plan_requests_unsorted_and_overlapping_tags() -> None:
    tags = [make_tag("late", 20), make_tag("whole", 0, "uint32"), make_tag("low_word", 1)]

    requests = plan_requests(tags, 125, 8)

    assert spans(requests) == [
        ("fast", "holding_register", 0, 2),
        ("fast", "holding_register", 20, 1),
    ]
    assert [tag.name for tag in requests[0].tags] == ["whole", "low_word"]


def test_plan_requests_bits_up_to_2000() -> None:
    tags = [make_tag(f"c{i}", i, "bool", table="coil") for i in range(2500)]

    requests = plan_requests(tags, 125, 8)

    assert [(r.address, r.count) for r in requests] == [(0, 2000), (2000, 500)]


def test_plan_requests_bit_gap_counts_sixteen_per_register() -> None:
    merged = [make_tag("a", 0, "bool", table="discrete_input"),
              make_tag("b", 1 + 128, "bool", table="discrete_input")]
    split = [make_tag("a", 0, "bool", table="discrete_input"),
             make_tag("b", 1 + 129, "bool", table="discrete_input")]

    assert len(plan_requests(merged, 125, 8)) == 1
    assert len(plan_requests(split, 125, 8)) == 2


def test_plan_requests_demo_map_four_reads() -> None:
    tags = [
        make_tag("line1.counter", 0, "uint32"),
        make_tag("line1.sine", 2, "float32"),
        make_tag("line1.temperature_c", 0, "int16", table="input_register", group="slow"),
        make_tag("line1.running", 0, "bool", table="coil"),
        make_tag("plc.serial_number", 10, "uint32", table="input_register", group="slow"),
    ]

    # Input registers 1-9 are a hole of 9 registers, one more than max_gap_registers.
    assert spans(plan_requests(tags, 125, 8)) == [
        ("fast", "holding_register", 0, 4),
        ("slow", "input_register", 0, 1),
        ("slow", "input_register", 10, 2),
        ("fast", "coil", 0, 1),
    ]


def test_plan_requests_tag_wider_than_limit_raises() -> None:
    with pytest.raises(ValueError, match="'wide' needs 4 registers"):
        plan_requests([make_tag("wide", 0, "float64")], 2, 8)


# decode_registers and decode_tag


@pytest.mark.parametrize(
    ("value_type", "fmt", "value"),
    [
        ("int16", ">h", -12345),
        ("uint16", ">H", 54321),
        ("int32", ">i", -2_000_000_001),
        ("uint32", ">I", 22091017),
        ("float32", ">f", -1234.5625),  # exactly representable in float32
        ("int64", ">q", -9_000_000_000_000_000_001),
        ("float64", ">d", math.pi),
    ],
)
@pytest.mark.parametrize("word_order", ["big", "little"])
def test_decode_registers_every_type(
    value_type: str, fmt: str, value: float, word_order: str
) -> None:
    words = registers_of(fmt, value, word_order)

    assert decode_registers(words, value_type, word_order) == value


@pytest.mark.parametrize(
    ("value_type", "fmt", "value"),
    [
        ("int16", ">h", -32768),
        ("int16", ">h", 32767),
        ("int16", ">h", -1),
        ("uint16", ">H", 65535),
        ("uint32", ">I", 4_000_000_000),
        ("float64", ">d", -0.1),
    ],
)
@pytest.mark.parametrize("word_order", ["big", "little"])
def test_decode_tag_every_type(value_type: str, fmt: str, value: float, word_order: str) -> None:
    tag = make_tag("t", 1, value_type, word_order=word_order)

    assert decode_tag(tag, [0, *registers_of(fmt, value, word_order)], 0) == value


def test_decode_registers_little_order_keeps_caller_list() -> None:
    words = registers_of(">I", 0x12345678, "little")
    copy = list(words)

    assert decode_registers(words, "uint32", "little") == 0x12345678
    assert words == copy


def test_decode_tag_three_floats_little_order_in_place() -> None:
    values = [1.5, -2.25, 1000.125]
    registers = [word for value in values for word in registers_of(">f", value, "little")]
    tags = [make_tag(f"f{i}", 10 + 2 * i, "float32", word_order="little") for i in range(3)]

    assert [decode_tag(tag, registers, 10) for tag in tags] == values


def test_decode_tag_offset_into_response() -> None:
    registers = [0, 0, 0, *registers_of(">i", -7), 0]

    assert decode_tag(make_tag("t", 103, "int32"), registers, 100) == -7


def test_decode_tag_int_stays_int_without_scaling() -> None:
    value = decode_tag(make_tag("t", 0, "int16"), registers_of(">h", -215), 0)

    assert value == -215
    assert isinstance(value, int)


def test_decode_tag_scale_and_offset() -> None:
    tag = make_tag("t", 0, "int16", scale=0.1, offset=-40.0)

    value = decode_tag(tag, registers_of(">h", 615), 0)

    assert value == pytest.approx(21.5)
    assert isinstance(value, float)


def test_decode_tag_scale_has_no_binary_noise() -> None:
    value = decode_tag(make_tag("t", 0, "int16", scale=0.1), registers_of(">h", 227), 0)

    # The plain product is 22.700000000000003.
    assert value == 22.7
    assert repr(value) == "22.7"


def test_decode_tag_offset_only_becomes_float() -> None:
    value = decode_tag(make_tag("t", 0, "uint16", offset=1.0), [41], 0)

    assert value == 42.0
    assert isinstance(value, float)


def test_decode_tag_coil_bit() -> None:
    bits = [False, True, False]

    assert decode_tag(make_tag("c", 1, "bool", table="coil"), bits, 0) is True
    assert decode_tag(make_tag("c", 2, "bool", table="coil"), bits, 0) is False


def test_decode_tag_bool_register_ignores_scale() -> None:
    tag = make_tag("b", 0, "bool", scale=10.0, offset=3.0)

    assert decode_tag(tag, [0x0100], 0) is True
    assert decode_tag(tag, [0], 0) is False


def test_invalid_value_reason_non_finite() -> None:
    nan = decode_tag(make_tag("f", 0, "float32"), [0x7FC0, 0x0000], 0)

    assert invalid_value_reason(nan) == "value is nan"
    assert invalid_value_reason(float("-inf")) == "value is -inf"
    assert invalid_value_reason(1.0) is None
    assert invalid_value_reason(7) is None
    assert invalid_value_reason(True) is None
