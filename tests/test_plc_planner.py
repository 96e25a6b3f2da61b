"""Request planning per device: known tag maps and the number of reads they take."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from common.config import Tag, load_config
from common.modbus_tags import ReadRequest, plan_device_requests, plan_requests
from tests.test_plc_tags import base_config


def tag(name: str, address: int, value_type: str = "uint16", device: str = "plc",
        group: str = "fast", unit_id: int | None = None, bit: int | None = None) -> Tag:
    return Tag(name, group, "holding_register", address, value_type, "big", 1.0, 0.0,
               device=device, unit_id=unit_id, bit=bit)


def spans(requests: list[ReadRequest]) -> list[tuple[int, int]]:
    return [(request.address, request.count) for request in requests]


def test_planner_contiguous_one_request() -> None:
    tags = [tag(f"t{i}", i) for i in range(100)]

    assert spans(plan_requests(tags, 125, 0)) == [(0, 100)]


def test_planner_gap_below_limit_bridged() -> None:
    tags = [tag("a", 0, "uint32"), tag("b", 7), tag("c", 20)]  # holes of 5 and 12

    assert spans(plan_requests(tags, 125, 5)) == [(0, 8), (20, 1)]
    assert spans(plan_requests(tags, 125, 12)) == [(0, 21)]


def test_planner_gap_above_limit_splits() -> None:
    tags = [tag("a", 0), tag("b", 10), tag("c", 30)]

    assert spans(plan_requests(tags, 125, 8)) == [(0, 1), (10, 1), (30, 1)]


def test_planner_device_limit_sixteen() -> None:
    # 40 contiguous uint32 values are 80 registers: 16 registers hold 8 values, so 5 reads.
    tags = [tag(f"t{i}", 2 * i, "uint32") for i in range(40)]

    requests = plan_requests(tags, 16, 8)

    assert spans(requests) == [(0, 16), (16, 16), (32, 16), (48, 16), (64, 16)]
    assert [len(request.tags) for request in requests] == [8] * 5


def test_planner_limit_never_splits_value() -> None:
    # With 16 registers, a float64 at 14 would span 14-17, so it starts the next read.
    tags = [tag("a", 0, "float64"), tag("b", 4, "float64"), tag("c", 8, "float64"),
            tag("d", 12), tag("e", 14, "float64")]

    assert spans(plan_requests(tags, 16, 8)) == [(0, 13), (14, 4)]


def test_planner_one_request_per_tag() -> None:
    tags = [tag("a", 0, "uint32"), tag("b", 2, "float32"), tag("c", 4),
            tag("bit0", 5, "bool", bit=0), tag("bit1", 5, "bool", bit=1)]

    requests = plan_requests(tags, 125, 8, one_request_per_tag=True)

    assert spans(requests) == [(0, 2), (2, 2), (4, 1), (5, 1)]
    assert [t.name for t in requests[3].tags] == ["bit0", "bit1"]


def test_planner_bits_of_one_register_share_a_read() -> None:
    tags = [tag(f"b{i}", 3, "bool", bit=i) for i in range(16)]

    requests = plan_requests(tags, 125, 0)

    assert spans(requests) == [(3, 1)]
    assert len(requests[0].tags) == 16


def test_planner_separates_devices_and_units() -> None:
    tags = [tag("a", 0, device="north"), tag("b", 1, device="south"),
            tag("c", 2, device="north", unit_id=2), tag("d", 3, device="north")]

    requests = plan_requests(tags, 125, 8)

    keys = sorted((r.device, r.unit_id or 0, r.address, r.count) for r in requests)
    assert keys == [("north", 0, 0, 4), ("north", 2, 2, 1), ("south", 0, 1, 1)]


def test_planner_per_device_limits(tmp_path: Path) -> None:
    tags = "".join(
        f'[[plc.tags]]\nname = "{device}{i}"\ngroup = "fast"\ntable = "holding_register"\n'
        f'address = {i}\ndevice = "{device}"\n'
        for device in ("big", "small", "single") for i in range(32)
    )
    devices = (
        '[[plc.devices]]\nname = "big"\nhost = "10.0.0.1"\n'
        '[[plc.devices]]\nname = "small"\nhost = "10.0.0.2"\nmax_registers_per_read = 16\n'
        '[[plc.devices]]\nname = "single"\nhost = "10.0.0.3"\none_request_per_tag = true\n'
    )
    path = tmp_path / "plcbridge.toml"
    path.write_text(base_config(plc_keys="", tags=devices + tags))
    config = load_config(path)

    plans = plan_device_requests(config.plc.tags, config.plc.devices)

    assert spans(plans["big"]) == [(0, 32)]
    assert spans(plans["small"]) == [(0, 16), (16, 16)]
    assert len(plans["single"]) == 32
    assert {r.device for r in plans["small"]} == {"small"}


def test_planner_keeps_caller_tags() -> None:
    tags = [tag("b", 5), tag("a", 0)]
    copy = [dataclasses.replace(t) for t in tags]

    plan_requests(tags, 125, 8)

    assert tags == copy
