"""Azure IoT Hub device credentials: connection strings and SAS tokens.

A device connection string is one line of `Key=value` pairs separated by `;`. Values are
split at the first `=` only and kept byte-exact, because keys and tokens contain `=`, `+`
and `/`. Key names are case-sensitive, as in Azure's SDKs.

A SAS token reads `SharedAccessSignature sr=<uri>&sig=<signature>&se=<expiry>[&skn=<policy>]`
with its fields in any order. The signature is HMAC-SHA256, keyed with the base64-decoded
device key, over `<url-encoded resource URI>\\n<se>`; Azure's Python SDK encodes the URI with
`urllib.parse.quote(uri, safe="")`, and so does this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import stat
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from common.errors import CredentialError

_KNOWN_KEYS = (
    "HostName",
    "DeviceId",
    "ModuleId",
    "SharedAccessKey",
    "SharedAccessSignature",
    "x509",
    "GatewayHostName",
)
_SAS_PREFIX = "SharedAccessSignature "

# Maximum length of a name quoted in an error. A longer "name" is more likely part of a
# pasted key or signature, which must never reach a log.
_MAX_ECHOED_NAME = 24

# The latest expiry that Python's datetime and every UTC formatter here can represent:
# 9999-12-31T23:59:59Z. A larger se is rejected as out of range.
MAX_EPOCH_S = 253_402_300_799

# Largest credential or state file read. Debian 12's whole system bundle, 144 roots in
# /etc/ssl/certs/ca-certificates.crt, is 215 KiB, and a device or /dev/zero behind the path
# must not fill the memory.
MAX_CREDENTIAL_FILE_BYTES = 512 * 1024

# Characters allowed in a device or module id besides ASCII letters and digits, up to 128
# characters: the set of IoT Hub's identity registry. Azure's Event Grid schema also lists
# "+", "#" and ";", but "+" and "#" are wildcards, which MQTT 3.1.1 forbids in the topic of
# a PUBLISH, and ";" ends a value in a connection string. "/" would split the topic.
_ID_PATTERN = re.compile(r"[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}")
DEVICE_ID_PATTERN = _ID_PATTERN


@dataclass(frozen=True)
class SasToken:
    resource: str
    expiry_s: int
    policy: str | None
    # The whole token is the MQTT password; repr=False keeps it out of tracebacks and logs.
    text: str = field(repr=False)


@dataclass(frozen=True)
class ConnectionString:
    host_name: str
    device_id: str
    module_id: str | None
    gateway_host_name: str | None
    shared_access_key: bytes | None = field(default=None, repr=False)
    token: SasToken | None = None
    x509: bool = False

    @property
    def scheme(self) -> str:
        if self.x509:
            return "x509"
        return "device key" if self.shared_access_key is not None else "SAS token"

    @property
    def resource_uri(self) -> str:
        """Return the resource a SAS token for this identity is signed for."""
        uri = f"{self.host_name}/devices/{self.device_id}"
        return f"{uri}/modules/{self.module_id}" if self.module_id else uri

    @property
    def connect_host(self) -> str:
        """Return the host to open TCP and TLS to: an IoT Edge parent if one is named."""
        return self.gateway_host_name or self.host_name

    @property
    def client_id(self) -> str:
        return f"{self.device_id}/{self.module_id}" if self.module_id else self.device_id


def parse_connection_string(text: str, source: str = "connection string") -> ConnectionString:
    """Parse a device connection string; raise CredentialError naming the bad key."""
    pairs: dict[str, str] = {}
    for part in text.strip().split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        _reject_whitespace(key, value, source)
        if not sep or not value:
            raise CredentialError(
                f"{source}: invalid part {_quote_name(key)}: expected Key=value"
            )
        if key not in _KNOWN_KEYS:
            raise CredentialError(
                f"{source}: unknown key {_quote_name(key)}; expected one of "
                f"{', '.join(_KNOWN_KEYS)}"
            )
        if key in pairs:
            raise CredentialError(f"{source}: duplicate key {key!r}")
        pairs[key] = value

    for required in ("HostName", "DeviceId"):
        if required not in pairs:
            raise CredentialError(f"{source}: missing key {required!r}")
    schemes = [key for key in ("SharedAccessKey", "SharedAccessSignature", "x509") if key in pairs]
    if len(schemes) != 1:
        raise CredentialError(
            f"{source}: expected exactly one of SharedAccessKey, SharedAccessSignature or "
            f"x509=true, found {', '.join(schemes) or 'none'}"
        )

    device_key = None
    if "SharedAccessKey" in pairs:
        try:
            device_key = base64.b64decode(pairs["SharedAccessKey"], validate=True)
        except binascii.Error as exc:
            raise CredentialError(
                f"{source}: invalid SharedAccessKey: not base64; copy the device's primary "
                "or secondary key again"
            ) from exc
    token = None
    if "SharedAccessSignature" in pairs:
        token = parse_sas_token(pairs["SharedAccessSignature"], source)
    if "x509" in pairs and pairs["x509"].lower() != "true":
        raise CredentialError(f"{source}: invalid value for x509: {pairs['x509']!r}; expected true")

    for id_key in ("DeviceId", "ModuleId"):
        if id_key in pairs and not _ID_PATTERN.fullmatch(pairs[id_key]):
            raise CredentialError(
                f"{source}: invalid {id_key} {pairs[id_key][:128]!r}: Azure allows up to 128 "
                "ASCII letters, digits and - . % _ * ? ! ( ) , : = @ $ '; copy the id from the "
                "hub's device list"
            )

    connection = ConnectionString(
        host_name=pairs["HostName"],
        device_id=pairs["DeviceId"],
        module_id=pairs.get("ModuleId"),
        gateway_host_name=pairs.get("GatewayHostName"),
        shared_access_key=device_key,
        token=token,
        x509="x509" in pairs,
    )
    if token is not None:
        _check_token_resource(connection, token, source)
    return connection


def _reject_whitespace(key: str, value: str, source: str) -> None:
    """Reject spaces around a key or a value: the hub would see them as part of the name."""
    name = key.strip()
    shown = repr(name) if name in _KNOWN_KEYS else _quote_name(name)
    if key != name:
        raise CredentialError(
            f"{source}: key {shown} has whitespace around its name; remove the spaces "
            "around ';' and '='"
        )
    if value != value.strip():
        raise CredentialError(
            f"{source}: the value of key {shown} starts or ends with whitespace; remove the "
            "spaces around ';' and '='"
        )


def _check_token_resource(connection: ConnectionString, token: SasToken, source: str) -> None:
    """Reject a SAS token whose sr does not cover this identity, which the hub rejects.

    A device or module token (no skn) must name the identity's resource or the hub alone.
    A policy token (skn) may name any prefix of it at a path boundary. Host names compare
    without case, ids with case, as Azure compares them.
    """
    expected = _fold_host(connection.resource_uri)
    resource = _fold_host(token.resource.rstrip("/"))
    if resource in (expected, connection.host_name.lower()):
        return
    if token.policy is not None and expected.startswith(resource + "/"):
        return
    what = "the hub, device and module" if connection.module_id else "the hub and device"
    raise CredentialError(
        f"{source}: SharedAccessSignature is signed for sr={token.resource[:200]!r}, not for "
        f"{connection.resource_uri!r}, so the hub rejects it; the token's sr must name "
        f"{what} of HostName, DeviceId and ModuleId"
    )


def _fold_host(resource: str) -> str:
    host, sep, path = resource.partition("/")
    return f"{host.lower()}{sep}{path}"


def _quote_name(name: str) -> str:
    """Quote a key or field name for an error, unless it might be part of a secret."""
    if name.isascii() and name.isalnum() and len(name) <= _MAX_ECHOED_NAME:
        return repr(name)
    return f"of {len(name)} characters (not shown, because it may contain a secret)"


def read_regular_file(path: Path, max_bytes: int = MAX_CREDENTIAL_FILE_BYTES) -> bytes:
    """Read a small regular file without blocking on a FIFO or filling memory from a device.

    Raises OSError from open or read, and ValueError for a file that is not a regular file or
    is larger than max_bytes.
    """
    # O_NONBLOCK makes open() of a FIFO return at once instead of waiting for a writer.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb") as file:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"not a regular file ({_file_type(mode)})")
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes // 1024} KiB")
    return data


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "a special file"


class CredentialFileError(CredentialError):
    """A credential file that cannot be used. The message starts with its path."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def read_credential_bytes(path: Path, file_kind: str) -> bytes:
    """Read a credential file; raise CredentialFileError naming it and saying what to fix."""
    try:
        return read_regular_file(path)
    except ValueError as exc:
        raise CredentialFileError(
            path, f"{file_kind} is {exc}; expected a regular file of at most "
            f"{MAX_CREDENTIAL_FILE_BYTES // 1024} KiB"
        ) from exc
    except FileNotFoundError as exc:
        raise CredentialFileError(path, f"{file_kind} not found") from exc
    except IsADirectoryError as exc:
        raise CredentialFileError(path, f"{file_kind} is a folder; expected a file") from exc
    except PermissionError as exc:
        raise CredentialFileError(
            path, f"{file_kind} not readable by this user; check its permissions"
        ) from exc
    except OSError as exc:
        raise CredentialFileError(path, f"cannot read {file_kind}: {exc.strerror}") from exc


def _read_one_line(path: Path, file_kind: str, content: str) -> str:
    """Return the single non-empty line of a credential file, stripped."""
    data = read_credential_bytes(path, file_kind)
    try:
        # utf-8-sig drops the byte-order mark that Windows editors put in front.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CredentialFileError(
            path, f"cannot read {file_kind}: not UTF-8 text; save it as UTF-8"
        ) from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise CredentialFileError(path, f"expected one line holding {content}")
    return lines[0]


def read_connection_string(path: Path) -> ConnectionString:
    """Read and parse a one-line connection-string file; raise CredentialError naming it."""
    line = _read_one_line(path, "connection-string file", "the connection string")
    try:
        return parse_connection_string(line, str(path))
    except CredentialFileError:
        raise
    except CredentialError as exc:
        # parse_connection_string already starts its messages with the path.
        raise CredentialFileError(path, str(exc).removeprefix(f"{path}: ")) from exc


def read_password_file(path: Path) -> str:
    """Read the one-line MQTT password file; raise CredentialFileError naming it."""
    return _read_one_line(path, "password file", "the MQTT password")


def parse_sas_token(text: str, source: str = "SAS token") -> SasToken:
    """Parse a SAS token with its fields in any order; raise CredentialError if malformed."""
    if not text.startswith(_SAS_PREFIX):
        raise CredentialError(f"{source}: SAS token does not start with {_SAS_PREFIX.strip()!r}")
    values: dict[str, str] = {}
    for position, part in enumerate(text[len(_SAS_PREFIX):].split("&"), start=1):
        name, sep, value = part.partition("=")
        if not sep or name not in ("sr", "sig", "se", "skn"):
            # The name is never shown: a pasted token may have its signature in that place.
            raise CredentialError(
                f"{source}: invalid SAS token field number {position} (name of {len(name)} "
                "characters, not shown); expected sr, sig, se and optionally skn"
            )
        if name in values:
            raise CredentialError(f"{source}: duplicate SAS token field {name!r}")
        values[name] = value
    for required in ("sr", "sig", "se"):
        if not values.get(required):
            raise CredentialError(f"{source}: SAS token is missing field {required!r}")
    # int() would also take " 5", "+5" and "1_000", which no SDK writes.
    # The value is never shown, because a garbled token may have its signature in that place.
    se = values["se"]
    if not (se.isascii() and se.isdigit()):
        raise CredentialError(
            f"{source}: invalid SAS token expiry se (value of {len(se)} characters, not "
            "shown); expected epoch seconds"
        )
    # Comparing the length first keeps int() away from thousands of digits.
    if len(se) > len(str(MAX_EPOCH_S)) or int(se) > MAX_EPOCH_S:
        raise CredentialError(
            f"{source}: SAS token expiry se out of range ({len(se)} digits); expected epoch "
            f"seconds up to {MAX_EPOCH_S} (9999-12-31T23:59:59Z)"
        )
    expiry_s = int(se)
    return SasToken(
        resource=urllib.parse.unquote(values["sr"]),
        expiry_s=expiry_s,
        policy=values.get("skn"),
        text=text,
    )


def mint_sas_token(resource_uri: str, key: bytes, expiry_s: int, policy: str | None = None) -> str:
    """Sign a SAS token for resource_uri that expires at expiry_s (epoch seconds, UTC)."""
    encoded_uri = urllib.parse.quote(resource_uri, safe="")
    message = f"{encoded_uri}\n{expiry_s}".encode()
    digest = hmac.new(key, message, hashlib.sha256).digest()
    signature = urllib.parse.quote(base64.b64encode(digest).decode(), safe="")
    token = f"{_SAS_PREFIX}sr={encoded_uri}&sig={signature}&se={expiry_s}"
    return f"{token}&skn={policy}" if policy else token


def format_utc_seconds(epoch_s: float) -> str:
    """Format epoch seconds as an ISO 8601 UTC time to the second.

    A time that datetime cannot represent becomes "out-of-range". Parsers reject such
    times, so the fallback only keeps a log line from raising.
    """
    try:
        return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return "out-of-range"


_utc = format_utc_seconds


# States of a credential's validity period against the clock.
VALID = "valid"
WARNING = "warning"  # valid, but it expires within the warning threshold
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"


@dataclass(frozen=True)
class ValidityCheck:
    """A SAS token's or certificate's validity period compared with the clock.

    level is the logging level that the state deserves: INFO while valid, WARNING when it
    expires within the warning threshold or expired at most the error margin ago, ERROR when
    it expired longer ago or is not valid yet.
    """

    state: str
    level: int
    message: str


def check_validity(
    label: str,
    not_after_s: float,
    now_s: float,
    warning_s: float,
    error_margin_s: float,
    not_before_s: float | None = None,
    field_name: str = "se",
) -> ValidityCheck:
    """Compare a validity period with now_s and describe it with both times in epoch
    seconds and as UTC dates. label names the credential, such as "SAS token"."""
    times = (
        f"{field_name}={int(not_after_s)} ({_utc(not_after_s)}), now={int(now_s)} ({_utc(now_s)})"
    )
    if not_before_s is not None and now_s < not_before_s:
        return ValidityCheck(
            NOT_YET_VALID, logging.ERROR,
            f"{label} not valid yet, or the clock is behind: notBefore={int(not_before_s)} "
            f"({_utc(not_before_s)}), now={int(now_s)} ({_utc(now_s)})",
        )
    if not_after_s <= now_s:
        level = logging.ERROR if now_s - not_after_s > error_margin_s else logging.WARNING
        return ValidityCheck(
            EXPIRED, level,
            f"{label} expired or the clock is wrong: {times}, "
            f"{(now_s - not_after_s) / 3600:.1f} h ago",
        )
    if not_after_s - now_s < warning_s:
        left_h = (not_after_s - now_s) / 3600
        message = f"{label} might be outdated soon: {left_h:.1f} h left, {times}"
        return ValidityCheck(WARNING, logging.WARNING, message)
    return ValidityCheck(VALID, logging.INFO, f"{label} valid until {_utc(not_after_s)}: {times}")


def describe_expiry(
    expiry_s: int, warning_s: float, now_s: float | None = None
) -> tuple[bool, str]:
    """Compare a token's expiry with the clock; return (healthy, a sentence for the log)."""
    now = time.time() if now_s is None else now_s
    result = check_validity("SAS token", expiry_s, now, warning_s, error_margin_s=0.0)
    message = result.message
    if result.state == EXPIRED:
        message += "; renew the token"
    return result.state == VALID, message


def redact_token(token: str) -> str:
    """Return a SAS token with its signature replaced, for output that an operator reads."""
    return re.sub(r"(sig=)[^&]*", r"\1<redacted>", token)
