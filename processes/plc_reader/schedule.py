"""Poll schedules: the read requests of each tag group of each device, on the monotonic clock."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import Config
from common.errors import ConfigError
from common.modbus_tags import ReadRequest, plan_device_requests


@dataclass
class GroupSchedule:
    """The requests of one tag group on one device and the monotonic time of its next poll."""

    name: str
    interval_s: float
    next_due: float
    requests: list[ReadRequest]

    def advance(self, now: float) -> int:
        """Move next_due one interval on, past any cycles already missed, and count those."""
        self.next_due += self.interval_s
        if self.next_due > now:
            return 0
        missed = int((now - self.next_due) // self.interval_s) + 1
        self.next_due += missed * self.interval_s
        return missed


def build_schedules(config: Config, start: float) -> dict[str, list[GroupSchedule]]:
    """Plan the read requests of every device's tag groups, keyed by device name.

    A device without tags gets no entry. Raises ConfigError for a tag that cannot be read.
    """
    plc = config.plc
    try:
        plans = plan_device_requests(plc.tags, plc.devices)
    except ValueError as exc:
        raise ConfigError(f"{config.path}: {exc}") from exc

    schedules: dict[str, list[GroupSchedule]] = {}
    for device, requests in plans.items():
        for group in plc.tag_groups:
            members = [request for request in requests if request.group == group.name]
            if members:
                schedule = GroupSchedule(group.name, group.poll_interval_ms / 1000, start, members)
                schedules.setdefault(device, []).append(schedule)
    return schedules
