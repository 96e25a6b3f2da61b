"""The extended tag model: byte orders, strings, bits and the [plc] keys that set them."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from common.config import BYTE_ORDERS, Tag, load_config
from common.errors import ConfigError
from common.modbus_tags import decode_string, decode_tag
from devstack.gateway_toml import LOOPBACK_PLC, gateway_toml
from processes.plc_reader.samples import SampleEncoder


def base_config(plc_keys: str = "", tags: str = "") -> str:
    """Return a minimal configuration with these [plc] key lines and [[plc.tags]] text."""
    return gateway_toml(
        gateway={"runtime_dir": "run"},
        plc=[LOOPBACK_PLC, plc_keys],
        tags=tags,
        uplink={"mode": "azure"},
        credentials={"connection_string_file": "connection-string.txt", "ca_file": "ca.pem"},
    )


# (type, struct format, value) for every multi-byte type, with values whose bytes all differ.
VALUES = [
    ("int16", ">h", -12_345),
    ("uint16", ">H", 0xA1B2),
    ("int32", ">i", -0x12345678),
    ("uint32", ">I", 0xA1B2C3D4),
    ("float32", ">f", -1234.5625),
    ("int64", ">q", -0x0123456789ABCDEF),
    ("uint64", ">Q", 0xA1B2C3D4E5F60718),
    ("float64", ">d", 6.02214076e23),
]


def tag_of(value_type: str, order: str = "ABCD", address: int = 0, **extra: object) -> Tag:
    word_order, byte_swap = BYTE_ORDERS[order]
    fields: dict[str, object] = {"byte_swap": byte_swap, **extra}
    return Tag("t", "fast", "holding_register", address, value_type, word_order, 1.0, 0.0,
               **fields)  # type: ignore[arg-type]


def registers_in_order(fmt: str, value: float, order: str) -> list[int]:
    """Lay out value's big-endian bytes ABCD... in the named order, two bytes a register."""
    data = struct.pack(fmt, value)
    letters = "ABCDEFGH"[: len(data)]
    pattern = order if len(order) == len(data) else _widen(order, len(data))
    laid_out = bytes(data[letters.index(letter)] for letter in pattern)
    return [int.from_bytes(laid_out[i : i + 2], "big") for i in range(0, len(laid_out), 2)]


def _widen(order: str, size: int) -> str:
    """Apply a 2- or 4-letter order's word reversal and byte swap to a value of size bytes."""
    word_order, byte_swap = BYTE_ORDERS[order]
    words = ["ABCDEFGH"[i : i + 2] for i in range(0, size, 2)]
    if word_order == "little":
        words.reverse()
    if byte_swap:
        words = [word[::-1] for word in words]
    return "".join(words)


def orders_for(value_type: str) -> list[str]:
    size = struct.calcsize(dict((t, f) for t, f, _ in VALUES)[value_type])
    if size == 2:
        return ["AB", "BA"]
    if size == 4:
        return ["ABCD", "CDAB", "BADC", "DCBA"]
    return ["ABCD", "CDAB", "BADC", "DCBA", "ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA"]


DECODE_CASES = [
    (value_type, fmt, value, order)
    for value_type, fmt, value in VALUES
    for order in orders_for(value_type)
]


@pytest.mark.parametrize(("value_type", "fmt", "value", "order"), DECODE_CASES)
def test_decode_tag_every_type_and_order(
    value_type: str, fmt: str, value: float, order: str
) -> None:
    registers = [0xFFFF, *registers_in_order(fmt, value, order), 0xFFFF]

    assert decode_tag(tag_of(value_type, order, address=1), registers, 0) == value


def test_decode_tag_known_float32_layouts() -> None:
    # 123.456 as float32 is 0x42F6E979: bytes A=42 B=F6 C=E9 D=79.
    layouts = {
        "ABCD": [0x42F6, 0xE979],
        "CDAB": [0xE979, 0x42F6],
        "BADC": [0xF642, 0x79E9],
        "DCBA": [0x79E9, 0xF642],
    }
    for order, registers in layouts.items():
        value = decode_tag(tag_of("float32", order), registers, 0)

        assert value == pytest.approx(123.456, rel=1e-6), order


def test_decode_tag_three_word_swapped_floats_in_tag_order() -> None:
    values = [1.5, -2.25, 1000.125]
    registers = [word for value in values for word in registers_in_order(">f", value, "CDAB")]
    tags = [tag_of("float32", "CDAB", address=10 + 2 * i) for i in range(3)]

    decoded = [decode_tag(tag, registers, 10) for tag in tags]

    assert decoded == values


def test_decode_tag_bits_of_one_register() -> None:
    register = [0b1000_0000_0000_0101]

    bits = [decode_tag(tag_of("bool", "AB", bit=bit), register, 0) for bit in range(16)]

    assert bits[0] is True
    assert bits[1] is False
    assert bits[2] is True
    assert bits[15] is True
    assert bits.count(True) == 3


STRING_CASES = [
    # (registers, length_bytes, padding, order, expected)
    ([0x4142, 0x4344], 4, "nul", "AB", "ABCD"),
    ([0x4142, 0x4300], 4, "nul", "AB", "ABC"),
    ([0x4142, 0x4300], 3, "nul", "AB", "ABC"),
    ([0x4241, 0x0043], 4, "nul", "BA", "ABC"),
    ([0x4142, 0x2020], 4, "space", "AB", "AB"),
    ([0x4142, 0x2000], 4, "space", "AB", "AB"),
    ([0x4142, 0x2020], 4, "nul", "AB", "AB  "),
    ([0x4142, 0x2000], 4, "none", "AB", "AB \0"),
    ([0x4142, 0x4344, 0x4500], 5, "nul", "AB", "ABCDE"),
    ([0xC3A9, 0x0000], 4, "nul", "AB", "\u00e9"),
    ([0x41FF, 0x0000], 4, "nul", "AB", "A\ufffd"),
]


@pytest.mark.parametrize(("registers", "length", "padding", "order", "expected"), STRING_CASES)
def test_decode_string_padding_and_order(
    registers: list[int], length: int, padding: str, order: str, expected: str
) -> None:
    tag = tag_of("string", order, string_bytes=length, string_padding=padding)

    assert decode_tag(tag, registers, 0) == expected
    assert decode_string(registers, length, padding, order == "BA") == expected


def test_decode_string_register_count() -> None:
    assert tag_of("string", "AB", string_bytes=1).register_count == 1
    assert tag_of("string", "AB", string_bytes=20).register_count == 10
    assert tag_of("string", "AB", string_bytes=21).register_count == 11


def test_samples_string_and_unit_are_json() -> None:
    encoder = SampleEncoder(epoch=3)

    with_unit = encoder.good("p", 1.5, 1000, 7, unit="kPa")
    text = encoder.good("s", 'say "hi"', 1000, 8)

    assert with_unit == (b'{"name":"p","value":1.5,"unit":"kPa","quality":"good",'
                         b'"ts_ms":1000,"epoch":3,"seq":7}')
    assert text == (b'{"name":"s","value":"say \\"hi\\"","quality":"good",'
                    b'"ts_ms":1000,"epoch":3,"seq":8}')


# Configuration keys of the tag model.


def write_config(tmp_path: Path, tags: str, plc_keys: str = "") -> Path:
    path = tmp_path / "plcbridge.toml"
    path.write_text(base_config(plc_keys=plc_keys, tags=tags))
    return path


def tag_toml(extra: str, address: int = 0, value_type: str = "float32",
             table: str = "holding_register") -> str:
    return (f'[[plc.tags]]\nname = "t"\ngroup = "fast"\ntable = "{table}"\n'
            f'address = {address}\ntype = "{value_type}"\n{extra}\n')


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


@pytest.mark.parametrize(
    ("order", "word_order", "byte_swap"),
    [("ABCD", "big", False), ("CDAB", "little", False), ("BADC", "big", True),
     ("DCBA", "little", True)],
)
def test_config_order_maps_to_word_order_and_swap(
    tmp_path: Path, order: str, word_order: str, byte_swap: bool
) -> None:
    config = load_config(write_config(tmp_path, tag_toml(f'order = "{order}"')))

    assert config.plc.tags[0].word_order == word_order
    assert config.plc.tags[0].byte_swap is byte_swap


def test_config_word_order_still_accepted(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, tag_toml('word_order = "little"')))

    assert config.plc.tags[0].word_order == "little"
    assert config.plc.tags[0].byte_swap is False


@pytest.mark.parametrize(
    ("extra", "value_type", "table", "expected"),
    [
        ('order = "GHEFCDAB"', "float32", "holding_register",
         "plc.tags[0].order: 'GHEFCDAB'; expected one of ABCD, CDAB, BADC, DCBA for type float32"),
        ('order = "CDAB"\nword_order = "big"', "float32", "holding_register",
         "plc.tags[0].word_order: 'big'; expected no word_order when order is set"),
        ('order = "AB"', "bool", "coil",
         "plc.tags[0].order: 'AB'; expected no order, because a coil contains one bit"),
        ("bit = 3", "uint16", "holding_register",
         "plc.tags[0].bit: 3; expected no bit unless the tag is a bool on a register table"),
        ("bit = 16", "bool", "holding_register",
         "plc.tags[0].bit: 16; expected an integer from 0 to 15"),
        ("", "string", "holding_register",
         "plc.tags[0].length_bytes: None; expected a length for a string tag"),
        ("length_bytes = 4", "uint16", "holding_register",
         "plc.tags[0].length_bytes: 4; expected no length_bytes unless the type is string"),
        ("deadband = 1.0\ndeadband_percent = 2.0", "float32", "holding_register",
         "plc.tags[0].deadband_percent: 2.0; expected no deadband_percent when deadband is set"),
        ("deadband = 1.0", "bool", "holding_register",
         "plc.tags[0].deadband: 1.0; expected no deadband on a bool tag"),
    ],
)
def test_config_tag_model_errors(
    tmp_path: Path, extra: str, value_type: str, table: str, expected: str
) -> None:
    message = config_error(write_config(tmp_path, tag_toml(extra, value_type=value_type,
                                                           table=table)))

    assert expected in message


def test_config_string_bit_unit_keys(tmp_path: Path) -> None:
    tags = (tag_toml('length_bytes = 10\npadding = "space"\norder = "BA"', value_type="string")
            + tag_toml('bit = 7\nunit = "kPa"', address=20, value_type="bool").replace(
                'name = "t"', 'name = "b"'))

    config = load_config(write_config(tmp_path, tags))

    text, bit = config.plc.tags
    assert (text.string_bytes, text.string_padding, text.byte_swap) == (10, "space", True)
    assert text.register_count == 5
    assert (bit.bit, bit.unit) == (7, "kPa")


def test_config_address_base_one(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, tag_toml("", address=1), "address_base = 1"))

    assert config.plc.tags[0].address == 0


def test_config_address_base_one_rejects_zero(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, tag_toml("", address=0), "address_base = 1"))

    assert "plc.tags[0].address: 0; expected an integer from 1 to 65536" in message


def test_config_single_device_form_is_default_device(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, tag_toml(""), "port = 1502\nunit_id = 7"))

    (device,) = config.plc.devices
    assert (device.name, device.transport, device.host, device.port, device.unit_id) == (
        "plc", "tcp", "127.0.0.1", 1502, 7)
    assert config.plc.tags[0].device == "plc"
    assert config.plc.tags[0].unit_id is None
