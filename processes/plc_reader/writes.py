"""Writes of one value to a writable tag: checked, encoded, sent, and acknowledged with a result.

A write is rejected before anything is sent when the tag is not marked writable, when the
value has the wrong kind (true or false for a bool tag, text for a string tag, a number
otherwise), or when it lies outside the tag's min_value and max_value or the range of its
type. Coils are written with function code 5, one register with function code 6 and several
registers, and every string, with 16. A device with multiple_write_functions_only gets one
coil with function code 15 and one register with 16 instead, because some devices implement
only those two.

A bool tag on one bit of a holding register is written with function code 22 (mask write
register), which the device applies to the register in one step, so the other 15 bits keep
whatever the PLC program or another client wrote meanwhile. A read, then a write of the
whole register would overwrite such a change made between the two. A device without
function code 22 answers with Modbus exception 1 (illegal function), and the write fails.

The write_tag command reaches prepare_write through the command socket of common/wire.py,
and the device's poller sends the write (processes/plc_reader/poller.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from common.config import BIT_TABLES, STRING_TYPE, Tag
from common.modbus_tags import encode_string, encode_tag
from processes.plc_reader.client import PlcConnection, PlcReadError

REASON_NOT_WRITABLE = "not writable"
REASON_OUT_OF_RANGE = "out of range"
REASON_INVALID_VALUE = "invalid value"

WRITE_SINGLE_COIL = 5
WRITE_SINGLE_REGISTER = 6
WRITE_MULTIPLE_COILS = 15
WRITE_MULTIPLE_REGISTERS = 16
MASK_WRITE_REGISTER = 22


class WriteRejected(Exception):
    """A write rejected before it reached the PLC, with the reason its result carries."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PreparedWrite:
    """One Modbus write request for one tag.

    For function code 22, registers contains the AND mask and the OR mask.
    """

    tag: Tag
    function_code: int
    registers: tuple[int, ...] = ()
    coil: bool = False


# The function code that writes the same single coil or register, for devices that lack
# the single-write function codes.
_MULTIPLE_FOR_SINGLE = {
    WRITE_SINGLE_COIL: WRITE_MULTIPLE_COILS,
    WRITE_SINGLE_REGISTER: WRITE_MULTIPLE_REGISTERS,
}


def prepare_write(tag: Tag, value: Any, multiple_only: bool = False) -> PreparedWrite:
    """Check value against the tag and encode it; raise WriteRejected naming the reason.

    multiple_only replaces function codes 5 and 6 with 15 and 16.
    """
    prepared = _prepare(tag, value)
    if multiple_only and prepared.function_code in _MULTIPLE_FOR_SINGLE:
        code = _MULTIPLE_FOR_SINGLE[prepared.function_code]
        return PreparedWrite(tag, code, prepared.registers, prepared.coil)
    return prepared


def _prepare(tag: Tag, value: Any) -> PreparedWrite:
    if not tag.writable:
        raise WriteRejected(f"tag {tag.name!r} is not marked writable", REASON_NOT_WRITABLE)

    if tag.table in BIT_TABLES or tag.type == "bool":
        if not isinstance(value, bool):
            raise WriteRejected(f"tag {tag.name!r} takes true or false, not {value!r}",
                                REASON_INVALID_VALUE)
        return _prepare_bool(tag, value)

    if tag.type == STRING_TYPE:
        return _prepare_string(tag, value)

    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise WriteRejected(f"tag {tag.name!r} takes a finite number, not {value!r}",
                            REASON_INVALID_VALUE)
    _check_limits(tag, value)
    try:
        registers = encode_tag(tag, value)
    except ValueError as exc:
        raise WriteRejected(f"tag {tag.name!r}: {value!r} cannot be written: {exc}",
                            REASON_OUT_OF_RANGE) from exc
    code = WRITE_SINGLE_REGISTER if len(registers) == 1 else WRITE_MULTIPLE_REGISTERS
    return PreparedWrite(tag, code, tuple(registers))


def _prepare_bool(tag: Tag, value: bool) -> PreparedWrite:
    if tag.table in BIT_TABLES:
        return PreparedWrite(tag, WRITE_SINGLE_COIL, coil=value)
    if tag.bit is None:
        # A bool on a whole register reads true when the register is not zero.
        return PreparedWrite(tag, WRITE_SINGLE_REGISTER, (int(value),))
    # The device computes (register AND and_mask) OR (or_mask AND NOT and_mask).
    bit = 1 << tag.bit
    return PreparedWrite(tag, MASK_WRITE_REGISTER, (0xFFFF ^ bit, bit if value else 0))


def _prepare_string(tag: Tag, value: Any) -> PreparedWrite:
    if not isinstance(value, str):
        raise WriteRejected(f"tag {tag.name!r} takes a string, not {value!r}",
                            REASON_INVALID_VALUE)
    try:
        registers = encode_string(tag, value)
    except ValueError as exc:
        raise WriteRejected(f"tag {tag.name!r}: the string cannot be written: {exc}",
                            REASON_OUT_OF_RANGE) from exc
    return PreparedWrite(tag, WRITE_MULTIPLE_REGISTERS, tuple(registers))


def _check_limits(tag: Tag, value: float) -> None:
    if tag.min_value is not None and value < tag.min_value:
        raise WriteRejected(f"tag {tag.name!r}: {value!r} is below min_value {tag.min_value:g}",
                            REASON_OUT_OF_RANGE)
    if tag.max_value is not None and value > tag.max_value:
        raise WriteRejected(f"tag {tag.name!r}: {value!r} is above max_value {tag.max_value:g}",
                            REASON_OUT_OF_RANGE)


def write_tag(connection: PlcConnection, tag: Tag, value: Any,
              multiple_only: bool = False) -> dict[str, Any]:
    """Write value to tag and return the acknowledgement: result ok, rejected or failed."""
    ack: dict[str, Any] = {"tag": tag.name, "value": value}
    try:
        prepared = prepare_write(tag, value, multiple_only)
        if not connection.connected:
            connection.connect()
        connection.write(prepared.tag, prepared.function_code, list(prepared.registers),
                         prepared.coil)
    except WriteRejected as exc:
        return {**ack, "result": "rejected", "reason": exc.reason, "message": str(exc)}
    except PlcReadError as exc:
        return {**ack, "result": "failed", "reason": exc.reason, "message": str(exc)}
    return {**ack, "result": "ok"}
