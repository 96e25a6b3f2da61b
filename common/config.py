"""The gateway configuration: one TOML file parsed once into frozen, typed objects.

Every key is documented in docs/configuration.md. Unknown keys, wrong types and bad values
raise ConfigError with a message that names the file, the key, the value and what is
expected. Relative paths are resolved against the configuration file's folder.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import string
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import wire
from common.credentials import DEVICE_ID_PATTERN
from common.dps_keys import REGISTRATION_ID_RULE, registration_id_problem
from common.errors import ConfigError

# Modbus allows at most 125 holding or input registers, and 2,000 coils, in one read.
MAX_REGISTERS_PER_READ = 125
MAX_BITS_PER_READ = 2000

# Azure IoT Hub rejects device-to-cloud messages above 256 KB.
MAX_PAGE_BYTES = 262_144

# A real configuration is a few kilobytes, even with thousands of tags. The bound keeps a
# wrong --config, such as /dev/zero, from filling memory.
MAX_CONFIG_BYTES = 16 * 1024 * 1024

# Linux's sockaddr_un has 108 bytes for the path, the terminating NUL included.
MAX_UNIX_SOCKET_PATH_BYTES = 107

# MQTT 3.1.1 encodes a topic name with a 16-bit length, and a topic name that a client
# publishes to must not contain the wildcards + and # or the NUL character.
MAX_TOPIC_BYTES = 65_535
TOPIC_FORBIDDEN = ("+", "#", "\0")
TOPIC_FIELDS = ("client_id", "page_seq")
EVENT_TOPIC_FIELDS = ("client_id", "kind")

# The kinds of message that the uplink sends to the event topic, and the longest of them.
EVENT_KINDS = ("alert", "health", "command-result")
LONGEST_EVENT_KIND = "command-result"

# The buffer stores page_seq as an unsigned 64-bit key, so this sample has the most digits.
SAMPLE_PAGE_SEQ = 2**64 - 1

# Error messages show at most this many characters of a bad value.
MAX_SHOWN_VALUE_CHARS = 200

TABLES = ("holding_register", "input_register", "coil", "discrete_input")
BIT_TABLES = ("coil", "discrete_input")
WRITABLE_TABLES = ("holding_register", "coil")

# Number of 16-bit registers that each value type occupies.
REGISTER_COUNT = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
# A string's register count follows from its length in bytes, two bytes a register.
STRING_TYPE = "string"
VALUE_TYPES = (*REGISTER_COUNT, STRING_TYPE)
MAX_STRING_BYTES = 2 * MAX_REGISTERS_PER_READ
WORD_ORDERS = ("big", "little")

# Byte orders named after the bytes of the big-endian value, A the most significant:
# (word order, whether the two bytes of each register are swapped). word_order "big" is
# ABCD and "little" is CDAB. A 64-bit value may use the 4-letter names, which describe the
# same word reversal and byte swap, or the 8-letter ones.
BYTE_ORDERS = {
    "AB": ("big", False),
    "BA": ("big", True),
    "ABCD": ("big", False),
    "CDAB": ("little", False),
    "BADC": ("big", True),
    "DCBA": ("little", True),
    "ABCDEFGH": ("big", False),
    "GHEFCDAB": ("little", False),
    "BADCFEHG": ("big", True),
    "HGFEDCBA": ("little", True),
}
ORDERS_BY_REGISTERS = {
    1: ("AB", "BA"),
    2: ("ABCD", "CDAB", "BADC", "DCBA"),
    4: ("ABCD", "CDAB", "BADC", "DCBA", "ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA"),
}
STRING_PADDINGS = ("nul", "space", "none")
TRANSPORTS = ("tcp", "rtu", "rtu_over_tcp")
PARITIES = ("N", "E", "O")
DEFAULT_DEVICE = "plc"
UPLINK_MODES = ("azure", "mqtt")
SYNC_MODES = ("full", "nometasync", "off")
OVERFLOW_POLICIES = ("drop-oldest", "reject-new")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ATTESTATIONS = ("symmetric_key", "x509")
REGISTRATION_ID_SOURCES = ("config", "plc_serial", "mac")
PAYLOAD_VALUE_TYPES = (str, int, float, bool)


@dataclass(frozen=True)
class GatewaySettings:
    state_dir: Path
    runtime_dir: Path
    log_dir: Path
    log_level: str


@dataclass(frozen=True)
class TagGroup:
    name: str
    poll_interval_ms: int


@dataclass(frozen=True)
class Tag:
    """One value read from a PLC. address is always the zero-based protocol address."""

    name: str
    group: str
    table: str
    address: int
    type: str
    word_order: str
    scale: float
    offset: float
    byte_swap: bool = False
    # Bit 0 is the least significant bit of the register; None reads the whole register.
    bit: int | None = None
    # Engineering unit, sent as the sample's "unit" field when not empty.
    unit: str = ""
    string_bytes: int = 0
    string_padding: str = "nul"
    device: str = DEFAULT_DEVICE
    # None means the unit id of the tag's device.
    unit_id: int | None = None
    deadband: float = 0.0
    deadband_percent: float = 0.0
    max_silence_s: float = 0.0
    # A cloud-to-device write may set the tag only when writable, within min and max value.
    writable: bool = False
    min_value: float | None = None
    max_value: float | None = None

    @property
    def register_count(self) -> int:
        """Number of protocol addresses the tag occupies: one for a bit table."""
        if self.table in BIT_TABLES:
            return 1
        if self.type == STRING_TYPE:
            return (self.string_bytes + 1) // 2
        return REGISTER_COUNT[self.type]


@dataclass(frozen=True)
class PlcDevice:
    """One Modbus connection: a TCP endpoint, a serial port, or a serial-to-Ethernet gateway."""

    name: str
    transport: str
    host: str
    port: int
    unit_id: int
    serial_port: str
    baudrate: int
    parity: str
    stop_bits: int
    byte_size: int
    timeout_s: float
    max_registers_per_read: int
    max_gap_registers: int
    request_pause_ms: int
    one_request_per_tag: bool
    address_base: int
    # Send a write of one coil with function code 15 and of one register with 16, for
    # devices that implement only the multiple-write functions.
    multiple_write_functions_only: bool = False

    @property
    def endpoint(self) -> str:
        return self.serial_port if self.transport == "rtu" else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class IdentitySettings:
    """The registers of the PLC's serial number, which give its id YYMMNNNN, such as 22091017.

    Either serial_address names a uint32 (two registers, high word first) that already
    contains the id, or year_address, month_address and unit_address name three uint16
    registers: year 0-99 or 2000-2099, month 1-12, unit number 0-9999.
    """

    device: str
    table: str
    serial_address: int | None
    year_address: int | None
    month_address: int | None
    unit_address: int | None
    # The id is read again at every reconnect and every recheck_interval_s; 0 turns the
    # periodic read off and keeps the one at each reconnect.
    recheck_interval_s: float = 60.0


@dataclass(frozen=True)
class PlcSettings:
    # host, port and unit_id describe the default device, used when no [[plc.devices]] are
    # listed. host is "" when devices are listed and [plc] sets none.
    host: str
    port: int
    unit_id: int
    timeout_s: float
    reconnect_min_s: float
    reconnect_max_s: float
    max_registers_per_read: int
    max_gap_registers: int
    batch_max_samples: int
    queue_max_samples: int
    max_unacked_batches: int
    ack_timeout_s: float
    tag_groups: tuple[TagGroup, ...]
    tags: tuple[Tag, ...]
    devices: tuple[PlcDevice, ...] = ()
    identity: IdentitySettings | None = None

    def device(self, name: str) -> PlcDevice:
        for device in self.devices:
            if device.name == name:
                return device
        raise KeyError(name)


@dataclass(frozen=True)
class BufferSettings:
    max_bytes: int
    page_max_samples: int
    page_max_bytes: int
    page_max_age_ms: int
    commit_max_batches: int
    sync: str = "full"  # one of SYNC_MODES
    commit_max_delay_ms: int = 0
    overflow_policy: str = "drop-oldest"  # one of OVERFLOW_POLICIES
    max_age_s: float = 0.0  # 0 means no age limit


@dataclass(frozen=True)
class BrokerSettings:
    """Connection settings of the generic MQTT mode, for brokers other than Azure IoT Hub."""

    host: str
    client_id: str
    username: str
    topic_template: str
    tls: bool
    # Topic filter of cloud-to-device commands; None subscribes to nothing.
    command_topic: str | None = None
    # Topic of alerts, health reports and command results, with {kind}; None sends none.
    event_topic: str | None = None


@dataclass(frozen=True)
class UplinkSettings:
    mode: str
    port: int
    keepalive_s: int
    connect_timeout_s: float
    reconnect_min_s: float
    reconnect_max_s: float
    max_inflight_pages: int
    sas_ttl_s: int
    api_version: str
    date_port: int
    shutdown_timeout_s: float
    broker: BrokerSettings | None
    # How long a write_tag command waits for the reader's result before it reports timeout.
    write_timeout_s: float = 10.0


@dataclass(frozen=True)
class TokenServerSettings:
    """The on-site token server that issues the gateway's SAS tokens, so no key rests here.

    The gateway proves its identity with client_cert_file and client_key_file, or with
    serial and secret_file through a challenge. hub_host_name and device_id name the
    identity that the tokens must be signed for.
    """

    url: str
    host: str
    port: int
    ca_file: Path
    hub_host_name: str
    device_id: str
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    serial: str | None = None
    secret_file: Path | None = None
    timeout_s: float = 10.0

    @property
    def files(self) -> tuple[Path, ...]:
        files = (self.ca_file, self.client_cert_file, self.client_key_file, self.secret_file)
        return tuple(path for path in files if path is not None)


@dataclass(frozen=True)
class CredentialSettings:
    connection_string_file: Path | None
    ca_file: Path
    client_cert_file: Path | None
    client_key_file: Path | None
    password_file: Path | None
    check_interval_s: float
    rehash_interval_s: float
    sas_warning_days: float
    certificate_warning_days: float = 30.0
    expiry_error_margin_s: float = 300.0
    client_key_passphrase_file: Path | None = None
    token_server: TokenServerSettings | None = None
    # Whether the uplink goes back to the last credential set that connected when the hub
    # rejects a new one; see common/last_good_credentials.py.
    fallback_to_last_good: bool = True
    settle_s: float = 0.2
    # Hosts that a rotated connection string may name; empty means the hosts of the
    # connection string configured when the rotation is checked.
    allowed_hosts: tuple[str, ...] = ()
    accept_pushed_ca_bundle: bool = False

    def watched_files(self) -> tuple[Path, ...]:
        """List every credential file the uplink reads, in a fixed order."""
        files = (
            self.connection_string_file,
            self.ca_file,
            self.client_cert_file,
            self.client_key_file,
            self.client_key_passphrase_file,
            self.password_file,
        )
        token_files = self.token_server.files if self.token_server is not None else ()
        return tuple(path for path in files if path is not None) + token_files


@dataclass(frozen=True)
class SupervisorSettings:
    group: str
    uplink_program: str


@dataclass(frozen=True)
class AlertSettings:
    """Thresholds of the health alerts that the uplink raises; see common/alerts.py."""

    no_publish_s: float = 300.0
    buffer_fill_percent: float = 80.0
    drops_clear_s: float = 600.0
    plc_unreachable_s: float = 60.0
    restart_loop_count: int = 3
    restart_loop_window_s: float = 600.0
    health_interval_s: float = 900.0


@dataclass(frozen=True)
class MetricsSettings:
    """The uplink's optional Prometheus endpoint; port 0 turns it off."""

    port: int = 0
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class ProvisioningSettings:
    """Azure IoT Hub Device Provisioning Service (DPS): how the gateway gets its hub.

    docs/provisioning.md describes the registration id rule and the first boot.
    """

    id_scope: str
    global_endpoint: str
    port: int
    attestation: str  # one of ATTESTATIONS
    group_key_file: Path | None
    device_key_file: Path | None
    registration_id: str | None
    registration_id_from: str  # one of REGISTRATION_ID_SOURCES
    registration_id_prefix: str
    mac_interface: str | None
    # The custom payload sent with the register request, as JSON text; None sends null.
    payload_json: str | None
    payload_plc_serial: bool
    api_version: str
    request_timeout_s: float
    retry_min_s: float
    retry_max_s: float
    sas_ttl_s: int


@dataclass(frozen=True)
class Config:
    path: Path
    gateway: GatewaySettings
    plc: PlcSettings
    buffer: BufferSettings
    uplink: UplinkSettings
    credentials: CredentialSettings
    supervisor: SupervisorSettings
    alerts: AlertSettings = field(default_factory=AlertSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    provisioning: ProvisioningSettings | None = None
    # The TOML text that was parsed, without a byte-order mark, for the last good copy.
    source_text: str = field(default="", repr=False, compare=False)

    @property
    def supervisor_socket(self) -> Path:
        """Unix socket of supervisord's XML-RPC interface; supervisord.conf puts it here."""
        return self.gateway.runtime_dir / "supervisord.sock"


class _Table:
    """Read one TOML table, remembering which keys were used so the rest can be rejected."""

    def __init__(self, source: Path, prefix: str, data: Any) -> None:
        self.source = source
        self.prefix = prefix
        if not isinstance(data, dict):
            raise self.error("", data, "a table")
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, value: Any, expected: str) -> ConfigError:
        where = self.key_path(key) if key else self.prefix or "top level"
        return ConfigError(
            f"{self.source}: invalid value for {where}: {_shown(value)}; expected {expected}"
        )

    def get(self, key: str, kinds: type | tuple[type, ...], default: Any, expected: str) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise ConfigError(
                    f"{self.source}: missing key {self.key_path(key)}; expected {expected}"
                )
            return default
        value = self.data[key]

        # TOML booleans are ints to isinstance(), so reject them where a number is expected.
        if isinstance(value, bool) and bool not in _as_tuple(kinds):
            raise self.error(key, value, expected)
        if not isinstance(value, kinds):
            raise self.error(key, value, expected)
        return value

    def text(self, key: str, default: Any = None, choices: tuple[str, ...] = ()) -> Any:
        expected = "one of " + ", ".join(choices) if choices else "a non-empty string"
        value = self.get(key, str, default, expected)
        if value is None or value is default:
            return value
        if not value or (choices and value not in choices):
            raise self.error(key, value, expected)
        return value

    def integer(self, key: str, default: Any, low: int, high: int) -> Any:
        expected = f"an integer from {low} to {high}"
        value = self.get(key, int, default, expected)
        if not low <= value <= high:
            raise self.error(key, value, expected)
        return value

    def number(self, key: str, default: Any, low: float, high: float) -> float:
        expected = f"a number from {low:g} to {high:g}"
        value = self.get(key, (int, float), default, expected)
        if not math.isfinite(value) or not low <= value <= high:
            raise self.error(key, value, expected)
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value: bool = self.get(key, bool, default, "true or false")
        return value

    def host_names(self, key: str) -> tuple[str, ...]:
        """Read an optional array of host names, lowercased, as DNS compares them."""
        expected = "an array of host names without spaces, such as [\"myhub.azure-devices.net\"]"
        values = self.get(key, list, [], expected)
        for value in values:
            if not isinstance(value, str) or not value or any(c.isspace() for c in value):
                raise self.error(key, values, expected)
        return tuple(value.lower() for value in values)

    def path(self, key: str, default: Any = None) -> Path | None:
        value = self.text(key, default)
        if value is None:
            return None
        resolved = Path(value)
        if resolved.is_absolute():
            return resolved
        try:
            return (self.source.parent / resolved).resolve()
        except (OSError, RuntimeError) as exc:
            # Python 3.11 raises RuntimeError for a symlink loop, newer versions OSError.
            raise self.error(key, value, f"a path that can be resolved ({exc})") from exc

    def table(self, key: str, required: bool = False) -> _Table:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise ConfigError(f"{self.source}: missing table [{self.key_path(key)}]")
            return _Table(self.source, self.key_path(key), {})
        return _Table(self.source, self.key_path(key), self.data[key])

    def array_of_tables(self, key: str) -> list[_Table]:
        self.used.add(key)
        items = self.data.get(key, [])
        if not isinstance(items, list):
            raise self.error(key, items, f"an array of tables, written [[{self.key_path(key)}]]")
        return [
            _Table(self.source, f"{self.key_path(key)}[{i}]", item) for i, item in enumerate(items)
        ]

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            names = ", ".join(self.key_path(key) for key in unknown)
            raise ConfigError(
                f"{self.source}: unknown key {names}; check the spelling against "
                "docs/configuration.md"
            )


_REQUIRED = object()


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _shown(value: Any) -> str:
    """Return repr(value), shortened so that an error message stays one readable line."""
    try:
        text = repr(value)
    except RecursionError:
        return "<a value nested too deeply to show>"
    if len(text) > MAX_SHOWN_VALUE_CHARS:
        return text[:MAX_SHOWN_VALUE_CHARS] + f"... ({len(text)} characters)"
    return text


def config_source(path: str | Path) -> Path:
    """Return the absolute path that load_config reads path from, without following symlinks.

    Sites deploy configurations as releases behind a symlink. Keeping the link's path means
    a restarted program reads whatever the link points to now, and the last good copy and
    relative paths stay next to the link when it is switched.
    """
    return Path(os.path.abspath(path))


def read_config_text(source: Path) -> str:
    """Read a TOML file as text, without a byte-order mark; raise ConfigError naming it."""
    try:
        with source.open("rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"{source}: configuration file not found") from exc
    except PermissionError as exc:
        raise ConfigError(
            f"{source}: configuration file not readable by this user; check its permissions"
        ) from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{source}: is a folder; expected a TOML file") from exc
    except OSError as exc:
        # For example a symlink loop, a name too long, or /proc/self/mem (EIO).
        raise ConfigError(
            f"{source}: cannot read the configuration file: {exc.strerror or exc}; "
            "check the path given with --config"
        ) from exc

    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{source}: larger than {MAX_CONFIG_BYTES} bytes; expected a TOML configuration file"
        )

    # Windows editors start a UTF-8 file with a byte-order mark, which TOML does not allow.
    skipped = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skipped:].decode("utf-8")
    except UnicodeDecodeError as exc:
        # TOML requires UTF-8, so a file saved in a legacy code page, such as Windows-1252, fails.
        raise ConfigError(
            f"{source}: not UTF-8 text at byte {exc.start + skipped}; save the file as UTF-8"
        ) from exc


def load_config(path: str | Path, text: str | None = None) -> Config:
    """Read and validate the configuration file; raise ConfigError naming the bad key.

    With text, parse that instead of the file's content, as if the file contained it:
    relative paths are resolved against path's folder, and errors name path.
    """
    source = config_source(path)
    if text is None:
        text = read_config_text(source)
    text = text.removeprefix("\ufeff")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    except RecursionError as exc:
        # tomllib parses nested arrays and inline tables recursively, about 500 levels deep.
        raise ConfigError(
            f"{source}: not valid TOML: arrays or inline tables nested too deeply"
        ) from exc

    top = _Table(source, "", data)
    config = Config(
        path=source,
        gateway=_parse_gateway(top.table("gateway")),
        plc=_parse_plc(top.table("plc", required=True)),
        buffer=_parse_buffer(top.table("buffer")),
        uplink=_parse_uplink(top.table("uplink", required=True)),
        credentials=_parse_credentials(top.table("credentials", required=True)),
        supervisor=_parse_supervisor(top.table("supervisor")),
        alerts=_parse_alerts(top.table("alerts")),
        metrics=_parse_metrics(top.table("metrics")),
        provisioning=_parse_provisioning(top),
        source_text=text,
    )
    top.reject_unknown()
    _check_cross_references(source, config)
    return config


def _parse_gateway(table: _Table) -> GatewaySettings:
    settings = GatewaySettings(
        state_dir=table.path("state_dir", "var/state"),  # type: ignore[arg-type]
        runtime_dir=table.path("runtime_dir", "var/run"),  # type: ignore[arg-type]
        log_dir=table.path("log_dir", "var/log"),  # type: ignore[arg-type]
        log_level=table.text("log_level", "INFO", LOG_LEVELS),
    )
    table.reject_unknown()

    longest = _longest_socket_name()
    max_bytes = MAX_UNIX_SOCKET_PATH_BYTES - len(os.fsencode(f"/{longest}"))
    if len(os.fsencode(settings.runtime_dir)) > max_bytes:
        raise table.error(
            "runtime_dir", str(settings.runtime_dir),
            f"a path of at most {max_bytes} bytes, so that its longest socket, {longest}, "
            f"fits in the {MAX_UNIX_SOCKET_PATH_BYTES}-byte limit of a Unix socket path",
        )
    return settings


def _longest_socket_name() -> str:
    """Return the file name of the longest Unix socket that the gateway opens in runtime_dir."""
    folder = Path("/runtime")
    endpoints = [wire.endpoint(folder, wire.INGEST), wire.endpoint(folder, wire.DELIVERY)]
    endpoints.extend(wire.tap_endpoint(folder, process) for process in wire.PROCESS_NAMES)
    names = [endpoint.removeprefix(f"ipc://{folder}/") for endpoint in endpoints]

    # supervisord's control socket is not a ZeroMQ endpoint; Config.supervisor_socket names it.
    names.append("supervisord.sock")
    return max(names, key=lambda name: len(os.fsencode(name)))


# Built-in defaults of every device key. 19200 baud, even parity and one stop bit (8E1) is a
# common factory setting of Modbus RTU devices.
_BUILTIN_DEVICE = PlcDevice(
    name=DEFAULT_DEVICE,
    transport="tcp",
    host="",
    port=502,
    unit_id=1,
    serial_port="",
    baudrate=19200,
    parity="E",
    stop_bits=1,
    byte_size=8,
    timeout_s=1.0,
    max_registers_per_read=MAX_REGISTERS_PER_READ,
    max_gap_registers=8,
    request_pause_ms=0,
    one_request_per_tag=False,
    address_base=0,
)


def _parse_plc(table: _Table) -> PlcSettings:
    # The connection keys of [plc] describe the default device, used when [[plc.devices]]
    # lists none, and are the defaults of every listed device.
    device_tables = table.array_of_tables("devices")
    default_device = _parse_device(table, _BUILTIN_DEVICE, DEFAULT_DEVICE, not device_tables)
    listed = [
        (item, _parse_device(item, default_device, item.text("name", _REQUIRED), True))
        for item in device_tables
    ]
    device_sources = listed or [(table, default_device)]
    devices = tuple(device for _item, device in device_sources)
    _check_unique(table, "devices", [device.name for device in devices])

    groups = tuple(_parse_group(item) for item in table.array_of_tables("tag_groups"))
    tags = tuple(_parse_tag(item, devices) for item in table.array_of_tables("tags"))
    identity_table = table.table("identity")
    identity = _parse_identity(identity_table, devices) if identity_table.data else None
    settings = PlcSettings(
        host=default_device.host,
        port=default_device.port,
        unit_id=default_device.unit_id,
        timeout_s=default_device.timeout_s,
        reconnect_min_s=table.number("reconnect_min_s", 0.5, 0.05, 60.0),
        reconnect_max_s=table.number("reconnect_max_s", 30.0, 0.05, 3600.0),
        max_registers_per_read=default_device.max_registers_per_read,
        max_gap_registers=default_device.max_gap_registers,
        batch_max_samples=table.integer("batch_max_samples", 2000, 1, 100_000),
        queue_max_samples=table.integer("queue_max_samples", 200_000, 1, 100_000_000),
        max_unacked_batches=table.integer("max_unacked_batches", 16, 1, 1000),
        ack_timeout_s=table.number("ack_timeout_s", 2.0, 0.1, 600.0),
        tag_groups=groups,
        tags=tags,
        devices=devices,
        identity=identity,
    )
    table.reject_unknown()

    if settings.reconnect_max_s < settings.reconnect_min_s:
        raise table.error(
            "reconnect_max_s", settings.reconnect_max_s, "a value not below plc.reconnect_min_s"
        )
    if not groups:
        raise ConfigError(f"{table.source}: missing [[plc.tag_groups]]; define at least one")
    if not tags:
        raise ConfigError(f"{table.source}: missing [[plc.tags]]; define at least one")
    for device_table, device in device_sources:
        _check_tags_fit_one_read(device_table, device, settings.tags)
    return settings


def parse_plc_table(source: str, data: dict[str, Any]) -> PlcSettings:
    """Validate a [plc] table given as a dict, for example one built from command-line options.

    Errors name source in place of a file, and the keys as a configuration file would.
    """
    return _parse_plc(_Table(Path(source), "plc", data))


def _parse_device(
    table: _Table, base: PlcDevice, name: str, connection_required: bool
) -> PlcDevice:
    """Read the connection keys of [plc] or of one [[plc.devices]], defaulting to base's."""
    transport = table.text("transport", base.transport, TRANSPORTS)
    serial = transport == "rtu"
    host_default = _REQUIRED if connection_required and not serial and not base.host else base.host
    port_default = _REQUIRED if connection_required and serial and not base.serial_port else (
        base.serial_port
    )
    device = PlcDevice(
        name=name,
        transport=transport,
        host=table.text("host", host_default),
        port=table.integer("port", base.port, 1, 65535),
        unit_id=table.integer("unit_id", base.unit_id, 0, 255),
        serial_port=table.text("serial_port", port_default),
        baudrate=table.integer("baudrate", base.baudrate, 50, 4_000_000),
        parity=table.text("parity", base.parity, PARITIES),
        stop_bits=table.integer("stop_bits", base.stop_bits, 1, 2),
        byte_size=table.integer("byte_size", base.byte_size, 7, 8),
        timeout_s=table.number("timeout_s", base.timeout_s, 0.05, 60.0),
        max_registers_per_read=table.integer(
            "max_registers_per_read", base.max_registers_per_read, 1, MAX_REGISTERS_PER_READ
        ),
        max_gap_registers=table.integer(
            "max_gap_registers", base.max_gap_registers, 0, MAX_REGISTERS_PER_READ
        ),
        request_pause_ms=table.integer("request_pause_ms", base.request_pause_ms, 0, 60_000),
        one_request_per_tag=table.flag("one_request_per_tag", base.one_request_per_tag),
        address_base=table.integer("address_base", base.address_base, 0, 1),
        multiple_write_functions_only=table.flag(
            "multiple_write_functions_only", base.multiple_write_functions_only
        ),
    )
    if table.prefix != "plc":
        table.reject_unknown()
    return device


def _check_unique(table: _Table, key: str, names: list[str]) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{table.source}: duplicate name {duplicates[0]!r} in plc.{key}")


def _check_tags_fit_one_read(table: _Table, device: PlcDevice, tags: tuple[Tag, ...]) -> None:
    # The reader never splits one value across two requests, so each register tag must
    # fit in the largest request. Bit tables take one bit per tag and always fit.
    limit = device.max_registers_per_read
    for index, tag in enumerate(tags):
        if tag.device != device.name or tag.table in BIT_TABLES or tag.register_count <= limit:
            continue
        raise table.error(
            "max_registers_per_read", limit,
            f"at least {tag.register_count}, because plc.tags[{index}] {tag.name!r} of type "
            f"{tag.type} needs {tag.register_count} registers in one read",
        )


def _parse_group(table: _Table) -> TagGroup:
    group = TagGroup(
        name=table.text("name", _REQUIRED),
        poll_interval_ms=table.integer("poll_interval_ms", _REQUIRED, 1, 86_400_000),
    )
    table.reject_unknown()
    return group


def _parse_tag(table: _Table, devices: tuple[PlcDevice, ...]) -> Tag:
    tag_table = table.text("table", _REQUIRED, TABLES)
    value_type = table.text("type", "bool" if tag_table in BIT_TABLES else "uint16",
                            VALUE_TYPES)
    device = _tag_device(table, devices)

    # address_base 1 shifts the addresses of a 1-based register map onto the protocol's 0.
    base = device.address_base
    first = table.integer("address", _REQUIRED, base, 65535 + base)
    word_order, byte_swap = _tag_order(table, tag_table, value_type)
    string_bytes = _optional_integer(table, "length_bytes", 1, MAX_STRING_BYTES)
    tag = Tag(
        name=table.text("name", _REQUIRED),
        group=table.text("group", _REQUIRED),
        table=tag_table,
        address=first - base,
        type=value_type,
        word_order=word_order,
        scale=table.number("scale", 1.0, -1e300, 1e300),
        offset=table.number("offset", 0.0, -1e300, 1e300),
        byte_swap=byte_swap,
        bit=_optional_integer(table, "bit", 0, 15),
        unit=table.text("unit", ""),
        string_bytes=string_bytes or 0,
        string_padding=table.text("padding", "nul", STRING_PADDINGS),
        device=device.name,
        unit_id=_optional_integer(table, "unit_id", 0, 255),
        deadband=table.number("deadband", 0.0, 0.0, 1e300),
        deadband_percent=table.number("deadband_percent", 0.0, 0.0, 100.0),
        max_silence_s=table.number("max_silence_s", 60.0, 0.001, 86_400.0),
        writable=table.flag("writable", False),
        min_value=_optional_number(table, "min_value"),
        max_value=_optional_number(table, "max_value"),
    )
    table.reject_unknown()
    _check_tag(table, tag, first)
    _check_writable(table, tag)
    return tag


def _parse_identity(table: _Table, devices: tuple[PlcDevice, ...]) -> IdentitySettings:
    device = _tag_device(table, devices)
    base = device.address_base
    addresses = {
        key: _optional_integer(table, key, base, 65535 + base)
        for key in ("serial_address", "year_address", "month_address", "unit_address")
    }
    shifted = {key: None if value is None else value - base for key, value in addresses.items()}
    identity = IdentitySettings(
        device=device.name,
        table=table.text("table", "input_register", ("holding_register", "input_register")),
        **shifted,
        recheck_interval_s=table.number("recheck_interval_s", 60.0, 0.0, 86400.0),
    )
    table.reject_unknown()
    # Below a second the reads would crowd the PLC's tag polls for no gain.
    if 0 < identity.recheck_interval_s < 1:
        raise table.error("recheck_interval_s", identity.recheck_interval_s,
                          "0, or a number from 1 to 86400")

    parts = [identity.year_address, identity.month_address, identity.unit_address]
    if identity.serial_address is None and None in parts:
        raise table.error("serial_address", None, "serial_address, or all three of "
                          "year_address, month_address and unit_address")
    if identity.serial_address is not None and parts != [None, None, None]:
        raise table.error("serial_address", addresses["serial_address"],
                          "either serial_address or the three part addresses, not both")
    return identity


def _tag_device(table: _Table, devices: tuple[PlcDevice, ...]) -> PlcDevice:
    names = [device.name for device in devices]
    expected = "one of the device names " + ", ".join(names)
    default = devices[0].name if len(devices) == 1 else _REQUIRED
    name = table.get("device", str, default, expected)
    for device in devices:
        if device.name == name:
            return device
    raise table.error("device", name, expected)


def _tag_order(table: _Table, tag_table: str, value_type: str) -> tuple[str, bool]:
    """Return (word order, byte swap) from the tag's order key or its older word_order key."""
    order = table.get("order", str, None, "a byte order such as ABCD")
    word_order = table.text("word_order", None, WORD_ORDERS)
    if order is None:
        return word_order or "big", False
    if word_order is not None:
        raise table.error("word_order", word_order, "no word_order when order is set")

    if tag_table in BIT_TABLES:
        allowed: tuple[str, ...] = ()
    elif value_type == STRING_TYPE:
        allowed = ORDERS_BY_REGISTERS[1]
    else:
        allowed = ORDERS_BY_REGISTERS[REGISTER_COUNT[value_type]]
    if order not in allowed:
        expected = f"one of {', '.join(allowed)} for type {value_type}" if allowed else (
            f"no order, because a {tag_table} contains one bit"
        )
        raise table.error("order", order, expected)
    return BYTE_ORDERS[order]


def _optional_integer(table: _Table, key: str, low: int, high: int) -> int | None:
    if key not in table.data:
        table.used.add(key)
        return None
    value: int = table.integer(key, _REQUIRED, low, high)
    return value


def _optional_number(table: _Table, key: str) -> float | None:
    if key not in table.data:
        table.used.add(key)
        return None
    return table.number(key, _REQUIRED, -1e300, 1e300)


def _check_writable(table: _Table, tag: Tag) -> None:
    limits = tag.min_value is not None or tag.max_value is not None
    if limits and not tag.writable:
        raise table.error("writable", False, "true when min_value or max_value is set")
    if not tag.writable:
        return
    if tag.table not in WRITABLE_TABLES:
        raise table.error("writable", True, f"false, because a {tag.table} is read-only; "
                          "only holding_register and coil tags can be written")
    if limits and tag.type in ("bool", STRING_TYPE):
        key = "min_value" if tag.min_value is not None else "max_value"
        raise table.error(key, getattr(tag, key),
                          f"no limit on a {tag.type} tag, whose values are not numbers")
    if limits and tag.min_value is not None and tag.max_value is not None \
            and tag.min_value > tag.max_value:
        raise table.error("min_value", tag.min_value, f"at most max_value {tag.max_value:g}")


def _check_tag(table: _Table, tag: Tag, configured_address: int) -> None:
    if tag.table in BIT_TABLES and tag.type != "bool":
        raise table.error("type", tag.type, f"bool, because a {tag.table} contains one bit")
    if tag.bit is not None and (tag.table in BIT_TABLES or tag.type != "bool"):
        raise table.error("bit", tag.bit, "no bit unless the tag is a bool on a register table")
    if (tag.type == STRING_TYPE) != (tag.string_bytes > 0):
        expected = "a length for a string tag" if tag.type == STRING_TYPE else (
            "no length_bytes unless the type is string"
        )
        raise table.error("length_bytes", tag.string_bytes or None, expected)
    if tag.deadband and tag.deadband_percent:
        raise table.error("deadband_percent", tag.deadband_percent,
                          "no deadband_percent when deadband is set; choose one")
    if (tag.deadband or tag.deadband_percent) and tag.type in ("bool", STRING_TYPE):
        raise table.error("deadband", tag.deadband or tag.deadband_percent,
                          f"no deadband on a {tag.type} tag, which is sent on every change")
    if tag.address + tag.register_count > 65536:
        raise table.error("address", configured_address,
                          "an address whose last register is 65535")


def _parse_buffer(table: _Table) -> BufferSettings:
    settings = BufferSettings(
        max_bytes=table.integer("max_bytes", 1 << 30, 1 << 20, 1 << 40),
        page_max_samples=table.integer("page_max_samples", 1000, 1, 100_000),
        page_max_bytes=table.integer("page_max_bytes", 65_536, 1024, MAX_PAGE_BYTES),
        page_max_age_ms=table.integer("page_max_age_ms", 1000, 1, 3_600_000),
        commit_max_batches=table.integer("commit_max_batches", 64, 1, 10_000),
        sync=_parse_sync(table),
        commit_max_delay_ms=table.integer("commit_max_delay_ms", 0, 0, 1000),
        overflow_policy=table.text("overflow_policy", "drop-oldest", OVERFLOW_POLICIES),
        max_age_s=table.number("max_age_s", 0.0, 0.0, 31_536_000.0),
    )
    table.reject_unknown()
    return settings


def _parse_sync(table: _Table) -> str:
    """Read buffer.sync, which also takes the booleans of older files: true is "full",
    false is "off"."""
    expected = "one of " + ", ".join(SYNC_MODES) + ", or true or false"
    value = table.get("sync", (str, bool), "full", expected)
    if isinstance(value, bool):
        return "full" if value else "off"
    if value not in SYNC_MODES:
        raise table.error("sync", value, expected)
    return str(value)


def _parse_uplink(table: _Table) -> UplinkSettings:
    mode = table.text("mode", "azure", UPLINK_MODES)
    broker_table = table.table("broker")
    broker = _parse_broker(broker_table) if mode == "mqtt" else None
    if mode == "azure" and broker_table.data:
        raise table.error("broker", broker_table.data, "no [uplink.broker] table in azure mode")

    settings = UplinkSettings(
        mode=mode,
        port=table.integer("port", 8883, 1, 65535),
        keepalive_s=table.integer("keepalive_s", 60, 5, 1177),
        connect_timeout_s=table.number("connect_timeout_s", 10.0, 0.1, 300.0),
        reconnect_min_s=table.number("reconnect_min_s", 1.0, 0.05, 600.0),
        reconnect_max_s=table.number("reconnect_max_s", 60.0, 0.05, 3600.0),
        max_inflight_pages=table.integer("max_inflight_pages", 20, 1, 1000),
        sas_ttl_s=table.integer("sas_ttl_s", 3600, 60, 365 * 86400),
        api_version=table.text("api_version", "2021-04-12"),
        date_port=table.integer("date_port", 443, 1, 65535),
        shutdown_timeout_s=table.number("shutdown_timeout_s", 3.0, 0.1, 60.0),
        broker=broker,
        write_timeout_s=table.number("write_timeout_s", 10.0, 0.1, 600.0),
    )
    table.reject_unknown()

    if settings.reconnect_max_s < settings.reconnect_min_s:
        raise table.error(
            "reconnect_max_s", settings.reconnect_max_s, "a value not below uplink.reconnect_min_s"
        )
    return settings


def _parse_broker(table: _Table) -> BrokerSettings:
    broker = BrokerSettings(
        host=table.text("host", _REQUIRED),
        client_id=table.text("client_id", _REQUIRED),
        username=table.text("username", ""),
        topic_template=table.text("topic_template", "plcbridge/{client_id}/pages"),
        tls=table.flag("tls", True),
        command_topic=table.text("command_topic"),
        event_topic=table.text("event_topic"),
    )
    table.reject_unknown()

    # The client id is usually part of the topic, and paho raises on every publish to a
    # topic with a wildcard, so the uplink would crash in a loop.
    problem = _topic_problem(broker.client_id)
    if problem:
        raise table.error("client_id", broker.client_id,
                          f"a client id that can be part of an MQTT topic, but {problem}")
    _check_topic_template(table, broker)
    _check_event_topic(table, broker)
    _check_command_topic(table, broker)
    return broker


def _check_event_topic(table: _Table, broker: BrokerSettings) -> None:
    template = broker.event_topic
    if template is None:
        if broker.command_topic is not None:
            raise table.error(
                "event_topic", None,
                "a topic when command_topic is set, because command results are published "
                "to it")
        return
    _check_placeholders(table, "event_topic", template, EVENT_TOPIC_FIELDS)
    _check_filled_topic(table, "event_topic", template,
                        {"client_id": broker.client_id, "kind": LONGEST_EVENT_KIND})


def _check_command_topic(table: _Table, broker: BrokerSettings) -> None:
    template = broker.command_topic
    if template is None:
        return
    _check_placeholders(table, "command_topic", template, ("client_id",))
    topic_filter = template.format(client_id=broker.client_id)
    problem = _topic_filter_problem(topic_filter)
    if problem:
        raise table.error(
            "command_topic", template,
            f"a valid MQTT topic filter when filled in with client_id {broker.client_id!r}, "
            f"but {problem}",
        )

    # The uplink would receive its own messages as commands: a result, which contains
    # command and request_id, would run its command again, and again.
    own_topics = [broker.topic_template.format(client_id=broker.client_id, page_seq=0)]
    if broker.event_topic is not None:
        own_topics += [broker.event_topic.format(client_id=broker.client_id, kind=kind)
                       for kind in EVENT_KINDS]
    for topic in own_topics:
        if _filter_matches(topic_filter, topic):
            raise table.error(
                "command_topic", template,
                f"a topic filter that does not match the uplink's own topic {topic!r}")


def _filter_matches(topic_filter: str, topic: str) -> bool:
    """Return whether an MQTT topic filter matches a topic name."""
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


def _check_placeholders(table: _Table, key: str, template: str, names: tuple[str, ...]) -> None:
    """Raise unless template's only placeholders are bare {name} fields from names."""
    allowed = "a topic whose only placeholders are the bare " + " and ".join(
        "{" + name + "}" for name in names)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise table.error(key, template, f"{allowed} ({exc})") from exc
    for _literal, name, spec, conversion in parsed:
        if name is not None and (name not in names or spec or conversion is not None):
            raise table.error(
                key, template,
                f"{allowed}, without conversion, attribute, index or format spec; "
                f"found {_format_field(name, conversion, spec)}",
            )


def _topic_filter_problem(text: str) -> str:
    """Return why text cannot be an MQTT topic filter, or "" when it can."""
    if "\0" in text:
        return "it contains NUL"
    levels = text.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return "# must be a whole level, and the last one"
        if "+" in level and level != "+":
            return "+ must be a whole level"
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_TOPIC_BYTES:
        return f"it is {size} bytes in UTF-8, above the MQTT limit of {MAX_TOPIC_BYTES}"
    return ""


def _check_topic_template(table: _Table, broker: BrokerSettings) -> None:
    template = broker.topic_template
    # A conversion, attribute, index or format spec would be evaluated in every process on
    # each page: {client_id.real} raises, and {page_seq:>99999999999} exhausts memory.
    _check_placeholders(table, "topic_template", template, TOPIC_FIELDS)
    _check_filled_topic(table, "topic_template", template,
                        {"client_id": broker.client_id, "page_seq": SAMPLE_PAGE_SEQ})


def _check_filled_topic(table: _Table, key: str, template: str, values: dict[str, Any]) -> None:
    """Raise unless template, filled in with values, is a valid MQTT topic name."""
    problem = _topic_problem(template.format(**values))
    if problem:
        shown = " and ".join(f"{name} {value!r}" for name, value in values.items())
        raise table.error(
            key, template,
            f"a valid MQTT topic name when filled in with {shown}, but {problem}",
        )


def _format_field(name: str, conversion: str | None, spec: str | None) -> str:
    """Rebuild a replacement field, such as {page_seq!r:>8}, as the template wrote it."""
    text = name
    if conversion:
        text += f"!{conversion}"
    if spec:
        text += f":{spec}"
    return "{" + text + "}"


def _topic_problem(text: str) -> str:
    """Return why text cannot be part of an MQTT topic name, or "" when it can."""
    forbidden = [char for char in TOPIC_FORBIDDEN if char in text]
    if forbidden:
        shown = " and ".join(repr(char) for char in forbidden)
        return f"it contains {shown}; MQTT topic names exclude the wildcards + and # and NUL"
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if size > MAX_TOPIC_BYTES:
        return f"it is {size} bytes in UTF-8, above the MQTT limit of {MAX_TOPIC_BYTES}"
    return ""


def _parse_credentials(table: _Table) -> CredentialSettings:
    settings = CredentialSettings(
        connection_string_file=table.path("connection_string_file"),
        ca_file=table.path("ca_file", _REQUIRED),  # type: ignore[arg-type]
        client_cert_file=table.path("client_cert_file"),
        client_key_file=table.path("client_key_file"),
        password_file=table.path("password_file"),
        check_interval_s=table.number("check_interval_s", 0.1, 0.05, 3600.0),
        rehash_interval_s=table.number("rehash_interval_s", 60.0, 1.0, 86400.0),
        sas_warning_days=table.number("sas_warning_days", 7.0, 0.0, 3650.0),
        certificate_warning_days=table.number("certificate_warning_days", 30.0, 0.0, 3650.0),
        expiry_error_margin_s=table.number("expiry_error_margin_s", 300.0, 0.0, 31_536_000.0),
        client_key_passphrase_file=table.path("client_key_passphrase_file"),
        token_server=_parse_token_server(table),
        fallback_to_last_good=table.flag("fallback_to_last_good", True),
        settle_s=table.number("settle_s", 0.2, 0.0, 3600.0),
        allowed_hosts=table.host_names("allowed_hosts"),
        accept_pushed_ca_bundle=table.flag("accept_pushed_ca_bundle", False),
    )
    table.reject_unknown()

    if settings.client_key_passphrase_file is not None and settings.client_key_file is None:
        raise ConfigError(
            f"{table.source}: credentials.client_key_passphrase_file is set without "
            "credentials.client_key_file; set the key file or remove the passphrase file"
        )

    if (settings.client_cert_file is None) != (settings.client_key_file is None):
        raise ConfigError(
            f"{table.source}: credentials.client_cert_file and credentials.client_key_file "
            "must be set together"
        )
    return settings


def _parse_token_server(credentials: _Table) -> TokenServerSettings | None:
    if "token_server" not in credentials.data:
        credentials.used.add("token_server")
        return None
    table = credentials.table("token_server")
    url = table.text("url", _REQUIRED)
    host, port = _https_endpoint(table, url)
    settings = TokenServerSettings(
        url=url,
        host=host,
        port=port,
        ca_file=table.path("ca_file", _REQUIRED),  # type: ignore[arg-type]
        hub_host_name=table.text("hub_host_name", _REQUIRED),
        device_id=_device_id(table),
        client_cert_file=table.path("client_cert_file"),
        client_key_file=table.path("client_key_file"),
        serial=table.text("serial"),
        secret_file=table.path("secret_file"),
        timeout_s=table.number("timeout_s", 10.0, 0.5, 120.0),
    )
    table.reject_unknown()

    prefix = f"{table.source}: credentials.token_server"
    if (settings.client_cert_file is None) != (settings.client_key_file is None):
        raise ConfigError(f"{prefix}.client_cert_file and client_key_file must be set together")
    if (settings.serial is None) != (settings.secret_file is None):
        raise ConfigError(f"{prefix}.serial and secret_file must be set together")
    certificate = settings.client_cert_file is not None
    challenge = settings.secret_file is not None
    if certificate == challenge:
        found = "not both" if certificate else "found neither"
        raise ConfigError(
            f"{prefix}: set either client_cert_file and client_key_file (client "
            f"certificate) or serial and secret_file (challenge), {found}"
        )
    return settings


def _device_id(table: _Table) -> str:
    device_id: str = table.text("device_id", _REQUIRED)
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise table.error("device_id", device_id, "an IoT Hub device id: up to 128 ASCII "
                          "letters, digits and - . % _ * ? ! ( ) , : = @ $ '")
    return device_id


def _https_endpoint(table: _Table, url: str) -> tuple[str, int]:
    """Split an https:// URL without a path into its host and port (443 by default)."""
    expected = ("an https:// URL with a host and an optional port, such as "
                "https://tokens.plant.local:8443")
    parsed = urllib.parse.urlsplit(url)
    try:
        port = parsed.port or 443
    except ValueError as exc:
        raise table.error("url", url, expected) from exc
    if parsed.scheme != "https" or not parsed.hostname or parsed.path not in ("", "/") \
            or parsed.query or parsed.fragment or parsed.username or parsed.password:
        raise table.error("url", url, expected)
    return parsed.hostname, port


def _parse_supervisor(table: _Table) -> SupervisorSettings:
    settings = SupervisorSettings(
        group=table.text("group", "plcbridge"),
        uplink_program=table.text("uplink_program", "uplink"),
    )
    table.reject_unknown()
    return settings


def _parse_alerts(table: _Table) -> AlertSettings:
    defaults = AlertSettings()
    settings = AlertSettings(
        no_publish_s=table.number("no_publish_s", defaults.no_publish_s, 1, 86_400),
        buffer_fill_percent=table.number("buffer_fill_percent", defaults.buffer_fill_percent,
                                         1, 100),
        drops_clear_s=table.number("drops_clear_s", defaults.drops_clear_s, 1, 86_400),
        plc_unreachable_s=table.number("plc_unreachable_s", defaults.plc_unreachable_s,
                                       1, 86_400),
        restart_loop_count=table.integer("restart_loop_count", defaults.restart_loop_count,
                                         2, 1000),
        restart_loop_window_s=table.number("restart_loop_window_s",
                                           defaults.restart_loop_window_s, 10, 86_400),
        # 0 turns the periodic health telemetry off.
        health_interval_s=table.number("health_interval_s", defaults.health_interval_s,
                                       0, 86_400),
    )
    table.reject_unknown()
    return settings


def _parse_metrics(table: _Table) -> MetricsSettings:
    settings = MetricsSettings(
        port=table.integer("port", 0, 0, 65_535),
        host=table.text("host", "127.0.0.1"),
    )
    table.reject_unknown()
    return settings


def _parse_provisioning(top: _Table) -> ProvisioningSettings | None:
    if "provisioning" not in top.data:
        top.used.add("provisioning")
        return None
    table = top.table("provisioning")
    registration_id = table.text("registration_id")
    settings = ProvisioningSettings(
        id_scope=table.text("id_scope", _REQUIRED),
        global_endpoint=table.text("global_endpoint", "global.azure-devices-provisioning.net"),
        port=table.integer("port", 8883, 1, 65535),
        attestation=table.text("attestation", "symmetric_key", ATTESTATIONS),
        group_key_file=table.path("group_key_file"),
        device_key_file=table.path("device_key_file"),
        registration_id=registration_id,
        registration_id_from=table.text("registration_id_from",
                                        "config" if registration_id else _REQUIRED,
                                        REGISTRATION_ID_SOURCES),
        registration_id_prefix=table.get("registration_id_prefix", str, "", "a string"),
        mac_interface=table.text("mac_interface"),
        payload_json=_payload_json(table),
        payload_plc_serial=table.flag("payload_plc_serial", False),
        api_version=table.text("api_version", "2019-03-31"),
        request_timeout_s=table.number("request_timeout_s", 30.0, 1.0, 600.0),
        retry_min_s=table.number("retry_min_s", 5.0, 0.1, 3600.0),
        retry_max_s=table.number("retry_max_s", 300.0, 0.1, 86_400.0),
        sas_ttl_s=table.integer("sas_ttl_s", 3600, 60, 86_400),
    )
    table.reject_unknown()
    _check_provisioning(table, settings)
    return settings


def _payload_json(table: _Table) -> str | None:
    payload = table.table("payload")
    if "payload" not in table.data:
        return None
    for key, value in payload.data.items():
        if isinstance(value, PAYLOAD_VALUE_TYPES) and not (
            isinstance(value, float) and not math.isfinite(value)
        ):
            continue
        raise payload.error(key, value, "a string, an integer, a finite number or a boolean")
    return json.dumps(payload.data, sort_keys=True)


def _check_provisioning(table: _Table, settings: ProvisioningSettings) -> None:
    """Check the rules between provisioning keys; raise ConfigError naming the key."""
    if settings.id_scope and "/" in settings.id_scope:
        raise table.error("id_scope", settings.id_scope, "an id scope without '/'")
    key_files = [name for name in ("group_key_file", "device_key_file")
                 if getattr(settings, name) is not None]
    if settings.attestation == "symmetric_key" and len(key_files) != 1:
        raise ConfigError(
            f"{table.source}: symmetric_key attestation needs exactly one of "
            "provisioning.group_key_file and provisioning.device_key_file, found "
            f"{', '.join(key_files) or 'none'}"
        )
    if settings.attestation == "x509" and key_files:
        raise ConfigError(f"{table.source}: provisioning.{key_files[0]} is set with x509 "
                          "attestation, which uses credentials.client_cert_file instead")

    source = settings.registration_id_from
    if source == "config" and settings.registration_id is None:
        raise ConfigError(f"{table.source}: missing key provisioning.registration_id; "
                          "registration_id_from = \"config\" takes the id from it")
    if source != "config" and settings.registration_id is not None:
        raise ConfigError(f"{table.source}: provisioning.registration_id is set with "
                          f"registration_id_from = {source!r}; remove one of the two")
    if settings.registration_id is not None:
        problem = registration_id_problem(settings.registration_id)
        if problem:
            raise table.error("registration_id", settings.registration_id,
                              f"{REGISTRATION_ID_RULE}, but {problem}")
    prefix = settings.registration_id_prefix
    if prefix and registration_id_problem(prefix):
        raise table.error("registration_id_prefix", prefix, REGISTRATION_ID_RULE)
    if settings.retry_max_s < settings.retry_min_s:
        raise table.error("retry_max_s", settings.retry_max_s,
                          "a value not below provisioning.retry_min_s")


def _check_cross_references(source: Path, config: Config) -> None:
    group_names = [group.name for group in config.plc.tag_groups]
    duplicates = {name for name in group_names if group_names.count(name) > 1}
    if duplicates:
        raise ConfigError(f"{source}: duplicate tag group name {sorted(duplicates)[0]!r}")

    tag_names = [tag.name for tag in config.plc.tags]
    duplicates = {name for name in tag_names if tag_names.count(name) > 1}
    if duplicates:
        raise ConfigError(f"{source}: duplicate tag name {sorted(duplicates)[0]!r}")

    for index, tag in enumerate(config.plc.tags):
        if tag.group not in group_names:
            raise ConfigError(
                f"{source}: invalid value for plc.tags[{index}].group: {tag.group!r}; "
                f"expected one of the tag group names {', '.join(group_names)}"
            )

    provisioning = config.provisioning
    if provisioning is not None:
        if config.uplink.mode != "azure":
            raise ConfigError(f"{source}: [provisioning] is set in uplink.mode = "
                              f"{config.uplink.mode!r}; DPS assigns Azure IoT hubs only, so "
                              "set uplink.mode = \"azure\" or remove [provisioning]")
        if provisioning.attestation == "x509" and config.credentials.client_cert_file is None:
            raise ConfigError(f"{source}: provisioning.attestation = \"x509\" needs "
                              "credentials.client_cert_file and credentials.client_key_file")
        if provisioning.registration_id_from == "plc_serial" and config.plc.identity is None:
            raise ConfigError(f"{source}: provisioning.registration_id_from = \"plc_serial\" "
                              "needs [plc.identity], which names the serial-number registers")

    _check_credential_source(source, config)


def _check_credential_source(source: Path, config: Config) -> None:
    credentials = config.credentials
    if credentials.token_server is not None:
        if config.uplink.mode != "azure":
            raise ConfigError(
                f"{source}: [credentials.token_server] needs uplink.mode = \"azure\"; the "
                "token server issues Azure IoT Hub SAS tokens"
            )
        if credentials.connection_string_file is not None:
            raise ConfigError(
                f"{source}: credentials.connection_string_file and "
                "[credentials.token_server] are both set; remove the connection string, "
                "because the token server provides the SAS tokens"
            )
        return
    if config.uplink.mode == "azure" and credentials.connection_string_file is None:
        raise ConfigError(
            f"{source}: missing key credentials.connection_string_file; "
            "azure mode needs the device's connection string, or a [credentials.token_server] "
            "table"
        )
