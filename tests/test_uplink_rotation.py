"""The rotate_credentials command's handler: checks, install, and the stored result."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from common.config import Config, load_config
from common.rotation_outcomes import take_outcomes
from processes.uplink_rotation import PendingResults, RotationCommand, rotate_credentials
from tests.gateway_files import IDENTITY, GatewayFiles, write_ca, write_gateway

NEW_KEY = "cHVzaGVkLWRldmljZS1rZXktZm9yLXRoZS1yb3RhdGlvbg=="
LOGGER = logging.getLogger("plcbridge.test_rotation")


@pytest.fixture
def files(tmp_path: Path) -> GatewayFiles:
    return write_gateway(tmp_path, tmp_path / "run")


def config_of(files: GatewayFiles) -> Config:
    return load_config(files.config)


def test_push_installs_and_defers_result(files: GatewayFiles,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    pushed = f"{IDENTITY};SharedAccessKey={NEW_KEY}"

    result = rotate_credentials(config_of(files), "r-1", {"connection_string": pushed}, LOGGER)

    assert (result.status, result.deferred) == ("ok", True)
    assert files.connection_string.read_text() == pushed + "\n"
    pending = PendingResults(files.root / "state")
    assert pending.ready(started_s=0.0) == []
    [(path, body)] = pending.ready(started_s=time.time() + 1)
    document = json.loads(body)
    assert document["request_id"] == "r-1"
    assert document["command"] == "rotate_credentials"
    assert document["status"] == "ok"
    assert document["files"] == [str(files.connection_string)]
    assert document["credentials"]["scheme"] == "device key"
    assert NEW_KEY not in path.read_text()
    assert NEW_KEY not in caplog.text
    outcomes = take_outcomes(files.root / "state")
    assert [(o["source"], o["status"], o["request_id"]) for o in outcomes] == [
        ("cloud", "ok", "r-1")]


def test_push_rejected_answers_at_once(files: GatewayFiles) -> None:
    old = files.connection_string.read_bytes()

    result = rotate_credentials(
        config_of(files), "r-2",
        {"connection_string": f"HostName=elsewhere.example.net;DeviceId=d;"
                              f"SharedAccessKey={NEW_KEY}"}, LOGGER)

    assert (result.status, result.reason, result.deferred) == (
        "rejected", "credentials rejected", False)
    assert result.message.startswith("rotate_credentials argument connection_string: host "
                                     "'elsewhere.example.net' is not allowed")
    assert NEW_KEY not in result.message
    assert files.connection_string.read_bytes() == old
    assert PendingResults(files.root / "state").ready(started_s=time.time() + 1) == []


@pytest.mark.parametrize(("arguments", "message"), [
    ({}, "expected one or more of connection_string"),
    ({"connection_string": ""}, "connection_string must be a non-empty string"),
    ({"client_cert_pem": 5}, "client_cert_pem must be a non-empty string"),
    ({"password": "x"}, "unknown argument 'password'"),
])
def test_push_invalid_arguments(files: GatewayFiles, arguments: dict[str, object],
                                message: str) -> None:
    result = rotate_credentials(config_of(files), "r-3", arguments, LOGGER)

    assert (result.status, result.reason) == ("rejected", "invalid argument")
    assert message in result.message


def test_push_ca_bundle_rejected_by_default(files: GatewayFiles, tmp_path: Path) -> None:
    write_ca(tmp_path / "next.pem", "next root")

    result = rotate_credentials(config_of(files), "r-4",
                                {"ca_bundle_pem": (tmp_path / "next.pem").read_text()}, LOGGER)

    assert result.status == "rejected"
    assert "credentials.accept_pushed_ca_bundle is true" in result.message


def test_push_same_content_answers_at_once(files: GatewayFiles) -> None:
    current = files.connection_string.read_text().strip()

    result = rotate_credentials(config_of(files), "r-5", {"connection_string": current}, LOGGER)

    assert (result.status, result.deferred) == ("ok", False)
    assert "already installed" in result.message
    assert PendingResults(files.root / "state").ready(started_s=time.time() + 1) == []


def test_push_write_failure_answers_failed(files: GatewayFiles) -> None:
    old = files.connection_string.read_bytes()
    # A folder where the temporary file goes makes its open fail, even for root.
    (files.root / f".{files.connection_string.name}.{os.getpid()}.tmp").mkdir()

    result = rotate_credentials(config_of(files), "r-6",
                                {"connection_string": f"{IDENTITY};SharedAccessKey={NEW_KEY}"},
                                LOGGER)

    assert (result.status, result.reason, result.deferred) == ("failed", "install failed", False)
    assert f"cannot write a file in {files.root}: Is a directory" in result.message
    assert "the installed credential files are unchanged" in result.message
    assert files.connection_string.read_bytes() == old
    assert PendingResults(files.root / "state").ready(started_s=time.time() + 1) == []


def test_stored_result_kept_until_acknowledged(files: GatewayFiles) -> None:
    config = config_of(files)
    pushed = {"connection_string": f"{IDENTITY};SharedAccessKey={NEW_KEY}"}
    rotate_credentials(config, "r-7", pushed, LOGGER)
    # An uplink started later, as the one that the watcher restarts.
    command = RotationCommand(config, LOGGER, started_s=time.time() + 1)
    [stored] = PendingResults(files.root / "state").ready(started_s=time.time() + 1)

    [result] = command.stored_results()
    assert (result.request_id, result.command, result.status) == ("r-7", "rotate_credentials",
                                                                  "ok")
    assert result.details["files"] == [str(files.connection_string)]
    assert command.stored_results() == []
    assert stored[0].exists()

    command.acknowledged(json.dumps(result.body()).encode())

    assert not stored[0].exists()


def test_stored_result_on_last_good_fails(files: GatewayFiles) -> None:
    config = config_of(files)
    pushed = {"connection_string": f"{IDENTITY};SharedAccessKey={NEW_KEY}"}
    rotate_credentials(config, "r-8", pushed, LOGGER)
    command = RotationCommand(config, LOGGER, started_s=time.time() + 1)

    [result] = command.stored_results(on_last_good=True)

    assert (result.request_id, result.status) == ("r-8", "failed")
    assert result.reason == "credentials rejected"
    assert "last good" in result.message
    assert result.details["files"] == [str(files.connection_string)]


def test_push_lone_surrogate_names_argument(files: GatewayFiles) -> None:
    pushed = {"connection_string": f"{IDENTITY};SharedAccessKey={NEW_KEY}\ud800"}

    result = rotate_credentials(config_of(files), "r-9", pushed, LOGGER)

    assert (result.status, result.reason) == ("rejected", "invalid argument")
    assert "connection_string is not valid text" in result.message
    assert "position" not in result.message


def test_stored_result_not_an_object_skipped(files: GatewayFiles) -> None:
    folder = files.root / "state" / "command-results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "00000000000000000001-x.json").write_text('{"stored_s": 0, "body": [1, 2]}')
    command = RotationCommand(config_of(files), LOGGER, started_s=time.time() + 1)

    assert command.stored_results() == []
