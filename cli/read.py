"""`plcbridge read`: read tags once and print the requests, raw registers, values and quality.

With --config, the tags of the configuration (all, or those named with --tag) are read with
their devices' settings. Without it, one ad-hoc tag is described by --host, --address,
--type and the other options, and validated as a [[plc.tags]] entry would be.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from common.config import PlcDevice, PlcSettings, Tag, load_config, parse_plc_table
from common.errors import ConfigError

EXIT_OK = 0
EXIT_BAD_TAGS = 1

AD_HOC_SOURCE = "command line"

# Ad-hoc options and the [plc] or [[plc.tags]] keys they set.
DEVICE_OPTIONS = {
    "host": "host", "port": "port", "unit": "unit_id", "transport": "transport",
    "serial_port": "serial_port", "baudrate": "baudrate", "parity": "parity",
    "timeout_s": "timeout_s", "address_base": "address_base",
}
TAG_OPTIONS = {
    "table": "table", "address": "address", "type": "type", "order": "order", "bit": "bit",
    "length_bytes": "length_bytes", "padding": "padding", "scale": "scale", "offset": "offset",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="read the tags of this configuration; without it, read one "
                             "ad-hoc tag described by the options below")
    parser.add_argument("--tag", action="append", default=[], metavar="NAME",
                        help="with --config, read only this tag; repeat for several")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    ad_hoc = parser.add_argument_group("ad-hoc tag (without --config)")
    ad_hoc.add_argument("--host", help="PLC host name or address (Modbus TCP, RTU over TCP)")
    ad_hoc.add_argument("--port", type=int, help="TCP port; default 502")
    ad_hoc.add_argument("--unit", type=int, help="unit id; default 1")
    ad_hoc.add_argument("--transport", help="tcp (default), rtu or rtu_over_tcp")
    ad_hoc.add_argument("--serial-port", help="serial device for transport rtu")
    ad_hoc.add_argument("--baudrate", type=int, help="serial speed in bit/s; default 19200")
    ad_hoc.add_argument("--parity", help="N, E (default) or O")
    ad_hoc.add_argument("--timeout-s", type=float, help="reply timeout in seconds; default 1")
    ad_hoc.add_argument("--table",
                        help="holding_register (default), input_register, coil, discrete_input")
    ad_hoc.add_argument("--address", type=int,
                        help="zero-based protocol address; a manual's 40001 is 0")
    ad_hoc.add_argument("--address-base", type=int,
                        help="1 to give --address one-based, as in the vendor's manual")
    ad_hoc.add_argument("--type", help="value type, e.g. uint16, float32, string")
    ad_hoc.add_argument("--order", help="byte order, e.g. ABCD, CDAB, BADC, DCBA")
    ad_hoc.add_argument("--bit", type=int, help="bit 0-15 of the register, for type bool")
    ad_hoc.add_argument("--length-bytes", type=int, help="length of a string in bytes")
    ad_hoc.add_argument("--padding", help="string padding stripped: nul, space or none")
    ad_hoc.add_argument("--scale", type=float, help="value = raw * scale + offset")
    ad_hoc.add_argument("--offset", type=float, help="see --scale")


def read(args: argparse.Namespace) -> int:
    """Read the tags once, print the results and return 1 when any tag is bad."""
    from processes.plc_reader.commission import read_once

    devices, tags = _configured(args) if args.config else _ad_hoc(args)
    logger = logging.getLogger("plcbridge.read")
    requests, results = read_once(devices, tags, logger)

    if args.json:
        _print_json(requests, results)
    else:
        _print_text(requests, results)
    return EXIT_BAD_TAGS if any(result.quality != "good" for result in results) else EXIT_OK


def _configured(args: argparse.Namespace) -> tuple[tuple[PlcDevice, ...], list[Tag]]:
    given = [name for name in DEVICE_OPTIONS | TAG_OPTIONS if _given(args, name)]
    if given:
        raise ConfigError(
            f"--{given[0].replace('_', '-')} describes an ad-hoc tag and cannot be combined "
            "with --config; use --tag NAME to choose configured tags"
        )
    config = load_config(args.config)
    tags = list(config.plc.tags)
    if args.tag:
        known = {tag.name: tag for tag in tags}
        missing = [name for name in args.tag if name not in known]
        if missing:
            raise ConfigError(f"{config.path}: tag {missing[0]!r} not found in [[plc.tags]]")
        tags = [known[name] for name in args.tag]
    return config.plc.devices, tags


def _ad_hoc(args: argparse.Namespace) -> tuple[tuple[PlcDevice, ...], list[Tag]]:
    if args.tag:
        raise ConfigError("--tag needs --config; describe an ad-hoc tag with --address")
    if args.address is None:
        raise ConfigError("missing --address; give --config FILE or describe one tag "
                          "with --host, --address and --type")
    plc: dict[str, Any] = {
        key: getattr(args, option) for option, key in DEVICE_OPTIONS.items()
        if _given(args, option)
    }
    tag: dict[str, Any] = {
        key: getattr(args, option) for option, key in TAG_OPTIONS.items()
        if _given(args, option)
    }
    tag.setdefault("table", "holding_register")
    tag.update(name="ad-hoc", group="read")
    plc["tag_groups"] = [{"name": "read", "poll_interval_ms": 1000}]
    plc["tags"] = [tag]
    settings: PlcSettings = parse_plc_table(AD_HOC_SOURCE, plc)
    return settings.devices, list(settings.tags)


def _given(args: argparse.Namespace, option: str) -> bool:
    return getattr(args, option, None) is not None


def _print_text(requests: list[Any], results: list[Any]) -> None:
    print(f"requests: {len(requests)}")
    for number, result in enumerate(requests, 1):
        request = result.request
        unit = request.unit_id if request.unit_id is not None else result.device.unit_id
        outcome = result.error or "ok"
        print(f"  {number}. {result.device.name} {result.device.endpoint} unit {unit} "
              f"{request.table} address {request.address} count {request.count}: "
              f"{outcome} ({result.duration_ms:.1f} ms)")
    print("tags:")
    for result in results:
        raw = " ".join(_raw_text(word) for word in result.raw) or "-"
        value = "null" if result.value is None else json.dumps(result.value)
        quality = result.quality if not result.reason else f"{result.quality} ({result.reason})"
        unit = f" {result.tag.unit}" if result.tag.unit and result.value is not None else ""
        print(f"  {result.tag.name}: {result.tag.table} address {result.tag.address} "
              f"{result.tag.type} raw [{raw}] value {value}{unit} {quality}")
    sys.stdout.flush()


def _raw_text(word: int | bool) -> str:
    if isinstance(word, bool):
        return "1" if word else "0"
    return f"0x{word:04X}"


def _print_json(requests: list[Any], results: list[Any]) -> None:
    for result in requests:
        request = result.request
        print(json.dumps({
            "kind": "request", "device": result.device.name, "endpoint": result.device.endpoint,
            "unit_id": request.unit_id if request.unit_id is not None else result.device.unit_id,
            "table": request.table, "address": request.address, "count": request.count,
            "duration_ms": round(result.duration_ms, 3), "error": result.error,
        }))
    for result in results:
        print(json.dumps({
            "kind": "tag", "name": result.tag.name, "table": result.tag.table,
            "address": result.tag.address, "type": result.tag.type,
            "raw": [int(word) for word in result.raw], "value": result.value,
            "quality": result.quality, "reason": result.reason,
        }))
