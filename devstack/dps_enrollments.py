"""The DPS emulator's enrollments: a TOML file of individual and group enrollments.

    id_scope = "0ne00000A1"

    [individual."gw-01"]              # symmetric key; the table name is the registration id
    primary_key = "<base64>"
    secondary_key = "<base64>"         # optional
    assigned_hub = "localhost"
    device_id = "gw-01"                # optional; default: the registration id

    [individual."meter-7"]            # X.509 by SHA-1 or SHA-256 thumbprint
    primary_thumbprint = "<hex>"
    assigned_hub = "localhost"

    [groups."line-gateways"]          # symmetric-key group: devices sign with derived keys
    primary_key = "<base64 group key>"
    assigned_hub = "localhost"

docs/dps-emulator.md describes the file.
"""

from __future__ import annotations

import base64
import binascii
import string
import tomllib
from dataclasses import dataclass, field
from typing import Any

from common.dps_keys import derive_device_key, registration_id_problem

_KEY_FIELDS = ("primary_key", "secondary_key")
_THUMBPRINT_FIELDS = ("primary_thumbprint", "secondary_thumbprint")
_COMMON_FIELDS = ("assigned_hub", "device_id")
_THUMBPRINT_LENGTHS = (40, 64)


class EnrollmentError(ValueError):
    """An invalid enrollments file; the message names the table, the key and the value."""


@dataclass(frozen=True)
class Enrollment:
    name: str
    kind: str  # "individual" or "group"
    assigned_hub: str
    device_id: str | None
    keys: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    thumbprints: tuple[str, ...] = ()

    @property
    def attestation(self) -> str:
        return "x509" if self.thumbprints else "symmetric_key"

    def device_keys(self, registration_id: str) -> tuple[tuple[str, bytes], ...]:
        """Return the keys that a device's SAS token may be signed with, by name."""
        if self.kind == "individual":
            return self.keys
        return tuple((name, base64.b64decode(derive_device_key(key, registration_id)))
                     for name, key in self.keys)


@dataclass(frozen=True)
class Enrollments:
    id_scope: str
    individual: dict[str, Enrollment]
    groups: tuple[Enrollment, ...]

    def individual_for(self, registration_id: str) -> Enrollment | None:
        # DPS compares registration ids without regard to case.
        return self.individual.get(registration_id.lower())

    def __str__(self) -> str:
        return (f"id_scope={self.id_scope} individual={len(self.individual)} "
                f"groups={len(self.groups)}")


def parse_enrollments(data: bytes) -> Enrollments:
    """Parse the file's bytes; raise EnrollmentError naming the table, key and value."""
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EnrollmentError(f"invalid TOML: {exc}") from exc

    unknown = set(document) - {"id_scope", "individual", "groups"}
    if unknown:
        raise EnrollmentError(f"unknown top-level key {sorted(unknown)[0]!r}; expected id_scope, "
                              "[individual.<registration id>] or [groups.<name>]")
    id_scope = document.get("id_scope")
    if not isinstance(id_scope, str) or not id_scope or "/" in id_scope:
        raise EnrollmentError(f"invalid id_scope = {id_scope!r}; expected a string without '/'")

    individual: dict[str, Enrollment] = {}
    for name, table in _section(document, "individual").items():
        problem = registration_id_problem(name)
        if problem:
            raise EnrollmentError(f"invalid registration id [individual.{name}]: {problem}")
        individual[name.lower()] = _parse_enrollment(f"individual.{name}", name, "individual",
                                                     table)
    groups = tuple(_parse_enrollment(f"groups.{name}", name, "group", table)
                   for name, table in _section(document, "groups").items())
    if any(group.thumbprints for group in groups):
        raise EnrollmentError("a group enrollment takes primary_key, not thumbprints")
    return Enrollments(id_scope, individual, groups)


def _section(document: dict[str, Any], name: str) -> dict[str, Any]:
    section = document.get(name, {})
    if not isinstance(section, dict):
        raise EnrollmentError(f"{name} must be a table of [{name}.<name>] tables")
    return section


def _parse_enrollment(where: str, name: str, kind: str, table: Any) -> Enrollment:
    if not isinstance(table, dict):
        raise EnrollmentError(f"[{where}] must be a table")
    for key in table:
        if key not in (*_KEY_FIELDS, *_THUMBPRINT_FIELDS, *_COMMON_FIELDS):
            raise EnrollmentError(f"unknown key {where}.{key}")

    hub = table.get("assigned_hub")
    if not isinstance(hub, str) or not hub or any(char in hub for char in "/?# "):
        raise EnrollmentError(f"invalid {where}.assigned_hub = {hub!r}; expected a host name")
    device_id = table.get("device_id")
    if device_id is not None and (not isinstance(device_id, str) or not device_id):
        raise EnrollmentError(f"invalid {where}.device_id = {device_id!r}; expected a string")

    keys = tuple((key.removesuffix("_key"), _decode_key(f"{where}.{key}", table[key]))
                 for key in _KEY_FIELDS if key in table)
    thumbprints = tuple(_thumbprint(f"{where}.{key}", table[key])
                        for key in _THUMBPRINT_FIELDS if key in table)
    if bool(keys) == bool(thumbprints):
        raise EnrollmentError(f"[{where}] needs exactly one of primary_key or "
                              "primary_thumbprint")
    return Enrollment(name, kind, hub, device_id, keys, thumbprints)


def _decode_key(where: str, value: Any) -> bytes:
    """Decode a base64 key; the error never repeats the value."""
    if not isinstance(value, str):
        raise EnrollmentError(f"invalid {where}: expected a base64 string")
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnrollmentError(f"invalid {where}: not base64") from exc
    if not key:
        raise EnrollmentError(f"invalid {where}: decodes to zero bytes")
    return key


def _thumbprint(where: str, value: Any) -> str:
    digits = str(value).replace(":", "").replace(" ", "").lower()
    if len(digits) not in _THUMBPRINT_LENGTHS or not set(digits) <= set(string.hexdigits):
        raise EnrollmentError(f"invalid {where} = {value!r}; expected 40 or 64 hex digits")
    return digits
