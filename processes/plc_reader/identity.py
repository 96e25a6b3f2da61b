"""The PLC's serial-number identity: read from its registers, persisted, and checked at start.

The id has the form YYMMNNNN: two digits of the manufacture year, two of the month and four
of the unit number, for example 22091017 for unit 1017 made in September 2022. It is read
from the PLC when the reader starts, again after every reconnect to the PLC and every
identity.recheck_interval_s, and compared with the id stored in
<state_dir>/plc-identity.json:

- nothing stored: the id read is stored, and samples flow;
- the same id: samples flow;
- another id: the PLC was swapped. The reader logs identity_changed at ERROR and sends no
  samples until an operator runs `plcbridge confirm-identity`, which stores the new id, or
  until the stored id is read again;
- the PLC unreachable: samples flow under the stored id while the reader keeps trying, and
  the fact is logged. With no stored id, samples are withheld until the id is read.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.atomic_file import write_atomically
from common.config import IdentitySettings, PlcDevice, Tag
from common.errors import PlcBridgeError
from common.logs import fields
from common.modbus_tags import ReadRequest, decode_tag, plan_requests

IDENTITY_FILE = "plc-identity.json"

# How often the reader looks for an operator's confirmation while it withholds samples.
CONFIRM_CHECK_INTERVAL_S = 1.0

REASON_INVALID_ID = "invalid serial number"


class IdentityError(PlcBridgeError):
    """The serial-number registers contain values that give no valid id."""


def compose_id(year: int, month: int, unit: int) -> str:
    """Compose YYMMNNNN from a year (0-99 or 2000-2099), a month and a unit number."""
    if 2000 <= year <= 2099:
        year -= 2000
    if not 0 <= year <= 99 or not 1 <= month <= 12 or not 0 <= unit <= 9999:
        raise IdentityError(
            f"serial-number registers give year {year}, month {month}, unit {unit}; "
            "expected year 0-99 or 2000-2099, month 1-12 and unit 0-9999"
        )
    return f"{year:02d}{month:02d}{unit:04d}"


def check_composed_id(number: int) -> str:
    """Return a composed YYMMNNNN number as the id text, after checking its month."""
    text = f"{number:08d}"
    if len(text) != 8 or not 1 <= int(text[2:4]) <= 12:
        raise IdentityError(
            f"serial-number register contains {number}; expected an 8-digit YYMMNNNN id "
            "with month 01-12"
        )
    return text


def identity_tags(settings: IdentitySettings) -> list[Tag]:
    """Return the tags whose registers make up the id."""
    def tag(name: str, address: int, value_type: str) -> Tag:
        return Tag(f"identity.{name}", "identity", settings.table, address, value_type, "big",
                   1.0, 0.0, device=settings.device)

    if settings.serial_address is not None:
        return [tag("serial", settings.serial_address, "uint32")]
    parts = (("year", settings.year_address), ("month", settings.month_address),
             ("unit", settings.unit_address))
    return [tag(name, address, "uint16") for name, address in parts if address is not None]


def identity_requests(settings: IdentitySettings, device: PlcDevice) -> list[ReadRequest]:
    return plan_requests(identity_tags(settings), device.max_registers_per_read,
                         device.max_gap_registers)


def id_from_values(settings: IdentitySettings, values: dict[str, int]) -> str:
    """Compose the id from decoded register values keyed by tag name."""
    if settings.serial_address is not None:
        return check_composed_id(values["identity.serial"])
    return compose_id(values["identity.year"], values["identity.month"], values["identity.unit"])


def decode_identity(
    settings: IdentitySettings, request: ReadRequest, registers: list[int] | list[bool]
) -> dict[str, int]:
    return {tag.name: int(decode_tag(tag, registers, request.address)) for tag in request.tags}


class IdentityStore:
    """The confirmed id in <state_dir>/plc-identity.json, replaced atomically."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / IDENTITY_FILE

    def load(self) -> str | None:
        """Return the stored id, or None when none is stored; raise for a corrupt file."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise PlcBridgeError(
                f"{self.path}: cannot read the stored PLC identity: {exc}. Run plcbridge "
                "confirm-identity to store the PLC's id again"
            ) from exc
        plc_id = data.get("plc_id") if isinstance(data, dict) else None
        if not isinstance(plc_id, str) or not plc_id:
            raise PlcBridgeError(
                f"{self.path}: no plc_id in the stored PLC identity. Run plcbridge "
                "confirm-identity to store the PLC's id again"
            )
        return plc_id

    def save(self, plc_id: str) -> None:
        record = {"plc_id": plc_id, "stored_at": datetime.now(UTC).isoformat(timespec="seconds")}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, (json.dumps(record) + "\n").encode(), mode=0o644)
        except OSError as exc:
            raise PlcBridgeError(
                f"{self.path}: cannot store the PLC identity: {exc}. Check that "
                "gateway.state_dir is writable by this user"
            ) from exc


@dataclass
class IdentityGate:
    """Decides whether samples may be sent, from the stored id and the id read from the PLC.

    Used by the reader's main thread only. state is one of: unverified (stored id, PLC not
    read yet), unknown (no stored id, PLC not read yet), verified, changed.
    """

    store: IdentityStore
    logger: logging.Logger
    state: str = "unknown"
    stored_id: str | None = None
    plc_id: str | None = None
    withheld_samples: int = 0
    _next_check: float = 0.0

    @classmethod
    def open(cls, store: IdentityStore, logger: logging.Logger) -> IdentityGate:
        stored = store.load()
        gate = cls(store, logger, "unverified" if stored else "unknown", stored)
        logger.info("identity_stored %s", fields(plc_id=stored or "none", file=store.path))
        return gate

    @property
    def open_for_samples(self) -> bool:
        return self.state in ("unverified", "verified")

    def counters(self) -> dict[str, Any]:
        return {
            "identity": self.state,
            "plc_id": self.plc_id or self.stored_id,
            "withheld_samples": self.withheld_samples,
        }

    def on_read(self, plc_id: str) -> None:
        """Compare the id read from the PLC with the stored one.

        The id is read again at reconnects and at an interval, so only a change of state,
        or of the id read while it differs, is logged.
        """
        previous = (self.state, self.plc_id)
        self.plc_id = plc_id
        if self.stored_id is None:
            self.store.save(plc_id)
            self.stored_id = plc_id
            self._set("verified", "identity_recorded", logging.INFO)
        elif self.stored_id == plc_id:
            if self.state != "verified":
                self._set("verified", "identity_verified", logging.INFO)
        elif previous != ("changed", plc_id):
            self._set("changed", "identity_changed", logging.ERROR,
                      consequence="the PLC was swapped or its serial number changed; no "
                      "samples are sent until an operator runs plcbridge confirm-identity")

    def on_unreachable(self, reason: str) -> None:
        """Log once that the PLC's id could not be read at start."""
        if self.state == "unverified":
            consequence = f"samples are sent under the stored id {self.stored_id} while the " \
                          "reader keeps trying"
        elif self.state == "unknown":
            consequence = "no id is stored, so samples are withheld until the PLC answers"
        else:
            return
        self.logger.warning("identity_unverified %s",
                            fields(reason=reason, consequence=consequence))

    def on_invalid(self, error: str) -> None:
        self.logger.error("identity_invalid %s", fields(
            error=error, consequence="the id is read again at the next poll; samples flow "
            "only under a stored id"))

    def check_confirmation(self) -> None:
        """While the id changed, look for the operator's confirmation at most once a second."""
        now = time.monotonic()
        if self.state != "changed" or now < self._next_check:
            return
        self._next_check = now + CONFIRM_CHECK_INTERVAL_S
        stored = self.store.load()
        if stored is not None and stored == self.plc_id:
            self.stored_id = stored
            self._set("verified", "identity_confirmed", logging.INFO)

    def withhold(self, count: int) -> None:
        self.withheld_samples += count

    def _set(self, state: str, event: str, level: int, consequence: str = "") -> None:
        self.state = state
        values: dict[str, Any] = {"plc_id": self.plc_id, "stored_id": self.stored_id}
        if consequence:
            values["consequence"] = consequence
        self.logger.log(level, "%s %s", event, fields(**values))
