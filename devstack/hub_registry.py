"""The hub emulator's device registry: a TOML file of identities and their credentials.

    [devices.gw-01]                      # SAS: primary key, optional secondary key
    primary_key = "<base64>"
    secondary_key = "<base64>"

    [devices.meter-7]                    # X.509 by SHA-1 or SHA-256 thumbprint
    primary_thumbprint = "<hex>"

    [devices.line-3]                     # X.509 signed by the client CA, CN = device id
    ca_signed = true

    [modules."gw-01/historian"]          # a module: "<device id>/<module id>"
    primary_key = "<base64>"

Each identity has exactly one scheme. docs/hub-emulator.md describes the file.
"""

from __future__ import annotations

import base64
import binascii
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_KEY_FIELDS = ("primary_key", "secondary_key")
_THUMBPRINT_FIELDS = ("primary_thumbprint", "secondary_thumbprint")
_ALL_FIELDS = (*_KEY_FIELDS, *_THUMBPRINT_FIELDS, "ca_signed")

# SHA-1 and SHA-256 digests written as hex.
_THUMBPRINT_LENGTHS = (40, 64)


class RegistryError(Exception):
    """An invalid registry file. The message names the file, the key and the value."""


@dataclass(frozen=True)
class Identity:
    """A device or a module that may connect, with the credentials that it may use."""

    device_id: str
    module_id: str | None
    keys: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    # Lower-case hex without separators; SHA-1 and SHA-256 thumbprints may be mixed.
    thumbprints: tuple[str, ...] = ()
    ca_signed: bool = False

    @property
    def client_id(self) -> str:
        return f"{self.device_id}/{self.module_id}" if self.module_id else self.device_id

    @property
    def scheme(self) -> str:
        if self.keys:
            return "sas"
        return "x509-ca" if self.ca_signed else "x509-thumbprint"

    def resource_uri(self, hub_host: str) -> str:
        """Return the resource that this identity's SAS tokens must be scoped to."""
        uri = f"{hub_host}/devices/{self.device_id}"
        return f"{uri}/modules/{self.module_id}" if self.module_id else uri


@dataclass(frozen=True)
class Registry:
    identities: dict[str, Identity]

    def find(self, client_id: str) -> Identity | None:
        return self.identities.get(client_id)

    @property
    def uses_x509(self) -> bool:
        return any(identity.scheme != "sas" for identity in self.identities.values())


def load_registry(path: Path) -> Registry:
    """Read and validate a registry file; raise RegistryError naming file, key and value."""
    try:
        with path.open("rb") as stream:
            document = tomllib.load(stream)
    except FileNotFoundError as exc:
        raise RegistryError(f"{path}: registry file not found") from exc
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read registry file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{path}: invalid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        # The message gives the offset only: the bad bytes may sit inside a key.
        raise RegistryError(
            f"{path}: invalid TOML: not UTF-8 at byte {exc.start}; save the file as UTF-8"
        ) from exc

    for section in document:
        if section not in ("devices", "modules"):
            raise RegistryError(
                f"{path}: unknown top-level key {section!r}; expected [devices.<id>] or "
                "[modules.\"<device id>/<module id>\"] tables"
            )

    identities: dict[str, Identity] = {}
    for device_id, table in _section(path, document, "devices").items():
        identities[device_id] = _parse_identity(path, f"devices.{device_id}", device_id, None,
                                                table)
    for client_id, table in _section(path, document, "modules").items():
        device_id, _, module_id = client_id.partition("/")
        where = f"modules.{client_id}"
        if not module_id or "/" in module_id:
            raise RegistryError(
                f"{path}: invalid module name [{where}]; expected \"<device id>/<module id>\""
            )
        if device_id not in identities:
            raise RegistryError(
                f"{path}: [{where}] names device {device_id!r}, which has no [devices] entry"
            )
        identities[client_id] = _parse_identity(path, where, device_id, module_id, table)

    if not identities:
        raise RegistryError(f"{path}: no devices; add at least one [devices.<id>] table")
    return Registry(identities)


def _section(path: Path, document: dict[str, Any], name: str) -> dict[str, Any]:
    section = document.get(name, {})
    if not isinstance(section, dict):
        raise RegistryError(f"{path}: {name} must be a table of [{name}.<id>] tables")
    return section


def _parse_identity(
    path: Path, where: str, device_id: str, module_id: str | None, table: Any
) -> Identity:
    """Validate one identity's table: exactly one scheme, well-formed keys and thumbprints."""
    if not isinstance(table, dict):
        raise RegistryError(f"{path}: {where} must be a table")
    names = (device_id,) if module_id is None else (device_id, module_id)
    if not all(_is_valid_id(name) for name in names):
        raise RegistryError(
            f"{path}: invalid identity name [{where}]; an id must not be empty and must not "
            "contain spaces, '/', '#' or '+'"
        )
    for key in table:
        if key not in _ALL_FIELDS:
            raise RegistryError(
                f"{path}: unknown key {where}.{key}; expected one of {', '.join(_ALL_FIELDS)}"
            )

    keys = tuple(
        (name.removesuffix("_key"), _decode_key(path, f"{where}.{name}", table[name]))
        for name in _KEY_FIELDS if name in table
    )
    thumbprints = tuple(
        _normalise_thumbprint(path, f"{where}.{name}", table[name])
        for name in _THUMBPRINT_FIELDS if name in table
    )
    ca_signed = table.get("ca_signed", False)
    if not isinstance(ca_signed, bool):
        raise RegistryError(f"{path}: invalid {where}.ca_signed = {ca_signed!r}; expected true")

    schemes = [name for name, used in (("keys", keys), ("thumbprints", thumbprints),
                                       ("ca_signed", ca_signed)) if used]
    if len(schemes) != 1:
        raise RegistryError(
            f"{path}: [{where}] must have exactly one of primary_key, primary_thumbprint or "
            f"ca_signed = true, found {', '.join(schemes) or 'none'}"
        )
    if "secondary_key" in table and "primary_key" not in table:
        raise RegistryError(f"{path}: [{where}] has secondary_key but no primary_key")
    if "secondary_thumbprint" in table and "primary_thumbprint" not in table:
        raise RegistryError(f"{path}: [{where}] has secondary_thumbprint but no primary_thumbprint")
    return Identity(device_id, module_id, keys, thumbprints, ca_signed)


def _is_valid_id(name: str) -> bool:
    # Topic filters and the module separator give these characters a meaning of their own.
    return bool(name) and name.isprintable() and not any(ch in name for ch in " /#+")


def _decode_key(path: Path, where: str, value: Any) -> bytes:
    """Decode a base64 key; the value itself never appears in an error."""
    if not isinstance(value, str) or not value:
        raise RegistryError(f"{path}: invalid {where}: expected a base64 string")
    try:
        key = base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise RegistryError(f"{path}: invalid {where}: not base64") from exc
    if not key:
        raise RegistryError(f"{path}: invalid {where}: decodes to zero bytes")
    return key


def _normalise_thumbprint(path: Path, where: str, value: Any) -> str:
    """Accept hex in either case, with or without colons or spaces between byte pairs."""
    if not isinstance(value, str):
        raise RegistryError(f"{path}: invalid {where} = {value!r}; expected a hex string")
    digits = value.replace(":", "").replace(" ", "").lower()
    if len(digits) not in _THUMBPRINT_LENGTHS or not set(digits) <= set(string.hexdigits):
        raise RegistryError(
            f"{path}: invalid {where} = {value!r}; expected 40 hex digits (SHA-1) or 64 "
            "(SHA-256)"
        )
    return digits
