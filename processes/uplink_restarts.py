"""The uplink's count of program restarts, from the spawns in supervisord's main log.

Sampling supervisord's process table every few seconds misses a program that restarts twice
between two samples, because only its latest pid is seen. supervisord 4.x logs one INFO
line for each spawn and one when it starts, in local time:

    2026-12-05 02:31:54,001 INFO supervisord started with pid 4240
    2026-12-05 02:31:55,123 INFO spawned: 'buffer' with pid 4242

Every spawn of a program after its first since supervisord started is one restart, whether
supervisord restarted it after an exit or an operator restarted it.
"""

from __future__ import annotations

import re
import time

# The tail of the log that is read at each poll. One restart writes three lines, exited,
# spawned and success, of about 270 bytes together, so this tail contains about 240
# restarts. Reading and parsing it blocks the uplink's main loop for a few milliseconds:
# a median of 6 ms on the loaded 2-core machine of docs/benchmarks.md.
LOG_TAIL_BYTES = 65_536

_TIMESTAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})"
_SPAWNED = re.compile(_TIMESTAMP + r" \w+ spawned: '([^']+)' with pid \d+")
_SUPERVISORD_STARTED = re.compile(_TIMESTAMP + r" \w+ supervisord started with pid \d+")


def restart_times_ms(log_tail: str, programs: set[str]) -> dict[str, list[int]]:
    """Return the Unix time in milliseconds of each restart of each program, oldest first.

    When the tail does not reach back to supervisord's start, every spawn in it counts as
    a restart, because the programs' first spawns lie before the tail.
    """
    restarts: dict[str, list[int]] = {name: [] for name in programs}
    spawned_since_start: set[str] | None = None
    for line in log_tail.splitlines():
        if _SUPERVISORD_STARTED.match(line):
            spawned_since_start = set()
            continue
        match = _SPAWNED.match(line)
        if match is None or match[3] not in programs:
            continue
        name = match[3]
        if spawned_since_start is not None and name not in spawned_since_start:
            spawned_since_start.add(name)
            continue
        restarts[name].append(_local_time_ms(match[1], match[2]))
    return restarts


def _local_time_ms(seconds_text: str, milliseconds_text: str) -> int:
    # supervisord writes its log with time.localtime, and the uplink runs on the same host.
    seconds = time.mktime(time.strptime(seconds_text, "%Y-%m-%d %H:%M:%S"))
    return int(seconds) * 1000 + int(milliseconds_text)
