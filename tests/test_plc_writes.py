"""Writes to writable tags against the PLC simulator: accepted, out of range, not writable."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import BYTE_ORDERS, Tag
from common.modbus_tags import ReadRequest, decode_tag, encode_tag
from processes.plc_reader.client import PlcConnection
from processes.plc_reader.writes import (
    MASK_WRITE_REGISTER,
    WRITE_MULTIPLE_COILS,
    WRITE_MULTIPLE_REGISTERS,
    WRITE_SINGLE_COIL,
    WRITE_SINGLE_REGISTER,
    PreparedWrite,
    WriteRejected,
    prepare_write,
    write_tag,
)
from tests.support.plc import PlcSimulator
from tests.test_plc_faults import LOGGER, make_device
from tests.test_plc_tags import base_config, config_error, tag_toml

BENCH_REGISTERS = 10
SCRATCH = 100 + BENCH_REGISTERS  # the simulator's first scratch holding register


def writable(name: str, address: int, value_type: str = "uint16", order: str = "ABCD",
             table: str = "holding_register", scale: float = 1.0, offset: float = 0.0,
             **extra: object) -> Tag:
    word_order, byte_swap = BYTE_ORDERS[order]
    return Tag(name, "fast", table, address, value_type, word_order, scale, offset,
               byte_swap=byte_swap, writable=True, **extra)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def plc() -> Iterator[PlcSimulator]:
    folder = Path(tempfile.mkdtemp(prefix="pb-", dir="/tmp"))
    simulator = PlcSimulator(folder, bench_registers=BENCH_REGISTERS)
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture
def connection(plc: PlcSimulator) -> Iterator[PlcConnection]:
    opened = PlcConnection(make_device(plc.port), logging.getLogger(LOGGER))
    try:
        yield opened
    finally:
        opened.close()


def read_back(connection: PlcConnection, tag: Tag) -> object:
    request = ReadRequest("fast", tag.table, tag.address, tag.register_count, (tag,))
    return decode_tag(tag, connection.read(request), tag.address)


@pytest.mark.parametrize(
    ("value_type", "order", "value", "code"),
    [("uint16", "AB", 4242, WRITE_SINGLE_REGISTER),
     ("int16", "BA", -1234, WRITE_SINGLE_REGISTER),
     ("float32", "CDAB", -12.5, WRITE_MULTIPLE_REGISTERS),
     ("int32", "DCBA", -123456789, WRITE_MULTIPLE_REGISTERS),
     ("float64", "BADC", math.pi, WRITE_MULTIPLE_REGISTERS),
     ("uint64", "GHEFCDAB", 2**63 + 5, WRITE_MULTIPLE_REGISTERS)],
)
def test_writes_accepted_and_read_back(
    connection: PlcConnection, value_type: str, order: str, value: float, code: int
) -> None:
    tag = writable("w", SCRATCH, value_type, order)

    ack = write_tag(connection, tag, value)

    assert ack == {"tag": "w", "value": value, "result": "ok"}
    assert prepare_write(tag, value).function_code == code
    assert read_back(connection, tag) == value


def test_writes_scaled_value_round_trips(connection: PlcConnection) -> None:
    tag = writable("w", SCRATCH + 8, "int16", "AB", scale=0.1, offset=-40.0)

    ack = write_tag(connection, tag, 21.5)

    assert ack["result"] == "ok"
    assert encode_tag(tag, 21.5) == [615]
    assert read_back(connection, tag) == pytest.approx(21.5)


def test_writes_multiple_functions_only(connection: PlcConnection) -> None:
    register = writable("w", SCRATCH + 14)
    coil = writable("c", 4, "bool", "AB", table="coil")
    bit = writable("b", SCRATCH + 14, "bool", "AB", bit=2)

    assert prepare_write(register, 7, multiple_only=True).function_code == (
        WRITE_MULTIPLE_REGISTERS)
    assert prepare_write(coil, True, multiple_only=True).function_code == WRITE_MULTIPLE_COILS
    # Mask write has no multiple form, so a bit of a register keeps function code 22.
    assert prepare_write(bit, True, multiple_only=True).function_code == MASK_WRITE_REGISTER

    assert write_tag(connection, register, 7, multiple_only=True)["result"] == "ok"
    assert read_back(connection, register) == 7
    for value in (True, False):
        assert write_tag(connection, coil, value, multiple_only=True)["result"] == "ok"
        assert read_back(connection, coil) is value


def test_writes_bit_keeps_other_bits(connection: PlcConnection) -> None:
    whole = writable("whole", SCRATCH + 12)
    assert write_tag(connection, whole, 0b1010_0000)["result"] == "ok"
    bit = writable("b", SCRATCH + 12, "bool", "AB", bit=4)

    assert prepare_write(bit, True).function_code == MASK_WRITE_REGISTER
    assert write_tag(connection, bit, True)["result"] == "ok"
    assert read_back(connection, whole) == 0b1011_0000
    assert write_tag(connection, bit, False)["result"] == "ok"
    assert read_back(connection, whole) == 0b1010_0000
    assert read_back(connection, bit) is False


def test_writes_bool_on_whole_register(connection: PlcConnection) -> None:
    flag = writable("f", SCRATCH + 13, "bool", "AB")

    assert prepare_write(flag, True) == PreparedWrite(flag, WRITE_SINGLE_REGISTER, (1,))
    assert write_tag(connection, flag, True)["result"] == "ok"
    assert read_back(connection, writable("raw", SCRATCH + 13)) == 1


@pytest.mark.parametrize(
    ("order", "padding", "text", "registers"),
    [("AB", "nul", "Hi!", [0x4869, 0x2100, 0x0000]),
     ("BA", "space", "Hi", [0x6948, 0x2020, 0x2020]),
     ("AB", "none", "\u00e9t\u00e9!", [0xC3A9, 0x74C3, 0xA921])],
)
def test_writes_string_round_trips(connection: PlcConnection, order: str, padding: str,
                                   text: str, registers: list[int]) -> None:
    tag = writable("s", SCRATCH + 13, "string", order, string_bytes=6, string_padding=padding)

    prepared = prepare_write(tag, text)
    ack = write_tag(connection, tag, text)

    assert prepared.function_code == WRITE_MULTIPLE_REGISTERS
    assert list(prepared.registers) == registers
    assert ack["result"] == "ok"
    assert read_back(connection, tag) == text


def test_writes_coil(connection: PlcConnection) -> None:
    tag = writable("c", 3, "bool", "AB", table="coil")

    assert prepare_write(tag, True).function_code == WRITE_SINGLE_COIL
    assert write_tag(connection, tag, True)["result"] == "ok"
    assert read_back(connection, tag) is True
    assert write_tag(connection, tag, False)["result"] == "ok"
    assert read_back(connection, tag) is False


@pytest.mark.parametrize(
    ("tag", "value", "reason", "message"),
    [
        (writable("w", SCRATCH, "uint16", "AB", min_value=0.0, max_value=100.0), 100.5,
         "out of range", "100.5 is above max_value 100"),
        (writable("w", SCRATCH, "uint16", "AB", min_value=10.0), 9,
         "out of range", "9 is below min_value 10"),
        (writable("w", SCRATCH, "int16", "AB"), 40000,
         "out of range", "outside the int16 range -32768 to 32767"),
        (writable("w", SCRATCH, "uint16", "AB"), -1,
         "out of range", "outside the uint16 range"),
        (writable("w", SCRATCH, "float32", "ABCD"), 1e39,
         "out of range", "outside the float32 range"),
        (writable("w", SCRATCH, "uint16", "AB"), True, "invalid value", "takes a finite number"),
        (writable("w", SCRATCH, "uint16", "AB"), float("nan"), "invalid value",
         "takes a finite number"),
        (writable("c", 3, "bool", "AB", table="coil"), 1, "invalid value",
         "takes true or false"),
        (Tag("r", "fast", "holding_register", SCRATCH, "uint16", "big", 1.0, 0.0), 5,
         "not writable", "is not marked writable"),
        (writable("s", SCRATCH, "string", "AB", string_bytes=4), "hello", "out of range",
         "5 bytes in UTF-8 do not fit length_bytes 4"),
        (writable("s", SCRATCH, "string", "AB", string_bytes=4), 5, "invalid value",
         "takes a string"),
        (writable("b", SCRATCH, "bool", "AB", bit=3), 1, "invalid value",
         "takes true or false"),
    ],
)
def test_writes_rejected_before_sending(
    connection: PlcConnection, tag: Tag, value: object, reason: str, message: str
) -> None:
    with pytest.raises(WriteRejected) as caught:
        prepare_write(tag, value)
    assert caught.value.reason == reason
    assert message in str(caught.value)

    ack = write_tag(connection, tag, value)

    assert ack["result"] == "rejected"
    assert ack["reason"] == reason
    assert not connection.connected


def test_writes_exception_response_fails(connection: PlcConnection) -> None:
    tag = writable("w", 60000, "uint16", "AB")

    ack = write_tag(connection, tag, 1)

    assert ack["result"] == "failed"
    assert ack["reason"] == "modbus exception 2"


@pytest.mark.parametrize(
    ("extra", "value_type", "table", "expected"),
    [
        ("writable = true", "uint16", "input_register",
         "plc.tags[0].writable: True; expected false, because a input_register is read-only"),
        ("writable = true\nbit = 3\nmax_value = 1.0", "bool", "holding_register",
         "plc.tags[0].max_value: 1.0; expected no limit on a bool tag"),
        ("max_value = 5.0", "uint16", "holding_register",
         "plc.tags[0].writable: False; expected true when min_value or max_value is set"),
        ("writable = true\nmin_value = 5.0\nmax_value = 1.0", "uint16", "holding_register",
         "plc.tags[0].min_value: 5.0; expected at most max_value 1"),
    ],
)
def test_writes_config_errors(
    tmp_path: Path, extra: str, value_type: str, table: str, expected: str
) -> None:
    path = tmp_path / "plcbridge.toml"
    path.write_text(base_config(plc_keys="", tags=tag_toml(extra, value_type=value_type,
                                                                   table=table)))

    assert expected in config_error(path)
