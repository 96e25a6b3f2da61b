"""Validation of the credential files that the uplink reads, and the SAS expiry check.

The credential watcher validates a changed set with these functions before it restarts the
uplink, and `plcbridge check-config` and `check-credentials` use them to report. Every
error names the file and the reason and never quotes a secret.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from common.config import CredentialSettings, UplinkSettings
from common.credentials import ConnectionString, describe_expiry, read_connection_string
from common.errors import CredentialError

SECONDS_PER_DAY = 86_400


class CredentialFileError(CredentialError):
    """A credential file that cannot be used. The message starts with its path."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ClientCertificate:
    subject: str
    not_after: datetime


@dataclass(frozen=True)
class CredentialSet:
    """The loaded credential files, without their secrets."""

    connection: ConnectionString | None
    ca_certificate_count: int
    client_certificate: ClientCertificate | None


@dataclass(frozen=True)
class SasExpiry:
    """The SAS check of one load: state is valid, warning, expired or not_applicable."""

    state: str
    message: str
    expiry_s: int | None = None


def validate_credential_files(settings: CredentialSettings) -> CredentialSet:
    """Load every configured credential file and raise CredentialFileError for the first bad one."""
    connection = None
    if settings.connection_string_file is not None:
        connection = _load_connection_string(settings.connection_string_file)

    ca_count = len(_load_certificates(settings.ca_file, "CA file"))

    client = None
    if settings.client_cert_file is not None and settings.client_key_file is not None:
        client = _load_client_pair(settings.client_cert_file, settings.client_key_file)
    if connection is not None and connection.x509 and client is None:
        raise CredentialFileError(
            settings.connection_string_file,  # type: ignore[arg-type]
            "connection string sets x509=true, but credentials.client_cert_file and "
            "credentials.client_key_file are not set; configure the device certificate",
        )

    if settings.password_file is not None:
        _check_password_file(settings.password_file)
    _check_tls_loading(settings)
    return CredentialSet(connection, ca_count, client)


def check_sas_expiry(
    connection: ConnectionString | None,
    credentials: CredentialSettings,
    uplink: UplinkSettings,
    now_s: float | None = None,
) -> SasExpiry:
    """Compare the connection string's SAS token with the clock and the warning window."""
    if connection is None:
        return SasExpiry("not_applicable", "no connection string, so no SAS token to check")
    if connection.x509:
        return SasExpiry("not_applicable", "X.509 authentication, so no SAS token to check")
    if connection.token is None:
        return SasExpiry(
            "valid",
            f"device key: the uplink mints a SAS token on each connect with "
            f"uplink.sas_ttl_s={uplink.sas_ttl_s}",
        )

    now = time.time() if now_s is None else now_s
    expiry_s = connection.token.expiry_s
    warning_s = credentials.sas_warning_days * SECONDS_PER_DAY
    _healthy, message = describe_expiry(expiry_s, warning_s, now)
    if expiry_s <= now:
        state = "expired"
    elif expiry_s - now < warning_s:
        state = "warning"
    else:
        state = "valid"
    return SasExpiry(state, message, expiry_s)


def _read_file(path: Path, file_kind: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise CredentialFileError(path, f"{file_kind} not found") from exc
    except IsADirectoryError as exc:
        raise CredentialFileError(path, f"{file_kind} is a folder; expected a file") from exc
    except PermissionError as exc:
        raise CredentialFileError(
            path, f"{file_kind} not readable by this user; check its permissions"
        ) from exc
    except OSError as exc:
        raise CredentialFileError(path, f"cannot read {file_kind}: {exc.strerror}") from exc


def _load_connection_string(path: Path) -> ConnectionString:
    try:
        return read_connection_string(path)
    except CredentialError as exc:
        # read_connection_string already starts its messages with the path.
        reason = str(exc).removeprefix(f"{path}: ")
        raise CredentialFileError(path, reason) from exc


def _load_certificates(path: Path, file_kind: str) -> list[x509.Certificate]:
    data = _read_file(path, file_kind)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CredentialFileError(path, f"{file_kind} contains no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CredentialFileError(
            path, f"{file_kind} contains an invalid PEM certificate: {exc}"
        ) from exc


def _load_client_pair(cert_path: Path, key_path: Path) -> ClientCertificate:
    # The first certificate is the device's own, and any that follow are its chain.
    certificate = _load_certificates(cert_path, "client certificate file")[0]
    key = _load_private_key(key_path)

    public_format = serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        cert_public = certificate.public_key().public_bytes(
            serialization.Encoding.DER, public_format
        )
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CredentialFileError(
            cert_path, f"client certificate has a public key that cannot be used: {exc}"
        ) from exc
    key_public = key.public_key().public_bytes(serialization.Encoding.DER, public_format)
    if cert_public != key_public:
        raise CredentialFileError(
            key_path,
            f"private key does not match the client certificate {cert_path}; "
            "install the key that belongs to that certificate",
        )
    return ClientCertificate(
        subject=certificate.subject.rfc4514_string(),
        not_after=certificate.not_valid_after_utc,
    )


def _load_private_key(path: Path) -> PrivateKeyTypes:
    data = _read_file(path, "client key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        # cryptography raises TypeError when the key is encrypted and no password is given.
        raise CredentialFileError(
            path, "client key is encrypted; the uplink needs an unencrypted PEM key"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        # cryptography 50's messages name the parse failure and never quote key material.
        raise CredentialFileError(
            path, f"client key file is not a valid PEM private key: {exc}"
        ) from exc
    return key


def _check_password_file(path: Path) -> None:
    data = _read_file(path, "password file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CredentialFileError(path, "password file is not UTF-8 text") from exc
    if len([line for line in text.splitlines() if line.strip()]) != 1:
        raise CredentialFileError(path, "expected one line holding the MQTT password")


def _check_tls_loading(settings: CredentialSettings) -> None:
    """Load the files into an SSL context, as the uplink does, in case OpenSSL rejects them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(settings.ca_file))
    except (ssl.SSLError, OSError) as exc:
        raise CredentialFileError(
            settings.ca_file, f"OpenSSL rejects the CA file: {_ssl_reason(exc)}"
        ) from exc

    if settings.client_cert_file is None or settings.client_key_file is None:
        return
    try:
        context.load_cert_chain(str(settings.client_cert_file), str(settings.client_key_file))
    except (ssl.SSLError, OSError) as exc:
        raise CredentialFileError(
            settings.client_key_file,
            f"OpenSSL rejects the client key with certificate {settings.client_cert_file}: "
            f"{_ssl_reason(exc)}",
        ) from exc


def _ssl_reason(exc: ssl.SSLError | OSError) -> str:
    # OpenSSL's reason names the failure, such as KEY_VALUES_MISMATCH, never the key material.
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else type(exc).__name__
