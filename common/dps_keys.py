"""Device keys for Azure IoT Hub Device Provisioning Service (DPS) group enrollments.

A symmetric-key group enrollment holds one group key. Each device proves membership with a
key derived from it: base64(HMAC-SHA256(key=base64decode(group key), msg=utf8(registration
id))). The registration id is the device's name in DPS: at most 128 characters, letters,
digits and `- . _ :`, compared without regard to case.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from pathlib import Path

from common.credentials import read_regular_file
from common.errors import CredentialError

MAX_REGISTRATION_ID_CHARS = 128
_REGISTRATION_ID = re.compile(r"[A-Za-z0-9\-._:]+")
REGISTRATION_ID_RULE = (
    f"1 to {MAX_REGISTRATION_ID_CHARS} characters, each a letter, a digit or one of - . _ :"
)


def registration_id_problem(registration_id: str) -> str:
    """Return why registration_id is not a valid DPS registration id, or "" when it is."""
    if not registration_id:
        return "it is empty"
    if len(registration_id) > MAX_REGISTRATION_ID_CHARS:
        return f"it has {len(registration_id)} characters, above {MAX_REGISTRATION_ID_CHARS}"
    if not _REGISTRATION_ID.fullmatch(registration_id):
        bad = sorted({char for char in registration_id if not _REGISTRATION_ID.fullmatch(char)})
        return f"it contains {', '.join(repr(char) for char in bad)}"
    return ""


def check_registration_id(registration_id: str, source: str = "registration id") -> str:
    """Return registration_id unchanged; raise CredentialError when DPS would reject it."""
    problem = registration_id_problem(registration_id)
    if problem:
        raise CredentialError(
            f"invalid {source} {registration_id[:200]!r}: {problem}; expected "
            f"{REGISTRATION_ID_RULE}"
        )
    return registration_id


def decode_key(text: str, source: str = "group key") -> bytes:
    """Decode a base64 symmetric key; the error names the source, never the key itself."""
    cleaned = text.strip()
    try:
        key = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as exc:
        # ValueError: a non-ASCII character, which b64decode rejects before decoding.
        raise CredentialError(
            f"invalid {source}: not base64 ({len(cleaned)} characters); copy the primary or "
            "secondary key of the enrollment exactly as the portal shows it"
        ) from exc
    if not key:
        raise CredentialError(f"invalid {source}: it is empty; expected a base64 key")
    return key


def derive_device_key(group_key: bytes, registration_id: str) -> str:
    """Return the base64 device key that a group enrollment expects from registration_id."""
    check_registration_id(registration_id)
    digest = hmac.new(group_key, registration_id.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def read_key_file(path: Path) -> str:
    """Return the first line of a key file, stripped; raise CredentialError naming the file."""
    try:
        lines = read_regular_file(path).decode("utf-8").splitlines()
    except FileNotFoundError as exc:
        raise CredentialError(f"{path}: key file not found") from exc
    except OSError as exc:
        raise CredentialError(f"{path}: cannot read the key file: {exc.strerror}") from exc
    except ValueError as exc:
        # UnicodeDecodeError, or not a regular file. Neither message contains the content.
        raise CredentialError(f"{path}: invalid key file: {exc}") from exc
    return lines[0].strip() if lines else ""
