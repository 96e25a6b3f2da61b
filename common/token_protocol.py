"""The on-site token server's HTTPS protocol, shared by the server and the gateway's client.

A gateway asks for a SAS token with `POST /v1/token`. It proves its identity either with a
TLS client certificate whose common name or a subject alternative name is its serial
number, or with a challenge: `POST /v1/challenge` with `{"serial": ...}` returns a
single-use nonce, and the token request then carries `{"serial", "nonce", "mac"}`, where
mac is the base64 HMAC-SHA256, keyed with the gateway's shared secret, of
`plcbridge-token-v1\\n<serial>\\n<nonce>`. The fixed prefix keeps the MAC from being valid
for any other protocol that uses the same secret.

Every reply is JSON. A token reply holds token, expiry_s, ttl_s, device_id and
hub_host_name. An error reply holds error (a short code) and message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from pathlib import Path

from common.credentials import CredentialFileError, read_credential_bytes

CHALLENGE_PATH = "/v1/challenge"
TOKEN_PATH = "/v1/token"
MAC_CONTEXT = "plcbridge-token-v1"

# Largest request or reply body either side reads. A token reply is about 300 bytes.
MAX_BODY_BYTES = 4096

# A shared secret shorter than the HMAC-SHA256 block's security level would be guessable.
MIN_SECRET_BYTES = 32

# Serial numbers as printed on gateways and in certificate names: letters, digits and
# - . _ : up to 64 characters.
SERIAL_PATTERN = re.compile(r"[A-Za-z0-9\-._:]{1,64}")


def challenge_mac(secret: bytes, serial: str, nonce: str) -> str:
    """Compute the base64 MAC that responds to a challenge for this serial and nonce."""
    message = f"{MAC_CONTEXT}\n{serial}\n{nonce}".encode()
    return base64.b64encode(hmac.new(secret, message, hashlib.sha256).digest()).decode()


def mac_matches(secret: bytes, serial: str, nonce: str, mac: str) -> bool:
    """Compare a received MAC with the expected one in constant time."""
    # A MAC is ASCII, and a string from JSON may hold a lone surrogate that encode() rejects.
    if not mac.isascii():
        return False
    return hmac.compare_digest(challenge_mac(secret, serial, nonce).encode(), mac.encode())


def read_base64_secret(path: Path, file_kind: str, min_bytes: int = MIN_SECRET_BYTES) -> bytes:
    """Read a one-line base64 key or secret file; raise CredentialFileError naming it.

    No message quotes the file's content, because it is a secret.
    """
    data = read_credential_bytes(path, file_kind)
    lines = [line.strip() for line in data.splitlines() if line.strip()]
    if len(lines) != 1:
        raise CredentialFileError(path, f"expected one line holding the base64 {file_kind}")
    try:
        secret = base64.b64decode(lines[0], validate=True)
    except binascii.Error as exc:
        raise CredentialFileError(
            path, f"{file_kind} is not valid base64; write it as one base64 line"
        ) from exc
    if len(secret) < min_bytes:
        raise CredentialFileError(
            path, f"{file_kind} is {len(secret)} bytes long; expected at least {min_bytes} "
            f"bytes, for example from `head -c 32 /dev/urandom | base64`"
        )
    return secret
