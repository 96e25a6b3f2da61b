"""The token server's configuration: one TOML file parsed once into frozen objects.

Every key is documented in docs/token-server.md. Unknown keys, wrong types and bad values
raise ConfigError naming the file, the key and the value. The server refuses to start with
an unsafe configuration: no TLS certificate, no allow-list, no way for a gateway to prove
its identity, or a key or secret file that other users can read.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from common.config import _REQUIRED, _device_id, _Table, config_source, read_config_text
from common.errors import ConfigError
from common.token_protocol import SERIAL_PATTERN
from token_server.file_safety import check_private_file

# Listen addresses that accept connections from every interface.
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")


@dataclass(frozen=True)
class ListenSettings:
    host: str
    port: int
    cert_file: Path
    key_file: Path
    # PEM bundle of the CA that signs gateway certificates; None turns certificate
    # authentication off.
    client_ca_file: Path | None
    request_timeout_s: float


@dataclass(frozen=True)
class TokenSettings:
    hub_host_name: str
    ttl_s: int
    group_key_file: Path | None


@dataclass(frozen=True)
class ChallengeSettings:
    ttl_s: float
    max_pending: int


@dataclass(frozen=True)
class RateLimitSettings:
    burst: int
    per_minute: float


@dataclass(frozen=True)
class AllowedDevice:
    """One gateway on the allow-list: its serial number and the device id it gets tokens for."""

    serial: str
    device_id: str
    key_file: Path | None
    secret_file: Path | None


@dataclass(frozen=True)
class ServerConfig:
    path: Path
    listen: ListenSettings
    tokens: TokenSettings
    challenge: ChallengeSettings
    rate_limit: RateLimitSettings
    audit_log_file: Path
    log_level: str
    devices: tuple[AllowedDevice, ...]

    def device(self, serial: str) -> AllowedDevice | None:
        for device in self.devices:
            if device.serial == serial:
                return device
        return None


def load_server_config(path: str | Path) -> ServerConfig:
    """Read, validate and safety-check the token server's configuration file."""
    source = config_source(path)
    text = read_config_text(source).removeprefix("\ufeff")
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc

    top = _Table(source, "", data)
    config = ServerConfig(
        path=source,
        listen=_parse_listen(top.table("listen", required=True)),
        tokens=_parse_tokens(top.table("tokens", required=True)),
        challenge=_parse_challenge(top.table("challenge")),
        rate_limit=_parse_rate_limit(top.table("rate_limit")),
        audit_log_file=top.path("audit_log_file", _REQUIRED),  # type: ignore[arg-type]
        log_level=top.text("log_level", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        devices=tuple(_parse_device(table) for table in top.array_of_tables("devices")),
    )
    top.reject_unknown()
    _check_allow_list(source, config)
    _check_authentication(source, config)
    _check_file_permissions(config)
    return config


def _parse_listen(table: _Table) -> ListenSettings:
    settings = ListenSettings(
        host=table.get("host", str, _REQUIRED, "an IP address or host name to listen on"),
        port=table.integer("port", _REQUIRED, 0, 65_535),
        cert_file=_required_path(table, "cert_file", "the server's PEM certificate; the "
                                 "token server serves HTTPS only"),
        key_file=_required_path(table, "key_file", "the server's PEM private key; the token "
                                "server serves HTTPS only"),
        client_ca_file=table.path("client_ca_file"),
        request_timeout_s=table.number("request_timeout_s", 10.0, 0.5, 300.0),
    )
    table.reject_unknown()
    return settings


def _required_path(table: _Table, key: str, what: str) -> Path:
    if key not in table.data:
        raise ConfigError(f"{table.source}: missing key {table.key_path(key)}; expected {what}")
    path = table.path(key)
    assert path is not None
    return path


# A DNS host name: dot-separated labels of letters, digits and inner hyphens.
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _host_name(table: _Table, key: str) -> str:
    # The name goes into every token's sr, so a stray character makes tokens the hub rejects.
    value = table.text(key, _REQUIRED)
    if not _HOST_NAME.fullmatch(value):
        raise table.error(key, value, "a host name such as myhub.azure-devices.net")
    return value


def _parse_tokens(table: _Table) -> TokenSettings:
    settings = TokenSettings(
        hub_host_name=_host_name(table, "hub_host_name"),
        ttl_s=table.integer("ttl_s", 3600, 10, 86_400),
        group_key_file=table.path("group_key_file"),
    )
    table.reject_unknown()
    return settings


def _parse_challenge(table: _Table) -> ChallengeSettings:
    settings = ChallengeSettings(
        ttl_s=table.number("ttl_s", 30.0, 1.0, 300.0),
        max_pending=table.integer("max_pending", 10_000, 1, 1_000_000),
    )
    table.reject_unknown()
    return settings


def _parse_rate_limit(table: _Table) -> RateLimitSettings:
    settings = RateLimitSettings(
        burst=table.integer("burst", 10, 1, 10_000),
        per_minute=table.number("per_minute", 30.0, 0.1, 600_000.0),
    )
    table.reject_unknown()
    return settings


def _parse_device(table: _Table) -> AllowedDevice:
    serial = table.text("serial", _REQUIRED)
    if not SERIAL_PATTERN.fullmatch(serial):
        raise table.error("serial", serial,
                          "up to 64 ASCII letters, digits and - . _ : (the gateway's serial)")
    device = AllowedDevice(
        serial=serial,
        device_id=_device_id(table),
        key_file=table.path("key_file"),
        secret_file=table.path("secret_file"),
    )
    table.reject_unknown()
    return device


def _check_allow_list(source: Path, config: ServerConfig) -> None:
    if not config.devices:
        raise ConfigError(
            f"{source}: missing allow-list: no [[devices]] table; add one per gateway with "
            "its serial and device_id"
        )
    for key, values in (("serial", [d.serial for d in config.devices]),
                        ("device_id", [d.device_id for d in config.devices])):
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise ConfigError(
                f"{source}: duplicate {key} {repeated[0]!r} in [[devices]]; each gateway "
                "needs its own entry and its own device"
            )

    group_key = config.tokens.group_key_file
    for index, device in enumerate(config.devices):
        where = f"devices[{index}] (serial {device.serial!r})"
        if group_key is not None and device.key_file is not None:
            raise ConfigError(
                f"{source}: {where} sets key_file while tokens.group_key_file is set; use "
                "either per-device keys or the group key"
            )
        if group_key is None and device.key_file is None:
            raise ConfigError(
                f"{source}: {where} has no key_file and tokens.group_key_file is not set; "
                "set one of them so that its tokens can be signed"
            )


def _check_authentication(source: Path, config: ServerConfig) -> None:
    """Require a way for every allowed gateway to prove its identity."""
    certificates = config.listen.client_ca_file is not None
    if not certificates and all(device.secret_file is None for device in config.devices):
        wildcard = ""
        if _is_wildcard(config.listen.host):
            wildcard = f" while listening on every interface ({config.listen.host!r})"
        raise ConfigError(
            f"{source}: no client authentication configured{wildcard}: set "
            "listen.client_ca_file for client certificates or secret_file per device for "
            "challenges"
        )
    if certificates:
        return
    for index, device in enumerate(config.devices):
        if device.secret_file is None:
            raise ConfigError(
                f"{source}: devices[{index}] (serial {device.serial!r}) has no secret_file "
                "and listen.client_ca_file is not set, so it cannot prove its identity"
            )


def _is_wildcard(host: str) -> bool:
    if host in WILDCARD_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _check_file_permissions(config: ServerConfig) -> None:
    """Reject key and secret files that another user could read or replace."""
    check_private_file(config.listen.key_file, "listen.key_file")
    if config.tokens.group_key_file is not None:
        check_private_file(config.tokens.group_key_file, "tokens.group_key_file")
    for index, device in enumerate(config.devices):
        for key, path in (("key_file", device.key_file), ("secret_file", device.secret_file)):
            if path is not None:
                check_private_file(path, f"devices[{index}].{key}")
