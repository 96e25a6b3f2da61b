"""Tests of the buffer and `plcbridge buffer` against damaged files and hostile input: a
garbage status file, broken store files and huge batches.

Real buffer processes on real LMDB files, driven over ZeroMQ as in tests/test_buffer.py.
"""

# The make_buffer and context fixtures come from tests.test_buffer, and ruff takes the test
# arguments that receive them for redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest

from cli.buffer import buffer as buffer_command
from tests.test_buffer import (  # noqa: F401 - make_buffer and context are fixtures
    BufferRun,
    context,
    make_buffer,
)

# -- plcbridge buffer ----------------------------------------------------------------------


def run_cli(run: BufferRun, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = buffer_command(argparse.Namespace(config=str(run.config_path), json=False))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


NOW_MS = int(time.time() * 1000)


@pytest.mark.parametrize("content, problem", [
    ("garbage", "not JSON"),
    ("[]", "expected a JSON object"),
    ('{"running": true, "pid": 1}', "ts_ms is None"),
    ('{"ts_ms": "x", "running": true, "pid": 1}', "ts_ms is 'x'"),
    ('{"ts_ms": 1e400, "running": true, "pid": 1}', "ts_ms is inf"),
    (f'{{"ts_ms": {NOW_MS}, "bytes": "a", "max_bytes": 5}}', "bytes is 'a'"),
    (f'{{"ts_ms": {NOW_MS}, "dropped_by_reason": [1]}}', "dropped_by_reason is [1]"),
    (f'{{"ts_ms": {NOW_MS}, "dropped_by_reason": {{"x": 5}}}}', "dropped_by_reason.x is 5"),
    (f'{{"ts_ms": {NOW_MS}, "pid": true}}', "pid is True"),
    (f'{{"ts_ms": {NOW_MS}, "gaps_open": [1]}}', "gaps_open is [1]"),
    (f'{{"ts_ms": {NOW_MS}, "oldest_ts_ms": -5}}', "oldest_ts_ms is -5"),
], ids=["garbage", "list", "no-ts", "text-ts", "infinite-ts", "text-bytes", "drops-list",
        "drop-number", "bool-pid", "gap-number", "negative-time"])
def test_buffer_cli_invalid_status_file(make_buffer, capsys, content, problem) -> None:
    run = make_buffer()
    run.runtime_dir.mkdir(parents=True)
    (run.runtime_dir / "buffer-status.json").write_text(content)
    code, out, err = run_cli(run, capsys)
    assert code == 1
    assert out == ""
    assert "is invalid" in err
    assert problem in err
    assert "Traceback" not in err


def test_buffer_cli_future_status_stale(make_buffer, capsys) -> None:
    # A status from before the clock went back, with this test's live pid: not running.
    run = make_buffer()
    run.runtime_dir.mkdir(parents=True)
    status = {"ts_ms": NOW_MS + 3_600_000, "running": True, "pid": os.getpid()}
    (run.runtime_dir / "buffer-status.json").write_text(json.dumps(status))
    code, out, err = run_cli(run, capsys)
    assert code == 1
    assert "not running" in err
    assert "away from the current time" in err
    assert "pid" in out


def test_buffer_cli_no_status_file(make_buffer, capsys) -> None:
    run = make_buffer()
    code, out, err = run_cli(run, capsys)
    assert code == 1
    assert out == ""
    assert "no status file" in err
    assert str(Path(run.runtime_dir) / "buffer-status.json") in err
