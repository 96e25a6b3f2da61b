"""Outcomes of credential rotations, handed from the rotating command to the credential watcher.

`plcbridge rotate` and the uplink's rotate_credentials command each store the outcome of a
rotation as one JSON file in <state_dir>/rotations/. The credential watcher publishes every
file it finds there on its tap as a `rotation` event and deletes it, so the outcome of a
rotation appears on the same tap as the restart it causes. An outcome never holds a key, a
token or a signature: it names the files, the source and the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from common.atomic_file import write_atomically
from common.credentials import read_regular_file

OUTCOME_FOLDER = "rotations"

# Outcomes kept while no watcher collects them; older ones are deleted first.
MAX_KEPT_OUTCOMES = 100


def outcome_folder(state_dir: Path) -> Path:
    return state_dir / OUTCOME_FOLDER


def record_outcome(state_dir: Path, outcome: dict[str, Any]) -> None:
    """Store one outcome for the watcher's tap. Raises OSError when it cannot be written."""
    folder = outcome_folder(state_dir)
    folder.mkdir(parents=True, exist_ok=True)

    # The name sorts by time, and the process id keeps two writers apart.
    path = folder / f"{time.time_ns():020d}-{os.getpid()}.json"
    data = json.dumps({"ts_ms": int(time.time() * 1000), **outcome}).encode()
    write_atomically(path, data + b"\n")

    for stale in _outcome_files(folder)[:-MAX_KEPT_OUTCOMES]:
        with contextlib.suppress(OSError):
            stale.unlink()


def take_outcomes(state_dir: Path) -> list[dict[str, Any]]:
    """Return the stored outcomes, oldest first, and delete them.

    A file that is not a JSON object comes back as an outcome with status "unreadable", so
    that a damaged record is reported instead of lost silently.
    """
    outcomes = []
    for path in _outcome_files(outcome_folder(state_dir)):
        try:
            outcome = json.loads(read_regular_file(path))
            if not isinstance(outcome, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            outcome = {"status": "unreadable", "reason": f"{path}: {exc}"}
        with contextlib.suppress(OSError):
            path.unlink()
        outcomes.append(outcome)
    return outcomes


def _outcome_files(folder: Path) -> list[Path]:
    try:
        names = sorted(name for name in os.listdir(folder)
                       if name.endswith(".json") and not name.startswith("."))
    except OSError:
        return []
    return [folder / name for name in names]
