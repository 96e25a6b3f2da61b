"""Restart counting from supervisord's main log: the parser, on log text as supervisord 4.x
writes it."""

from __future__ import annotations

import time

from processes.uplink_restarts import restart_times_ms

PROGRAMS = {"buffer", "plc_reader", "uplink", "credential_watcher"}


def local_ms(text: str) -> int:
    seconds, milliseconds = text.split(",")
    return int(time.mktime(time.strptime(seconds, "%Y-%m-%d %H:%M:%S"))) * 1000 + int(
        milliseconds)


def test_restarts_skip_first_spawn_since_start() -> None:
    log = """\
2026-12-05 02:00:00,001 INFO supervisord started with pid 100
2026-12-05 02:00:01,002 INFO spawned: 'buffer' with pid 101
2026-12-05 02:00:01,500 INFO spawned: 'plc_reader' with pid 102
2026-12-05 02:00:02,600 INFO success: buffer entered RUNNING state, process has stayed up
2026-12-05 02:00:05,000 WARN exited: buffer (terminated by SIGKILL; not expected)
2026-12-05 02:00:05,010 INFO spawned: 'buffer' with pid 103
2026-12-05 02:00:05,700 INFO spawned: 'buffer' with pid 104
2026-12-05 02:00:06,250 INFO spawned: 'other' with pid 105
"""
    restarts = restart_times_ms(log, PROGRAMS)

    assert restarts["buffer"] == [local_ms("2026-12-05 02:00:05,010"),
                                  local_ms("2026-12-05 02:00:05,700")]
    assert restarts["plc_reader"] == []
    assert restarts["uplink"] == []
    assert "other" not in restarts


def test_restarts_counted_across_supervisord_runs() -> None:
    log = """\
2026-12-05 01:00:00,000 INFO supervisord started with pid 10
2026-12-05 01:00:01,000 INFO spawned: 'uplink' with pid 11
2026-12-05 01:00:09,000 INFO spawned: 'uplink' with pid 12
2026-12-05 01:00:20,000 INFO supervisord started with pid 20
2026-12-05 01:00:21,000 INFO spawned: 'uplink' with pid 21
"""
    restarts = restart_times_ms(log, PROGRAMS)

    assert restarts["uplink"] == [local_ms("2026-12-05 01:00:09,000")]


def test_restarts_tail_without_supervisord_start() -> None:
    # The tail begins in the middle of a line and after supervisord's start line, so every
    # spawn in it is a restart.
    log = """\
with pid 3 (a cut line)
2026-12-05 03:00:00,000 INFO spawned: 'credential_watcher' with pid 31
2026-12-05 03:00:00,100 INFO spawned: 'credential_watcher' with pid 32
"""
    restarts = restart_times_ms(log, PROGRAMS)

    assert len(restarts["credential_watcher"]) == 2
    assert restarts["buffer"] == []


def test_restarts_empty_log() -> None:
    assert restart_times_ms("", {"buffer"}) == {"buffer": []}
