"""The uplink's choice of credential set after a rejection, on real files and a real store."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.config import Config, load_config
from common.last_good_credentials import LastGoodStore, read_snapshot
from processes.uplink import Identity, load_identity
from processes.uplink_fallback import EARLY_CLOSES_AS_REJECTION, CredentialSets
from tests.gateway_files import (
    GatewayFiles,
    device_key_string,
    make_runtime_dir,
    sas_token_string,
    write_client_pair,
    write_gateway,
)

LOGGER = logging.getLogger("test_uplink_fallback")
REJECTED = "broker 127.0.0.1:1502 refused the connection: CONNACK 'Not authorized'"


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    folder = make_runtime_dir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Reports:
    """Collects the tap events that CredentialSets reports."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, **values: Any) -> None:
        self.events.append((kind, values))

    def kinds(self) -> list[str]:
        return [kind for kind, _values in self.events]


def make_sets(files: GatewayFiles, reports: Reports) -> tuple[CredentialSets, Config]:
    config = load_config(files.config)
    identity = load_identity(config, LOGGER)
    snapshot = read_snapshot(config.credentials)
    return CredentialSets(config, LOGGER, lambda other: load_identity(other, LOGGER), identity,
                          snapshot, reports), config


def connected_then_rotated(tmp_path: Path, runtime_dir: Path, rotated: str,
                           credentials_extra: str = "", first: str | None = None,
                           ) -> tuple[CredentialSets, Reports]:
    """Connect with the first connection string, then start a new run with the rotated one."""
    files = write_gateway(tmp_path, runtime_dir, credentials_extra)
    if first is not None:
        files.connection_string.write_text(first + "\n")
    sets, _config = make_sets(files, Reports())
    sets.on_accepted()

    files.connection_string.write_text(rotated + "\n")
    reports = Reports()
    sets, _config = make_sets(files, reports)
    return sets, reports


def test_fallback_chosen_for_rejected_rotation(tmp_path: Path, runtime_dir: Path) -> None:
    sets, reports = connected_then_rotated(tmp_path, runtime_dir, device_key_string([]))

    choice = sets.after_failure(REJECTED, time.time())

    assert choice is not None
    assert choice.last_good
    assert choice.at_once
    assert sets.on_last_good
    assert isinstance(choice.identity, Identity)
    assert choice.identity.ca_file is not None
    assert "credentials-last-good" in str(choice.identity.ca_file)
    assert reports.kinds() == ["rotation_rejected"]
    values = reports.events[0][1]
    assert values["fallback"] == "last_good"
    assert values["files"] == [str(tmp_path / "connection-string.txt")]
    assert REJECTED in values["detail"]


def test_fallback_reported_once_per_run(tmp_path: Path, runtime_dir: Path) -> None:
    sets, reports = connected_then_rotated(tmp_path, runtime_dir, device_key_string([]))
    sets.after_failure(REJECTED, time.time())
    # The last good set is rejected too: back to the current files, after the backoff.
    back = sets.after_failure(REJECTED, time.time())

    again = sets.after_failure(REJECTED, time.time())

    assert back is not None
    assert not back.last_good
    assert not back.at_once
    assert again is not None
    assert again.last_good
    assert reports.kinds() == ["rotation_rejected", "last_good_rejected"]


def test_fallback_off_retries_current(tmp_path: Path, runtime_dir: Path) -> None:
    sets, reports = connected_then_rotated(tmp_path, runtime_dir, device_key_string([]),
                                           "fallback_to_last_good = false")

    choice = sets.after_failure(REJECTED, time.time())

    assert choice is None
    assert not sets.on_last_good
    assert reports.kinds() == ["rotation_rejected"]
    values = reports.events[0][1]
    assert values["fallback"] == "off"
    assert "credentials.fallback_to_last_good is false" in values["detail"]
    assert "retries them with its backoff" in values["detail"]


def test_fallback_skipped_for_expired_token(tmp_path: Path, runtime_dir: Path) -> None:
    expired = sas_token_string([], int(time.time()) - 7200)
    sets, reports = connected_then_rotated(tmp_path, runtime_dir, device_key_string([]),
                                           first=expired)

    choice = sets.after_failure(REJECTED, time.time())

    assert choice is None
    values = reports.events[0][1]
    assert values["fallback"] == "unusable"
    assert "the last good SAS token has expired" in values["detail"]


def test_fallback_skipped_for_same_set(tmp_path: Path, runtime_dir: Path) -> None:
    files = write_gateway(tmp_path, runtime_dir)
    reports = Reports()
    sets, _config = make_sets(files, reports)
    sets.on_accepted()

    choice = sets.after_failure(REJECTED, time.time())

    assert choice is None
    # Not a rotation: the uplink's credentials_rejected report covers it.
    assert reports.kinds() == ["last_good_saved"]


def test_fallback_skipped_without_store(tmp_path: Path, runtime_dir: Path) -> None:
    files = write_gateway(tmp_path, runtime_dir)
    reports = Reports()
    sets, _config = make_sets(files, reports)

    assert sets.after_failure(REJECTED, time.time()) is None
    assert reports.kinds() == []


def test_fallback_skipped_for_damaged_store(tmp_path: Path, runtime_dir: Path) -> None:
    sets, reports = connected_then_rotated(tmp_path, runtime_dir, device_key_string([]))
    stored = LastGoodStore(tmp_path / "state").load()
    assert stored is not None
    stored.files["ca_file"].copy.write_text("changed\n")

    assert sets.after_failure(REJECTED, time.time()) is None
    # Without a readable last good set the rejected files are unknown.
    assert reports.kinds() == []


def test_accepted_rotation_becomes_last_good(tmp_path: Path, runtime_dir: Path) -> None:
    rotated = device_key_string([])
    sets, _reports = connected_then_rotated(tmp_path, runtime_dir, rotated)

    sets.on_accepted()

    stored = LastGoodStore(tmp_path / "state").load()
    assert stored is not None
    assert stored.files["connection_string_file"].copy.read_text() == rotated + "\n"


def test_fallback_connect_not_saved(tmp_path: Path, runtime_dir: Path) -> None:
    rotated = device_key_string([])
    sets, _reports = connected_then_rotated(tmp_path, runtime_dir, rotated)
    sets.after_failure(REJECTED, time.time())

    sets.on_accepted()

    stored = LastGoodStore(tmp_path / "state").load()
    assert stored is not None
    assert stored.files["connection_string_file"].copy.read_text() != rotated + "\n"


@pytest.mark.parametrize("certificate_changed", [True, False])
def test_early_closes_count_after_new_certificate(tmp_path: Path, runtime_dir: Path,
                                                  certificate_changed: bool) -> None:
    root = tmp_path / "gateway"
    root.mkdir()
    cert, key = root / "device.pem", root / "device.key"
    write_client_pair(cert, key)
    extra = f'client_cert_file = "{cert}"\nclient_key_file = "{key}"'
    files = write_gateway(root, runtime_dir, extra)
    sets, _config = make_sets(files, Reports())
    sets.on_accepted()
    if certificate_changed:
        write_client_pair(cert, key)
    else:
        files.connection_string.write_text(device_key_string([]) + "\n")
    sets, _config = make_sets(files, Reports())

    choices = [sets.after_early_close("closed before CONNACK", time.time())
               for _attempt in range(EARLY_CLOSES_AS_REJECTION)]

    assert choices[:-1] == [None] * (EARLY_CLOSES_AS_REJECTION - 1)
    if certificate_changed:
        assert choices[-1] is not None
        assert choices[-1].last_good
    else:
        assert choices[-1] is None
