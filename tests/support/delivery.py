"""Checks on what a subscriber received: sequence gaps, duplicates and simulator values."""

from __future__ import annotations

import math
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DeliveryReport:
    """What arrived, per reader epoch, and what is missing."""

    seqs_by_epoch: dict[int, set[int]] = field(default_factory=dict)
    duplicate_samples: int = 0
    duplicate_pages: int = 0
    value_errors: list[str] = field(default_factory=list)

    def gaps(self, epoch: int) -> list[int]:
        """Return the sequence numbers missing between 0 and the highest one received."""
        seqs = self.seqs_by_epoch.get(epoch, set())
        if not seqs:
            return []
        return [seq for seq in range(max(seqs) + 1) if seq not in seqs]

    def max_seq(self, epoch: int) -> int:
        return max(self.seqs_by_epoch.get(epoch, {-1}))


def _float32(value: float) -> float:
    result: float = struct.unpack(">f", struct.pack(">f", value))[0]
    return result


def check_simulator_values(reads: dict[tuple[int, int], dict[str, Any]]) -> list[str]:
    """Check each read of the simulator's fast block against the values it derives from tick.

    The simulator writes holding registers 0-4 from one tick counter in one step, so the
    counter, sine and check tags of one read must agree with each other.
    """
    errors = []
    for (epoch, ts_ms), values in reads.items():
        if "line1.counter" not in values:
            continue
        tick = values["line1.counter"]
        expected_sine = _float32(math.sin(tick / 100))
        if "line1.sine" in values and not math.isclose(
            values["line1.sine"], expected_sine, rel_tol=1e-6, abs_tol=1e-6
        ):
            errors.append(f"epoch {epoch} ts {ts_ms}: sine {values['line1.sine']} for tick {tick}")
        if "line1.check" in values and values["line1.check"] != (tick & 0xFFFF) ^ 0xA5A5:
            check = values["line1.check"]
            errors.append(f"epoch {epoch} ts {ts_ms}: check {check} for tick {tick}")
    return errors


def analyse(pages: list[tuple[int, list[dict[str, Any]]]]) -> DeliveryReport:
    """Build a report from (page_seq, samples) pairs in arrival order."""
    report = DeliveryReport()
    seen_pages: set[int] = set()
    reads: dict[tuple[int, int], dict[str, Any]] = defaultdict(dict)

    for page_seq, samples in pages:
        if page_seq in seen_pages:
            report.duplicate_pages += 1
        seen_pages.add(page_seq)
        for sample in samples:
            seqs = report.seqs_by_epoch.setdefault(sample["epoch"], set())
            if sample["seq"] in seqs:
                report.duplicate_samples += 1
            seqs.add(sample["seq"])
            if sample["quality"] == "good":
                reads[(sample["epoch"], sample["ts_ms"])][sample["name"]] = sample["value"]
            else:
                report.value_errors.append(f"bad sample {sample}")

    report.value_errors.extend(check_simulator_values(reads))
    return report
