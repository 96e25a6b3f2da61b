"""validate_credential_files and check_sas_expiry on real PEM files and connection strings."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from common.config import load_config
from common.credential_files import (
    CredentialFileError,
    check_readable,
    check_sas_expiry,
    count_root_certificates,
    validate_credential_files,
)
from tests.gateway_files import (
    DEVICE,
    GatewayFiles,
    sas_token_string,
    write_ca,
    write_client_pair,
    write_gateway,
)

PAIR = 'client_cert_file = "client.pem"\nclient_key_file = "client.key"\n'


def gateway(tmp_path: Path, credentials_extra: str = "") -> GatewayFiles:
    return write_gateway(tmp_path, tmp_path / "run", credentials_extra=credentials_extra)


def validation_error(files: GatewayFiles) -> CredentialFileError:
    config = load_config(files.config)
    with pytest.raises(CredentialFileError) as caught:
        validate_credential_files(config.credentials)
    return caught.value


def test_credential_files_valid_set_loaded(tmp_path: Path) -> None:
    files = gateway(tmp_path, PAIR)
    write_client_pair(tmp_path / "client.pem", tmp_path / "client.key")
    with files.ca.open("a") as bundle:
        bundle.write((tmp_path / "client.pem").read_text())

    loaded = validate_credential_files(load_config(files.config).credentials)

    assert loaded.connection is not None
    assert loaded.connection.scheme == "device key"
    assert loaded.ca_certificate_count == 2
    assert loaded.client_certificate is not None
    assert loaded.client_certificate.subject == f"CN={DEVICE}"
    expected = x509.load_pem_x509_certificate((tmp_path / "client.pem").read_bytes())
    assert loaded.client_certificate.not_after == expected.not_valid_after_utc


def test_credential_files_ca_folder_rejected(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    files.ca.unlink()
    files.ca.mkdir()

    error = validation_error(files)

    assert error.path == files.ca
    assert error.reason == "CA file is a folder; expected a file"


def test_credential_files_ca_without_certificate(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    files.ca.write_text("just text\n")

    assert validation_error(files).reason == "CA file contains no PEM certificate"


def test_credential_files_ca_missing(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    files.ca.unlink()

    error = validation_error(files)

    assert str(error) == f"{files.ca}: CA file not found"


def test_credential_files_key_mismatch_names_key(tmp_path: Path) -> None:
    files = gateway(tmp_path, PAIR)
    write_client_pair(tmp_path / "client.pem", tmp_path / "other.key")
    write_client_pair(tmp_path / "other.pem", tmp_path / "client.key")

    error = validation_error(files)

    assert error.path == tmp_path / "client.key"
    assert "does not match the client certificate" in error.reason


def test_credential_files_garbled_key_rejected(tmp_path: Path) -> None:
    files = gateway(tmp_path, PAIR)
    write_client_pair(tmp_path / "client.pem", tmp_path / "client.key")
    (tmp_path / "client.key").write_text(
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    )

    error = validation_error(files)

    assert error.path == tmp_path / "client.key"
    assert error.reason.startswith("client key file is not a valid PEM private key")


def test_credential_files_key_without_pem_block(tmp_path: Path) -> None:
    files = gateway(tmp_path, PAIR)
    write_client_pair(tmp_path / "client.pem", tmp_path / "client.key")
    (tmp_path / "client.key").write_text("paste the key here\n")

    error = validation_error(files)

    assert error.path == tmp_path / "client.key"
    assert error.reason.startswith("client key file is not a valid PEM private key")
    assert "contains no -----BEGIN PRIVATE KEY----- block" in error.reason


def test_credential_files_encrypted_key_rejected(tmp_path: Path) -> None:
    files = gateway(tmp_path, PAIR)
    write_client_pair(tmp_path / "client.pem", tmp_path / "client.key")
    key = serialization.load_pem_private_key((tmp_path / "client.key").read_bytes(), None)
    (tmp_path / "client.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    ))

    # Without its password callback, the check would prompt for a passphrase instead.
    error = validation_error(files)

    assert error.path == tmp_path / "client.key"
    assert error.reason.startswith("client key is encrypted; set "
                                   "credentials.client_key_passphrase_file")


def test_credential_files_key_type_mismatch(tmp_path: Path) -> None:
    files = gateway(tmp_path, PAIR)
    write_client_pair(tmp_path / "client.pem", tmp_path / "client.key")
    rsa_key = rsa.generate_private_key(65537, 2048)
    (tmp_path / "client.key").write_bytes(rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ))

    error = validation_error(files)

    assert error.path == tmp_path / "client.key"
    assert "does not match the client certificate" in error.reason


def test_credential_files_bundle_names_bad_line(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    good = files.ca.read_text()
    bad = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    files.ca.write_text(good + "# second root\n" + bad)
    bad_line = good.count("\n") + 2

    error = validation_error(files)

    assert error.path == files.ca
    assert error.reason.startswith(
        f"CA file contains an invalid PEM certificate: the certificate at line {bad_line} "
        "is not a valid X.509 certificate (OpenSSL: "
    )


def test_credential_files_ca_bad_base64_named(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    files.ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")

    error = validation_error(files)

    assert "the certificate at line 1 is not valid base64" in error.reason


def test_credential_files_x509_needs_client_pair(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    files.connection_string.write_text("HostName=h.example.net;DeviceId=d;x509=true\n")

    error = validation_error(files)

    assert error.path == files.connection_string
    assert "x509=true" in error.reason


def test_credential_files_password_file_one_line(tmp_path: Path) -> None:
    files = gateway(tmp_path, 'password_file = "password.txt"\n')
    (tmp_path / "password.txt").write_text("\n\n")

    error = validation_error(files)

    assert error.reason == "expected one line holding the MQTT password"


def test_credential_files_pasted_key_masked(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    bare_key = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVowMTIzNDU2Nzg5"
    files.connection_string.write_text(f"HostName=h;DeviceId=d;{bare_key}\n")

    error = validation_error(files)

    assert bare_key not in str(error)
    assert "not shown" in error.reason


def test_credential_files_short_names_kept(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    files.connection_string.write_text("HostName=h;DeviceId=d;Hostname=x;SharedAccessKey=QUJD\n")

    assert "unknown key 'Hostname'" in validation_error(files).reason


@pytest.mark.parametrize(
    ("expiry_in_s", "state", "wording"),
    [
        (30 * 86400, "valid", "valid until"),
        (2 * 86400, "warning", "might be outdated"),
        (-60, "expired", "expired or the clock is wrong"),
    ],
)
def test_sas_expiry_states(tmp_path: Path, expiry_in_s: int, state: str, wording: str) -> None:
    files = gateway(tmp_path)
    now = time.time()
    files.connection_string.write_text(sas_token_string([], int(now) + expiry_in_s) + "\n")
    config = load_config(files.config)
    loaded = validate_credential_files(config.credentials)

    expiry = check_sas_expiry(loaded.connection, config.credentials, config.uplink, now_s=now)

    assert expiry.state == state
    assert wording in expiry.message
    assert f"se={int(now) + expiry_in_s} (" in expiry.message
    assert f"now={int(now)} (" in expiry.message


def test_sas_expiry_device_key_names_ttl(tmp_path: Path) -> None:
    config = load_config(gateway(tmp_path).config)
    loaded = validate_credential_files(config.credentials)

    expiry = check_sas_expiry(loaded.connection, config.credentials, config.uplink)

    assert expiry.state == "valid"
    assert expiry.expiry_s is None
    assert "uplink.sas_ttl_s=3600" in expiry.message


def test_credential_files_other_ca_accepted(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    write_ca(files.ca, common_name="another root")

    loaded = validate_credential_files(load_config(files.config).credentials)

    assert loaded.ca_certificate_count == 1


def test_credential_files_roots_counted(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    write_ca(tmp_path / "root.pem")
    write_client_pair(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    bundle.write_text((tmp_path / "root.pem").read_text() + (tmp_path / "leaf.pem").read_text())

    assert count_root_certificates(bundle) == 1
    # A self-signed certificate without basicConstraints CA:TRUE is no CA for OpenSSL.
    assert count_root_certificates(tmp_path / "leaf.pem") == 0


def test_credential_files_root_count_in_set(tmp_path: Path) -> None:
    files = gateway(tmp_path)

    loaded = validate_credential_files(load_config(files.config).credentials)

    assert loaded.ca_root_count == 1


def test_credential_files_mode_0000_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "connection-string.txt"
    path.write_text("x\n")
    path.chmod(0o000)

    with pytest.raises(CredentialFileError) as caught:
        check_readable(path)

    assert caught.value.path == path
    assert "mode 0000" in caught.value.reason
    assert f"uid {os.geteuid()}" in caught.value.reason


def test_credential_files_mode_0600_readable(tmp_path: Path) -> None:
    path = tmp_path / "connection-string.txt"
    path.write_text("x\n")
    path.chmod(0o600)

    check_readable(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_credential_files_other_owner_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "connection-string.txt"
    path.write_text("x\n")
    path.chmod(0o600)
    os.chown(path, 65534, 65534)

    with pytest.raises(CredentialFileError) as caught:
        check_readable(path)

    assert "owned by uid 65534" in caught.value.reason
    assert "mode 0600" in caught.value.reason
