"""Validation of the credential files that the uplink reads, and the SAS expiry check.

The credential watcher validates a changed set with these functions before it restarts the
uplink, and `plcbridge check-config` and `check-credentials` use them to report. Every
error names the file and the reason and never quotes a secret.

Certificates and keys are loaded into an ssl.SSLContext, as the uplink loads them, so a file
passes exactly when OpenSSL accepts it. The module does not import cryptography, which would
add about 8 MiB of resident memory to the credential watcher on top of ssl (ru_maxrss,
cryptography 50, Python 3.11).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import ssl
import stat
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from common.config import CredentialSettings, UplinkSettings
from common.credentials import (
    ConnectionString,
    CredentialFileError,
    ValidityCheck,
    check_validity,
    read_connection_string,
    read_credential_bytes,
    read_password_file,
)
from common.token_client import TokenServerClient

SECONDS_PER_DAY = 86_400

CERTIFICATE_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL
)
# PKCS #8 (PRIVATE KEY, ENCRYPTED PRIVATE KEY) and traditional (RSA, EC) key blocks.
PRIVATE_KEY_BEGIN = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")
# OpenSSL 3 reasons of a private key that belongs to another certificate. A key of another
# type than the certificate's, such as RSA for an EC certificate, fills another slot of the
# context, so OpenSSL finds no certificate for it: NO_CERTIFICATE_ASSIGNED.
KEY_MISMATCH_REASONS = ("KEY_VALUES_MISMATCH", "KEY_TYPE_MISMATCH", "NO_CERTIFICATE_ASSIGNED")
# OpenSSL 3 reasons of an encrypted key read with a wrong passphrase.
WRONG_PASSPHRASE_REASONS = ("BAD_DECRYPT", "BAD_PASSWORD_READ")


@dataclass(frozen=True)
class ClientCertificate:
    subject: str
    not_after: datetime
    not_before: datetime | None = None


@dataclass(frozen=True)
class CredentialSet:
    """The loaded credential files, without their secrets."""

    connection: ConnectionString | None
    ca_certificate_count: int  # distinct certificates, as OpenSSL's store counts them
    client_certificate: ClientCertificate | None
    # Self-signed certificates in the CA file that OpenSSL takes as CAs (basicConstraints
    # CA:TRUE, or a version 1 certificate). OpenSSL ends a chain only at one of these, unless
    # the partial-chain flag is set, which the uplink does not set.
    ca_root_count: int


@dataclass(frozen=True)
class SasExpiry:
    """The SAS check of one load: state is valid, warning, expired or not_applicable."""

    state: str
    message: str
    expiry_s: int | None = None
    level: int = logging.INFO


def validate_credential_files(settings: CredentialSettings) -> CredentialSet:
    """Load every configured credential file and raise CredentialFileError for the first bad one."""
    connection = None
    if settings.connection_string_file is not None:
        connection = read_connection_string(settings.connection_string_file)

    ca_count, _ca_pem = _load_certificates(settings.ca_file, "CA file")
    ca_root_count = count_root_certificates(settings.ca_file)

    client = None
    if settings.client_cert_file is not None and settings.client_key_file is not None:
        client = _load_client_pair(
            settings.client_cert_file, settings.client_key_file,
            settings.client_key_passphrase_file,
        )
    if connection is not None and connection.x509 and client is None:
        raise CredentialFileError(
            settings.connection_string_file,  # type: ignore[arg-type]
            "connection string sets x509=true, but credentials.client_cert_file and "
            "credentials.client_key_file are not set; configure the device certificate",
        )

    if settings.password_file is not None:
        read_password_file(settings.password_file)
    if settings.token_server is not None:
        # Loads the server's CA, the client certificate pair or the challenge secret, with
        # the same errors as the uplink gets at start.
        TokenServerClient(settings.token_server)
    return CredentialSet(connection, ca_count, client, ca_root_count)


def count_root_certificates(path: Path) -> int:
    """Return how many certificates of a PEM file OpenSSL takes as self-signed root CAs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError):
        return 0
    # get_ca_certs() lists only the certificates that pass OpenSSL's X509_check_ca().
    return sum(1 for certificate in context.get_ca_certs()
               if certificate.get("subject") == certificate.get("issuer"))


def check_readable(path: Path) -> None:
    """Raise CredentialFileError when the mode bits deny this process's user read access.

    The bits are checked as the kernel checks them for an ordinary user, also when this
    process runs as root. Root can read any file. But a credential file that its own user
    cannot read is usually a rotation caught half way, such as a file written before its
    chmod or chown, and an uplink started under a non-root user would fail on it. A file
    that cannot be stat'ed is left to the read, which reports the reason.
    """
    try:
        status = os.stat(path)
    except OSError:
        return
    mode = stat.S_IMODE(status.st_mode)
    uid = os.geteuid()
    if status.st_uid == uid:
        if not mode & stat.S_IRUSR:
            raise CredentialFileError(
                path, f"mode {mode:04o} gives its owner, uid {uid} (the gateway's user), no "
                "read permission; make it readable by its owner, for example mode 0600",
            )
        return
    if status.st_gid == os.getegid() or status.st_gid in os.getgroups():
        if not mode & stat.S_IRGRP:
            raise CredentialFileError(
                path, f"owned by uid {status.st_uid} and group {status.st_gid} with mode "
                f"{mode:04o}, which gives the group of uid {uid} (the gateway's user) no read "
                f"permission; chown it to uid {uid}, or make it readable by the group",
            )
        return
    if not mode & stat.S_IROTH:
        raise CredentialFileError(
            path, f"owned by uid {status.st_uid} with mode {mode:04o}, so uid {uid} (the "
            f"gateway's user) has no read permission; chown it to uid {uid}",
        )


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
    result = check_validity(
        "SAS token", expiry_s, now, credentials.sas_warning_days * SECONDS_PER_DAY,
        credentials.expiry_error_margin_s,
    )
    message = result.message
    if result.state != "valid":
        # The gateway cannot renew a given token, so the message names the fix.
        message += ("; only a new SAS token fixes this: write a new connection string, and "
                    "pages keep buffering meanwhile")
    return SasExpiry(result.state, message, expiry_s, result.level)


def check_certificate_validity(
    certificate: ClientCertificate, credentials: CredentialSettings, now_s: float | None = None
) -> ValidityCheck:
    """Compare the client certificate's notBefore and notAfter with the clock."""
    now = time.time() if now_s is None else now_s
    not_before = certificate.not_before.timestamp() if certificate.not_before else None
    return check_validity(
        f"client certificate {certificate.subject}", certificate.not_after.timestamp(), now,
        credentials.certificate_warning_days * SECONDS_PER_DAY,
        credentials.expiry_error_margin_s, not_before_s=not_before, field_name="notAfter",
    )


def _load_certificates(path: Path, file_kind: str) -> tuple[int, bytes]:
    """Load a PEM file into OpenSSL's certificate store, and return the count and the bytes."""
    data = read_credential_bytes(path, file_kind)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CredentialFileError(path, f"{file_kind} contains no PEM certificate")

    # NOTE: OpenSSL opens the path again. A file replaced by a FIFO between the two opens
    # would still block it, but the read above rejects one that is already in place.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError) as exc:
        raise CredentialFileError(
            path,
            f"{file_kind} contains an invalid PEM certificate: {_find_invalid_block(data)} "
            f"(OpenSSL: {_openssl_reason(exc)})",
        ) from exc

    # A file with certificate markers only in its comments loads no certificate at all.
    count = context.cert_store_stats()["x509"]
    if count == 0:
        raise CredentialFileError(path, f"{file_kind} contains no PEM certificate")
    return count, data


def _find_invalid_block(data: bytes) -> str:
    """Describe the first certificate block that OpenSSL rejects on its own, with its line."""
    for match in CERTIFICATE_BLOCK.finditer(data):
        line = data.count(b"\n", 0, match.start()) + 1
        where = f"the certificate at line {line}"
        try:
            base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except binascii.Error:
            return f"{where} is not valid base64"

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cadata=match.group(0).decode("ascii"))
        except (ssl.SSLError, ValueError):
            return f"{where} is not a valid X.509 certificate"
    return "a certificate block is incomplete or malformed"


def _load_client_pair(
    cert_path: Path, key_path: Path, passphrase_path: Path | None
) -> ClientCertificate:
    _count, cert_data = _load_certificates(cert_path, "client certificate file")
    _check_private_key(cert_path, key_path, passphrase_path)

    # OpenSSL uses the first certificate as the device's own, and any that follow as its chain.
    # cryptography is imported here, not at the top, because it costs about 10 MiB of
    # resident memory that a watcher of SAS credentials need not carry.
    from cryptography import x509

    match = CERTIFICATE_BLOCK.search(cert_data)
    try:
        certificate = x509.load_pem_x509_certificate(match.group(0) if match else cert_data)
    except ValueError as exc:
        raise CredentialFileError(
            cert_path, f"cannot read the subject and expiry of the client certificate: {exc}"
        ) from exc
    return ClientCertificate(
        subject=certificate.subject.rfc4514_string(),
        not_after=certificate.not_valid_after_utc,
        not_before=certificate.not_valid_before_utc,
    )


class _EncryptedKeyError(Exception):
    """Raised by the password callback, which OpenSSL calls only for an encrypted key."""


def _reject_encrypted_key() -> str:
    raise _EncryptedKeyError


def read_passphrase(path: Path) -> bytes:
    """Read a key passphrase file: its content without the final line break."""
    data = read_credential_bytes(path, "client key passphrase file")
    passphrase = data.removesuffix(b"\n").removesuffix(b"\r")
    if not passphrase:
        raise CredentialFileError(path, "client key passphrase file is empty")
    return passphrase


def _check_private_key(cert_path: Path, key_path: Path, passphrase_path: Path | None) -> None:
    """Load the key with its certificate, as the uplink does, so OpenSSL checks they match."""
    passphrase = read_passphrase(passphrase_path) if passphrase_path is not None else None
    data = read_credential_bytes(key_path, "client key file")
    if not PRIVATE_KEY_BEGIN.search(data):
        raise CredentialFileError(
            key_path, "client key file is not a valid PEM private key: it contains no "
            "-----BEGIN PRIVATE KEY----- block"
        )

    # Without a password callback, OpenSSL would prompt for a passphrase on the terminal.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    password = passphrase if passphrase is not None else _reject_encrypted_key
    try:
        context.load_cert_chain(str(cert_path), str(key_path), password=password)
    except _EncryptedKeyError as exc:
        raise CredentialFileError(
            key_path, "client key is encrypted; set credentials.client_key_passphrase_file "
            "to the file that contains its passphrase"
        ) from exc
    except (ssl.SSLError, OSError) as exc:
        # NOTE: load_cert_chain's error does not say whether the certificate or the key
        # failed. A certificate that load_verify_locations accepted but that OpenSSL cannot
        # use for TLS, such as one with an unknown key algorithm, is blamed on the key file.
        if getattr(exc, "reason", None) in KEY_MISMATCH_REASONS:
            raise CredentialFileError(
                key_path,
                f"private key does not match the client certificate {cert_path}; "
                "install the key that belongs to that certificate",
            ) from exc
        # OpenSSL 3.0 reports a wrong passphrase as BAD_DECRYPT or, through CPython's
        # callback, only as "PEM lib" without a reason.
        reason = getattr(exc, "reason", None)
        if passphrase is not None and (reason is None or reason in WRONG_PASSPHRASE_REASONS):
            raise CredentialFileError(
                key_path, "cannot decrypt the client key with the passphrase in "
                f"{passphrase_path}, or the key is not a valid PEM key; write the key's "
                "passphrase there"
            ) from exc
        raise CredentialFileError(
            key_path, f"client key file is not a valid PEM private key: {_openssl_reason(exc)}"
        ) from exc


def _openssl_reason(exc: OSError) -> str:
    # OpenSSL's reason names the failure, such as KEY_VALUES_MISMATCH, never the key material.
    # Errors without a reason code carry only a text such as "[SSL] PEM lib (_ssl.c:3926)",
    # from which the CPython source location goes.
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    text = exc.strerror or type(exc).__name__
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)
