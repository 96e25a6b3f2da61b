"""Read tags once, for `plcbridge read`: the requests sent, the raw registers and the values.

Commissioning engineers use this to test a tag map against a real PLC before they deploy it,
so every result keeps the raw registers next to the decoded value.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from common.config import PlcDevice, Tag
from common.modbus_tags import (
    ReadRequest,
    TagValue,
    decode_tag,
    invalid_value_reason,
    plan_device_requests,
)
from processes.plc_reader.client import PlcConnection, PlcReadError


@dataclass(frozen=True)
class RequestResult:
    """One Modbus read that was sent, its duration and its error text, empty on success."""

    device: PlcDevice
    request: ReadRequest
    duration_ms: float
    error: str


@dataclass(frozen=True)
class TagResult:
    """One tag's raw registers or bits, decoded value and quality."""

    tag: Tag
    raw: list[int] | list[bool]
    value: TagValue | None
    quality: str
    reason: str


def read_once(
    devices: Iterable[PlcDevice], tags: Iterable[Tag], logger: logging.Logger
) -> tuple[list[RequestResult], list[TagResult]]:
    """Read every tag once, device by device, in the requests the reader would send."""
    tag_list = list(tags)
    device_list = list(devices)
    plans = plan_device_requests(tag_list, device_list)
    requests: list[RequestResult] = []
    results: dict[str, TagResult] = {}

    for device in device_list:
        if not plans[device.name]:
            continue
        connection = PlcConnection(device, logger)
        try:
            _read_device(connection, device, plans[device.name], requests, results)
        finally:
            connection.close()

    # Print in the order the operator listed or configured the tags.
    return requests, [results[tag.name] for tag in tag_list if tag.name in results]


def _read_device(
    connection: PlcConnection,
    device: PlcDevice,
    plan: list[ReadRequest],
    requests: list[RequestResult],
    results: dict[str, TagResult],
) -> None:
    try:
        connection.connect()
    except PlcReadError as exc:
        for request in plan:
            requests.append(RequestResult(device, request, 0.0, f"not sent: {exc}"))
            _bad(request, exc.reason, results)
        return

    for request in plan:
        if device.request_pause_ms and requests:
            time.sleep(device.request_pause_ms / 1000)
        started = time.monotonic()
        try:
            values = connection.read(request)
        except PlcReadError as exc:
            duration_ms = (time.monotonic() - started) * 1000
            requests.append(RequestResult(device, request, duration_ms, str(exc)))
            # After a lost connection the next read reconnects, as pymodbus connects on send.
            _bad(request, exc.reason, results)
            continue
        duration_ms = (time.monotonic() - started) * 1000
        requests.append(RequestResult(device, request, duration_ms, ""))
        for tag in request.tags:
            results[tag.name] = _decoded(tag, values, request.address)


def _decoded(tag: Tag, values: list[int] | list[bool], start: int) -> TagResult:
    first = tag.address - start
    raw = values[first : first + tag.register_count]
    value = decode_tag(tag, values, start)
    reason = invalid_value_reason(value)
    if reason is not None:
        return TagResult(tag, raw, None, "bad", reason)
    return TagResult(tag, raw, value, "good", "")


def _bad(request: ReadRequest, reason: str, results: dict[str, TagResult]) -> None:
    for tag in request.tags:
        results[tag.name] = TagResult(tag, [], None, "bad", reason)
