"""Group-enrollment key derivation and `plcbridge derive-key`."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from cli.main import main
from common.dps_keys import check_registration_id, decode_key, derive_device_key
from common.errors import CredentialError

# The worked example of Microsoft's page "How to provision legacy devices using symmetric
# keys" (Azure IoT Hub Device Provisioning Service documentation): this group key and
# registration id give this device key.
EXAMPLE_GROUP_KEY = (
    "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=="
)
EXAMPLE_REGISTRATION_ID = "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6"
EXAMPLE_DEVICE_KEY = "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="


def test_derive_device_key_published_example() -> None:
    group_key = decode_key(EXAMPLE_GROUP_KEY)
    assert derive_device_key(group_key, EXAMPLE_REGISTRATION_ID) == EXAMPLE_DEVICE_KEY


def test_derive_key_command_published_example(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["derive-key", "--group-key", EXAMPLE_GROUP_KEY,
                 "--registration-id", EXAMPLE_REGISTRATION_ID])
    assert code == 0
    assert capsys.readouterr().out == EXAMPLE_DEVICE_KEY + "\n"


def test_derive_key_command_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "group.key"
    key_file.write_text(EXAMPLE_GROUP_KEY + "\n")
    code = main(["derive-key", "--group-key-file", str(key_file),
                 "--registration-id", EXAMPLE_REGISTRATION_ID])
    assert code == 0
    assert capsys.readouterr().out == EXAMPLE_DEVICE_KEY + "\n"


@pytest.mark.parametrize("registration_id", [
    "gw-01", "Site.7:line_3", "a" * 128, "22091017",
])
def test_derive_key_matches_openssl(registration_id: str) -> None:
    group_key = base64.b64decode(EXAMPLE_GROUP_KEY)
    result = subprocess.run(
        ["openssl", "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{group_key.hex()}",
         "-binary"],
        input=registration_id.encode(), capture_output=True, check=True, timeout=30,
    )
    expected = base64.b64encode(result.stdout).decode()
    assert derive_device_key(group_key, registration_id) == expected


@pytest.mark.parametrize(("registration_id", "reason"), [
    ("", "empty"),
    ("a" * 129, "129 characters"),
    ("gw 01", "' '"),
    ("gw/01", "'/'"),
    ("gérard", "'é'"),
])
def test_registration_id_invalid(registration_id: str, reason: str) -> None:
    with pytest.raises(CredentialError) as caught:
        check_registration_id(registration_id)
    assert reason in str(caught.value)
    assert "- . _ :" in str(caught.value)


def test_derive_key_command_bad_base64(capsys: pytest.CaptureFixture[str]) -> None:
    secret_like = "not*base64*but-a-secret"
    code = main(["derive-key", "--group-key", secret_like, "--registration-id", "gw-01"])
    error = capsys.readouterr().err
    assert code == 2
    assert "invalid --group-key: not base64" in error
    assert secret_like not in error


def test_derive_key_command_bad_registration_id(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["derive-key", "--group-key", EXAMPLE_GROUP_KEY, "--registration-id", "a b"])
    captured = capsys.readouterr()
    assert code == 2
    assert "invalid registration id 'a b'" in captured.err
    assert captured.out == ""


def test_derive_key_command_missing_file(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent.key"
    code = main(["derive-key", "--group-key-file", str(missing), "--registration-id", "gw-01"])
    assert code == 2
    assert f"{missing}: key file not found" in capsys.readouterr().err
