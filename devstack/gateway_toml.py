"""Gateway configuration text for tests and benchmarks, built from tables of keys.

Each table is a mapping of keys to values, or raw TOML key lines for what a caller already
has as text, or a list of both. The tables come out in the order that devstack/demo.toml
uses, with [credentials] last, so a caller may append more [credentials] keys to the text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

Keys = Mapping[str, object]
Table = Keys | str | Sequence[Keys | str]

LOOPBACK_PLC: Keys = {"host": "127.0.0.1"}
FAST_GROUP: Keys = {"name": "fast", "poll_interval_ms": 100}
COUNTER_TAG: Keys = {
    "name": "line1.counter", "group": "fast", "table": "holding_register", "address": 0,
}

# The tags of the register map that devstack/plc_simulator.py serves, by name.
SIMULATOR_TAGS: dict[str, Keys] = {
    "line1.counter": {**COUNTER_TAG, "type": "uint32"},
    "line1.sine": {"name": "line1.sine", "group": "fast", "table": "holding_register",
                   "address": 2, "type": "float32"},
    "line1.check": {"name": "line1.check", "group": "fast", "table": "holding_register",
                    "address": 4, "type": "uint16"},
    "line1.running": {"name": "line1.running", "group": "fast", "table": "coil", "address": 0},
    "line1.stopped": {"name": "line1.stopped", "group": "slow", "table": "discrete_input",
                      "address": 0},
    "line1.temperature_c": {"name": "line1.temperature_c", "group": "slow",
                            "table": "input_register", "address": 0, "type": "int16",
                            "scale": 0.1},
    "plc.serial_number": {"name": "plc.serial_number", "group": "slow",
                          "table": "input_register", "address": 10, "type": "uint32"},
}


def simulator_tags(*names: str) -> list[Keys]:
    """Return the simulator's tags of these names, in this order."""
    return [SIMULATOR_TAGS[name] for name in names]


def bench_plc_tables(ports: Sequence[int], tags_per_plc: int,
                     group: str) -> tuple[list[Keys], list[Keys]]:
    """Return [[plc.devices]] entries for PLC simulators on these loopback ports, and their
    tags: the first tags_per_plc bench registers of each, from holding register 100, read
    as uint16 in group. Start each simulator with --bench-registers tags_per_plc or more."""
    devices: list[Keys] = [{"name": f"plc{n}", "host": "127.0.0.1", "port": port}
                           for n, port in enumerate(ports)]
    tags: list[Keys] = [{"name": f"plc{n}.r{i:04d}", "device": f"plc{n}", "group": group,
                         "table": "holding_register", "address": 100 + i}
                        for n in range(len(ports)) for i in range(tags_per_plc)]
    return devices, tags


def toml_value(value: object) -> str:
    """Render one value as TOML, with json.dumps.

    JSON's strings, integers, finite floats, booleans and arrays are valid TOML as written.
    NaN and infinities are not, and no configuration key here takes them.
    """
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value)


def toml_keys(table: Table) -> str:
    """Render the key lines of one table, without its header."""
    if isinstance(table, str):
        return table.strip("\n")
    if isinstance(table, Mapping):
        return "\n".join(f"{key} = {toml_value(value)}" for key, value in table.items())
    return "\n".join(filter(None, (toml_keys(part) for part in table)))


def toml_table(header: str, table: Table) -> str:
    body = toml_keys(table)
    return f"[{header}]\n{body}\n" if body else f"[{header}]\n"


def gateway_dirs(base: Path | str) -> dict[str, str]:
    """Return the [gateway] folders below base: state, run and log."""
    return {"state_dir": f"{base}/state", "runtime_dir": f"{base}/run", "log_dir": f"{base}/log"}


def gateway_toml(
    *,
    gateway: Table,
    uplink: Table,
    credentials: Table,
    plc: Table = LOOPBACK_PLC,
    devices: Sequence[Keys] = (),
    tag_groups: Sequence[Keys] = (FAST_GROUP,),
    tags: Sequence[Keys] | str = (COUNTER_TAG,),
    buffer: Table | None = None,
    broker: Table | None = None,
) -> str:
    """Return a whole configuration file. tags may also be raw [[plc.tags]] text."""
    tables = [toml_table("gateway", gateway), toml_table("plc", plc)]
    tables += [toml_table("[plc.devices]", device) for device in devices]
    tables += [toml_table("[plc.tag_groups]", group) for group in tag_groups]
    if isinstance(tags, str):
        tables += [tags.strip("\n") + "\n"] if tags.strip() else []
    else:
        tables += [toml_table("[plc.tags]", tag) for tag in tags]
    if buffer is not None:
        tables.append(toml_table("buffer", buffer))
    tables.append(toml_table("uplink", uplink))
    if broker is not None:
        tables.append(toml_table("uplink.broker", broker))
    tables.append(toml_table("credentials", credentials))
    return "\n" + "\n".join(tables)
