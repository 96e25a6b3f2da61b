"""`plcbridge sas` and `plcbridge check-credentials`, run through the installed entry point."""

from __future__ import annotations

import base64
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.credentials import mint_sas_token, parse_sas_token
from tests.gateway_files import (
    DEVICE,
    HUB,
    GatewayFiles,
    sas_token_string,
    write_client_pair,
    write_gateway,
)

PLCBRIDGE = Path(sys.executable).parent / "plcbridge"
KEY_TEXT = "++//cGxjYnJpZGdlLWtleQ=="
PAIR = 'client_cert_file = "client.pem"\nclient_key_file = "client.key"\n'


def plcbridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PLCBRIDGE), *args], capture_output=True, text=True,
                          timeout=20, check=False)


def gateway(tmp_path: Path, credentials_extra: str = "") -> GatewayFiles:
    return write_gateway(tmp_path, tmp_path / "run", credentials_extra=credentials_extra)


def write_key_string(path: Path, extra: str = "") -> None:
    path.write_text(f"HostName={HUB};DeviceId={DEVICE};SharedAccessKey={KEY_TEXT}{extra}\n")


def test_sas_prints_token_with_ttl(tmp_path: Path) -> None:
    write_key_string(tmp_path / "cs.txt")
    before = int(time.time())

    result = plcbridge("sas", "--connection-string-file", str(tmp_path / "cs.txt"),
                       "--ttl", "120")

    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    token = parse_sas_token(lines[0])
    assert token.resource == f"{HUB}/devices/{DEVICE}"
    assert before + 120 <= token.expiry_s <= int(time.time()) + 120
    assert KEY_TEXT not in result.stdout + result.stderr
    assert f"se={token.expiry_s}" in result.stderr


def test_sas_expiry_signs_module(tmp_path: Path) -> None:
    write_key_string(tmp_path / "cs.txt", ";ModuleId=m1;GatewayHostName=edge.local")

    result = plcbridge("sas", "--connection-string-file", str(tmp_path / "cs.txt"),
                       "--expiry", "4102444800")

    assert result.returncode == 0, result
    token = parse_sas_token(result.stdout.strip())
    assert token.resource == f"{HUB}/devices/{DEVICE}/modules/m1"
    assert token.expiry_s == 4102444800


def test_sas_rejects_ttl_and_expiry_together(tmp_path: Path) -> None:
    write_key_string(tmp_path / "cs.txt")

    result = plcbridge("sas", "--connection-string-file", str(tmp_path / "cs.txt"),
                       "--ttl", "60", "--expiry", "4102444800")

    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def test_sas_past_expiry_rejected(tmp_path: Path) -> None:
    write_key_string(tmp_path / "cs.txt")

    result = plcbridge("sas", "--connection-string-file", str(tmp_path / "cs.txt"),
                       "--expiry", "1000")

    assert result.returncode == 2
    assert "invalid --expiry 1000" in result.stderr
    assert result.stdout == ""


def test_sas_without_key_rejected(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    files.connection_string.write_text(sas_token_string(files.secrets, 4102444800) + "\n")

    result = plcbridge("sas", "--connection-string-file", str(files.connection_string))

    assert result.returncode == 2
    assert "has no SharedAccessKey" in result.stderr
    assert "Traceback" not in result.stderr
    for secret in files.secrets:
        assert secret not in result.stdout + result.stderr


def test_sas_missing_file(tmp_path: Path) -> None:
    result = plcbridge("sas", "--connection-string-file", str(tmp_path / "absent.txt"))

    assert result.returncode == 2
    assert f"{tmp_path / 'absent.txt'}: connection-string file not found" in result.stderr


def test_check_credentials_prints_identity(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    files.connection_string.write_text(sas_token_string(files.secrets, 4102444800) + "\n")

    result = plcbridge("check-credentials", "--config", str(files.config))

    assert result.returncode == 0, result
    assert f"device id: {DEVICE}\n" in result.stdout
    assert f"host: {HUB}\n" in result.stdout
    assert "gateway host: 127.0.0.1\n" in result.stdout
    assert "scheme: SAS token\n" in result.stdout
    assert "sig=<redacted>&se=4102444800" in result.stdout
    assert "clock: ok" in result.stdout
    for secret in files.secrets:
        assert secret not in result.stdout + result.stderr


def test_check_credentials_clock_behind_fails(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    (tmp_path / "state").mkdir()
    floor_s = int(time.time()) + 30 * 86400
    (tmp_path / "state" / "time-floor.json").write_text(json.dumps(
        {"version": 1, "floor_s": floor_s, "source": "hub Date header"}))

    result = plcbridge("check-credentials", "--config", str(files.config))

    assert result.returncode == 3, result
    assert "clock: behind" in result.stdout
    assert f"floor={floor_s}" in result.stdout
    assert "problems: clock behind" in result.stdout


@pytest.mark.parametrize(("warning_days", "state"), [(7, "valid"), (60, "warning")])
def test_check_credentials_certificate_dates(tmp_path: Path, warning_days: int,
                                             state: str) -> None:
    # write_client_pair issues a certificate valid for 30 days.
    files = gateway(tmp_path, PAIR + f"certificate_warning_days = {warning_days}\n")
    files.connection_string.write_text(f"HostName={HUB};DeviceId={DEVICE};x509=true\n")
    write_client_pair(tmp_path / "client.pem", tmp_path / "client.key")

    result = plcbridge("check-credentials", "--config", str(files.config))

    assert result.returncode == 0, result
    assert "scheme: x509" in result.stdout
    assert f"client certificate: CN={DEVICE}: {state}\n" in result.stdout
    assert "notAfter=" in result.stdout


def check_encrypted_key(
    tmp_path: Path, passphrase_file_text: str
) -> subprocess.CompletedProcess[str]:
    """Run check-credentials on an x509 gateway whose key is encrypted with "s3cret phrase"."""
    files = gateway(tmp_path, PAIR + 'client_key_passphrase_file = "passphrase.txt"\n')
    files.connection_string.write_text(f"HostName={HUB};DeviceId={DEVICE};x509=true\n")
    write_client_pair(tmp_path / "client.pem", tmp_path / "client.key")
    encrypt_key(tmp_path / "client.key", b"s3cret phrase")
    (tmp_path / "passphrase.txt").write_text(passphrase_file_text)
    return plcbridge("check-credentials", "--config", str(files.config))


def test_check_credentials_passphrase_key(tmp_path: Path) -> None:
    result = check_encrypted_key(tmp_path, "s3cret phrase\n")

    assert result.returncode == 0, result
    assert "s3cret" not in result.stdout + result.stderr


def test_check_credentials_wrong_passphrase(tmp_path: Path) -> None:
    result = check_encrypted_key(tmp_path, "wrong phrase\n")

    assert result.returncode == 2, result
    assert "cannot decrypt the client key with the passphrase in" in result.stderr
    assert "phrase\n" not in result.stderr.replace(str(tmp_path), "")


def encrypt_key(path: Path, passphrase: bytes) -> None:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    ))


def test_sas_key_text_has_special_characters() -> None:
    assert "+" in KEY_TEXT
    assert "/" in KEY_TEXT
    assert KEY_TEXT.endswith("==")
    assert len(base64.b64decode(KEY_TEXT)) == 16


def write_future_pair(cert_path: Path, key_path: Path) -> None:
    """Write a self-signed certificate for DEVICE that becomes valid in 10 days."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=10))
        .not_valid_after(now + datetime.timedelta(days=400))
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def test_check_credentials_certificate_not_yet_valid(tmp_path: Path) -> None:
    files = gateway(tmp_path, PAIR)
    files.connection_string.write_text(f"HostName={HUB};DeviceId={DEVICE};x509=true\n")
    write_future_pair(tmp_path / "client.pem", tmp_path / "client.key")

    result = plcbridge("check-credentials", "--config", str(files.config))

    assert result.returncode == 3, result
    assert f"client certificate: CN={DEVICE}: not_yet_valid\n" in result.stdout
    assert "not valid yet, or the clock is behind: notBefore=" in result.stdout
    assert "problems: client certificate not yet valid" in result.stdout


@pytest.mark.parametrize("option", ["--expiry", "--ttl"])
@pytest.mark.parametrize("value", ["253402300800", "99999999999999", "9" * 40])
def test_sas_huge_expiry_rejected(tmp_path: Path, option: str, value: str) -> None:
    write_key_string(tmp_path / "cs.txt")

    result = plcbridge("sas", "--connection-string-file", str(tmp_path / "cs.txt"),
                       option, value)

    assert result.returncode == 2, result
    assert f"invalid {option}" in result.stderr
    assert "9999-12-31T23:59:59Z" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("expiry_s", [253402300800, 99999999999999, int("9" * 40)])
def test_check_credentials_huge_se_rejected(tmp_path: Path, expiry_s: int) -> None:
    files = gateway(tmp_path)
    token = mint_sas_token(f"{HUB}/devices/{DEVICE}", b"k" * 32, expiry_s)
    files.connection_string.write_text(f"HostName={HUB};DeviceId={DEVICE};"
                                       f"SharedAccessSignature={token}\n")

    result = plcbridge("check-credentials", "--config", str(files.config))

    assert result.returncode == 2, result
    assert f"{files.connection_string}: " in result.stderr
    assert "se out of range" in result.stderr
    assert str(expiry_s) not in result.stderr
    assert "Traceback" not in result.stderr


def test_check_credentials_token_for_other_device(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    token = mint_sas_token("other.azure-devices.net/devices/gw-99", b"k" * 32, 4102444800)
    files.connection_string.write_text(f"HostName={HUB};DeviceId={DEVICE};"
                                       f"SharedAccessSignature={token}\n")

    result = plcbridge("check-credentials", "--config", str(files.config))

    assert result.returncode == 2, result
    assert "signed for sr='other.azure-devices.net/devices/gw-99'" in result.stderr
    assert "the hub rejects it" in result.stderr


def test_check_credentials_local_floor_noted(tmp_path: Path) -> None:
    # A floor saved from a clock that ran ahead: the hub's Date header lowers it later, so
    # the check only notes it.
    files = gateway(tmp_path)
    (tmp_path / "state").mkdir()
    floor_s = int(time.time()) + 30 * 86400
    (tmp_path / "state" / "time-floor.json").write_text(json.dumps(
        {"version": 1, "floor_s": floor_s, "source": "last successful connection"}))

    result = plcbridge("check-credentials", "--config", str(files.config))

    assert result.returncode == 0, result
    assert "clock: behind" in result.stdout
    assert "clock behind the stored floor; the hub's time will confirm" in result.stdout
    assert "problems:" not in result.stdout


@pytest.mark.parametrize("command", ["sas", "check-credentials"])
def test_cli_fifo_credential_file_rejected(tmp_path: Path, command: str) -> None:
    files = gateway(tmp_path)
    files.connection_string.unlink()
    os.mkfifo(files.connection_string)
    args = (["--connection-string-file", str(files.connection_string)] if command == "sas"
            else ["--config", str(files.config)])

    result = plcbridge(command, *args)

    assert result.returncode == 2, result
    assert (f"{files.connection_string}: connection-string file is not a regular file "
            "(a FIFO)") in result.stderr


def test_cli_device_credential_file_rejected(tmp_path: Path) -> None:
    (tmp_path / "cs.txt").symlink_to("/dev/zero")

    result = plcbridge("sas", "--connection-string-file", str(tmp_path / "cs.txt"))

    assert result.returncode == 2, result
    assert "is not a regular file (a character device)" in result.stderr


def test_check_credentials_fifo_time_floor_warned(tmp_path: Path) -> None:
    files = gateway(tmp_path)
    (tmp_path / "state").mkdir()
    os.mkfifo(tmp_path / "state" / "time-floor.json")

    result = plcbridge("check-credentials", "--config", str(files.config))

    assert result.returncode == 0, result
    assert "time_floor_invalid" in result.stderr
    assert "not a regular file (a FIFO)" in result.stderr
    assert "clock: ok" in result.stdout
