"""Report by exception: a per-tag deadband with a maximum silence.

A tag without a deadband is reported at every poll. A tag with one is reported when its
quality or bad reason changes, when its value moves by more than the deadband from the last
value reported, or when max_silence_s has passed since the last report, so the cloud can
tell a steady value from a dead gateway.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import Tag
from common.modbus_tags import TagValue


@dataclass
class _LastReport:
    value: TagValue | None
    reason: str
    at_s: float


class ReportFilter:
    """Decides which readings of deadband tags are sent. Used by one polling thread only."""

    def __init__(self) -> None:
        self._last: dict[str, _LastReport] = {}

    def should_report(self, tag: Tag, value: TagValue | None, reason: str, now_s: float) -> bool:
        """Return whether to send this reading; value is None for a bad reading."""
        if not tag.deadband and not tag.deadband_percent:
            return True

        last = self._last.get(tag.name)
        report = (
            last is None
            or reason != last.reason
            or now_s - last.at_s >= tag.max_silence_s
            or _outside_deadband(tag, value, last.value)
        )
        if report:
            self._last[tag.name] = _LastReport(value, reason, now_s)
        return report


def _outside_deadband(tag: Tag, value: TagValue | None, last: TagValue | None) -> bool:
    # Deadband tags are numeric by configuration; a bad reading has no value to compare.
    if not isinstance(value, int | float) or not isinstance(last, int | float):
        return value != last
    change = abs(value - last)
    if tag.deadband:
        return change > tag.deadband
    return change > abs(last) * tag.deadband_percent / 100
