"""`plcbridge rotate`, run through the installed entry point, and the install rules it uses."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from common.config import load_config
from common.credential_install import (
    FROM_CLI,
    FROM_CLOUD,
    Candidate,
    RotationRejectedError,
    install_credentials,
)
from common.errors import ConfigError
from common.rotation_outcomes import take_outcomes
from tests.gateway_files import (
    HUB,
    IDENTITY,
    GatewayFiles,
    sas_token_string,
    write_ca,
    write_client_pair,
)
from tests.test_cli_credentials import PAIR, gateway, plcbridge

NEW_KEY = "bmV3LWRldmljZS1rZXktZm9yLXRoZS1yb3RhdGlvbg=="


def rotate(files: GatewayFiles, *args: str) -> subprocess.CompletedProcess[str]:
    return plcbridge("rotate", "--config", str(files.config), *args)


def outcomes(files: GatewayFiles) -> list[dict[str, object]]:
    return take_outcomes(files.root / "state")


def assert_rejected(result: subprocess.CompletedProcess[str], new_file: Path, reason: str,
                    kept: dict[Path, bytes]) -> None:
    """Exit 2, one error naming the new file and the reason, and every old file kept."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.startswith(f"plcbridge rotate: {new_file}: "), result.stderr
    assert reason in result.stderr
    assert "the installed credential files are unchanged" in result.stderr
    for path, data in kept.items():
        assert path.read_bytes() == data
    folders = {path.parent for path in kept}
    temporaries = [entry for folder in folders for entry in folder.iterdir()
                   if entry.name.endswith(".tmp")]
    assert temporaries == []


def test_rotate_keeps_mode_and_owner(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    os.chmod(files.connection_string, 0o640)
    os.chown(files.connection_string, 4321, 4322)
    inode = files.connection_string.stat().st_ino
    new = tmp_path / "new.txt"
    new.write_text(f"{IDENTITY};SharedAccessKey={NEW_KEY}\n")

    result = rotate(files, "--connection-string-file", str(new))

    assert result.returncode == 0, result
    assert files.connection_string.read_bytes() == new.read_bytes()
    installed = files.connection_string.stat()
    assert (installed.st_mode & 0o7777, installed.st_uid, installed.st_gid) == (0o640, 4321, 4322)
    # A new inode: the file was renamed into place, never rewritten where it stood.
    assert installed.st_ino != inode
    assert f"installed {files.connection_string}" in result.stdout
    assert "device gw-test-01, host hub.example.net, scheme device key" in result.stdout
    assert NEW_KEY not in result.stdout + result.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    recorded = outcomes(files)
    assert [(o["source"], o["status"], o["files"]) for o in recorded] == [
        ("cli", "ok", [str(files.connection_string)])]


def test_rotate_same_content_changes_nothing(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    inode = files.connection_string.stat().st_ino
    new = tmp_path / "same.txt"
    new.write_bytes(files.connection_string.read_bytes())

    result = rotate(files, "--connection-string-file", str(new))

    assert result.returncode == 0, result
    assert f"unchanged {files.connection_string}" in result.stdout
    assert "the uplink is not restarted" in result.stdout
    assert files.connection_string.stat().st_ino == inode


def test_rotate_rejects_malformed_connection_string(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    old = files.connection_string.read_bytes()
    new = tmp_path / "new.txt"
    new.write_text(f"{IDENTITY};SharedAccessKey=not*base64\n")

    result = rotate(files, "--connection-string-file", str(new))

    assert_rejected(result, new, "invalid SharedAccessKey: not base64",
                    {files.connection_string: old})
    assert "not*base64" not in result.stderr
    recorded = outcomes(files)
    assert [(o["source"], o["status"]) for o in recorded] == [("cli", "rejected")]
    assert str(new) in str(recorded[0]["reason"])


def test_rotate_rejects_host_outside_allow_list(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    old = files.connection_string.read_bytes()
    new = tmp_path / "new.txt"
    new.write_text(f"HostName=other.example.net;DeviceId=gw-test-01;SharedAccessKey={NEW_KEY}\n")

    result = rotate(files, "--connection-string-file", str(new))

    assert_rejected(result, new, "host 'other.example.net' is not allowed (the hosts of the "
                    f"installed {files.connection_string}: 127.0.0.1, {HUB})",
                    {files.connection_string: old})


def test_rotate_rejects_gateway_host_outside_list(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    old = files.connection_string.read_bytes()
    new = tmp_path / "new.txt"
    new.write_text(f"HostName={HUB};DeviceId=gw-test-01;GatewayHostName=edge.example.net;"
                   f"SharedAccessKey={NEW_KEY}\n")

    result = rotate(files, "--connection-string-file", str(new))

    assert_rejected(result, new, "host 'edge.example.net' is not allowed",
                    {files.connection_string: old})


def test_rotate_allowed_hosts_admits_new_hub(tmp_path: Path) -> None:
    files = gateway(tmp_path, 'allowed_hosts = ["Other.Example.NET"]\n')
    new = tmp_path / "new.txt"
    new.write_text(f"HostName=other.example.net;DeviceId=gw-test-01;SharedAccessKey={NEW_KEY}\n")

    result = rotate(files, "--connection-string-file", str(new))

    assert result.returncode == 0, result
    assert files.connection_string.read_bytes() == new.read_bytes()


def test_rotate_rejects_expired_sas_token(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    old = files.connection_string.read_bytes()
    new = tmp_path / "new.txt"
    new.write_text(sas_token_string([], expiry_s=1_600_000_000) + "\n")

    result = rotate(files, "--connection-string-file", str(new))

    assert_rejected(result, new, "SAS token expired or the clock is wrong: se=1600000000",
                    {files.connection_string: old})


def test_rotate_new_key_gets_0600(tmp_path: Path) -> None:
    files = gateway(tmp_path, PAIR)
    write_client_pair(tmp_path / "client.pem", tmp_path / "client.key")
    (tmp_path / "client.key").unlink()
    write_client_pair(tmp_path / "new.pem", tmp_path / "new.key")
    os.chmod(tmp_path / "new.key", 0o644)

    result = rotate(files, "--client-cert-file", str(tmp_path / "new.pem"),
                    "--client-key-file", str(tmp_path / "new.key"))

    assert result.returncode == 0, result
    assert (tmp_path / "client.key").read_bytes() == (tmp_path / "new.key").read_bytes()
    assert (tmp_path / "client.key").stat().st_mode & 0o7777 == 0o600
    assert "client_certificate CN=gw-test-01" in result.stdout
    assert "PRIVATE KEY" not in result.stdout + result.stderr


def test_rotate_rejects_certificate_for_other_key(tmp_path: Path) -> None:
    files = gateway(tmp_path, PAIR)
    write_client_pair(tmp_path / "client.pem", tmp_path / "client.key")
    write_client_pair(tmp_path / "new.pem", tmp_path / "new.key")
    kept = {tmp_path / name: (tmp_path / name).read_bytes() for name in ("client.pem",
                                                                          "client.key")}

    result = rotate(files, "--client-cert-file", str(tmp_path / "new.pem"))

    assert_rejected(result, tmp_path / "new.pem",
                    f"private key does not match the client certificate {tmp_path / 'new.pem'}",
                    kept)


def test_rotate_rejects_mismatched_pair(tmp_path: Path) -> None:
    files = gateway(tmp_path, PAIR)
    write_client_pair(tmp_path / "client.pem", tmp_path / "client.key")
    write_client_pair(tmp_path / "new.pem", tmp_path / "unused.key")
    write_client_pair(tmp_path / "unused.pem", tmp_path / "new.key")
    kept = {tmp_path / name: (tmp_path / name).read_bytes() for name in ("client.pem",
                                                                          "client.key")}

    result = rotate(files, "--client-cert-file", str(tmp_path / "new.pem"),
                    "--client-key-file", str(tmp_path / "new.key"))

    assert_rejected(result, tmp_path / "new.key", "private key does not match the client "
                    f"certificate {tmp_path / 'new.pem'}", kept)


def test_rotate_rejects_expired_certificate(tmp_path: Path) -> None:
    files = gateway(tmp_path, PAIR)
    write_client_pair(tmp_path / "client.pem", tmp_path / "client.key")
    write_client_pair(tmp_path / "new.pem", tmp_path / "new.key", expired=True)
    kept = {tmp_path / name: (tmp_path / name).read_bytes() for name in ("client.pem",
                                                                          "client.key")}

    result = rotate(files, "--client-cert-file", str(tmp_path / "new.pem"),
                    "--client-key-file", str(tmp_path / "new.key"))

    assert_rejected(result, tmp_path / "new.pem",
                    "client certificate CN=gw-test-01 expired or the clock is wrong: "
                    "notAfter=1625054400 (2021-06-30T12:00:00Z)", kept)


def test_rotate_rejects_unreadable_new_file(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    old = files.connection_string.read_bytes()

    result = rotate(files, "--connection-string-file", str(tmp_path / "missing.txt"))

    assert result.returncode == 2, result
    assert f"{tmp_path / 'missing.txt'}: new connection string file not found" in result.stderr
    assert files.connection_string.read_bytes() == old


def test_rotate_rejects_key_without_certificate(tmp_path: Path) -> None:
    files = gateway(tmp_path, PAIR)

    result = rotate(files, "--connection-string-file", str(files.connection_string),
                    "--client-key-file", str(tmp_path / "new.key"))

    assert result.returncode == 2, result
    assert "--client-key-file goes with --client-cert-file" in result.stderr


def test_rotate_cli_installs_ca_bundle(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    write_ca(tmp_path / "new-ca.pem", "next root")

    result = rotate(files, "--ca-bundle-file", str(tmp_path / "new-ca.pem"))

    assert result.returncode == 0, result
    assert files.ca.read_bytes() == (tmp_path / "new-ca.pem").read_bytes()


def test_rotate_rejects_ca_bundle_without_certificate(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    old = files.ca.read_bytes()
    (tmp_path / "new-ca.pem").write_text("not a certificate\n")

    result = rotate(files, "--ca-bundle-file", str(tmp_path / "new-ca.pem"))

    assert_rejected(result, tmp_path / "new-ca.pem", "CA file contains no PEM certificate",
                    {files.ca: old})


@pytest.mark.parametrize("accepted", [False, True])
def test_install_pushed_ca_bundle_needs_the_key(tmp_path: Path, accepted: bool) -> None:
    files = gateway(tmp_path, f"accept_pushed_ca_bundle = {str(accepted).lower()}\n")
    settings = load_config(files.config).credentials
    old = files.ca.read_bytes()
    write_ca(tmp_path / "new-ca.pem", "next root")
    candidate = Candidate("ca_bundle", "ca_bundle_pem", (tmp_path / "new-ca.pem").read_bytes())

    if not accepted:
        with pytest.raises(RotationRejectedError) as caught:
            install_credentials(settings, [candidate], FROM_CLOUD)
        assert caught.value.source == "ca_bundle_pem"
        assert "credentials.accept_pushed_ca_bundle is true" in caught.value.reason
        assert files.ca.read_bytes() == old
        return
    result = install_credentials(settings, [candidate], FROM_CLOUD)
    assert result.changed == (files.ca,)


def test_install_rejects_unconfigured_file(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    settings = load_config(files.config).credentials
    candidate = Candidate("client_cert", "client_cert_pem", b"x")

    with pytest.raises(RotationRejectedError) as caught:
        install_credentials(settings, [candidate], FROM_CLI)

    assert "credentials.client_cert_file is not set" in caught.value.reason


def test_outcomes_taken_once_in_order(tmp_path: Path) -> None:
    from common.rotation_outcomes import record_outcome

    record_outcome(tmp_path, {"source": "cli", "status": "ok"})
    record_outcome(tmp_path, {"source": "cloud", "status": "rejected"})
    (tmp_path / "rotations" / "99999999999999999999-1.json").write_text("[")

    taken = take_outcomes(tmp_path)

    assert [o["status"] for o in taken] == ["ok", "rejected", "unreadable"]
    assert take_outcomes(tmp_path) == []
    assert json.dumps(taken)


@pytest.mark.parametrize("value", ['"hub.example.net"', '["hub example.net"]', "[1]", '[""]'])
def test_config_rejects_invalid_allowed_hosts(tmp_path: Path, value: str) -> None:
    files = gateway(tmp_path, f"allowed_hosts = {value}\n")

    with pytest.raises(ConfigError) as caught:
        load_config(files.config)

    assert "invalid value for credentials.allowed_hosts" in str(caught.value)
    assert "expected an array of host names" in str(caught.value)
