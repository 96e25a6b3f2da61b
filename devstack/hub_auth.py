"""CONNECT validation as Azure IoT Hub does it: client id, user name, SAS token or X.509.

The SAS signature is checked the way the IoT Edge hub checks it: HMAC-SHA256 over `sr`
exactly as the client sent it, a newline and `se`. Only the scope comparison URL-decodes
`sr`, and it ignores case. Every rejection carries a reason for the log that never
contains the signature, the password or a key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.x509.oid import NameOID

from common.credentials import parse_sas_token
from common.errors import CredentialError
from devstack.hub_registry import Identity, Registry
from devstack.hub_topics import events_prefix
from devstack.mqtt_frames import Connect

_MQTT_PROTOCOL = ("MQTT", 4)
# 9999-12-31T23:59:59Z. A later se has no calendar date, and one beyond a float's range
# would overflow the expiry check.
MAX_EXPIRY_S = 253_402_300_799


class Rejected(Exception):
    """A CONNECT that the hub rejects with CONNACK 5; the message is the reason."""


@dataclass(frozen=True)
class Admission:
    identity: Identity
    # Authentication method, for the log: "sas primary", "x509 thumbprint", ...
    method: str
    # SAS expiry in epoch seconds; the connection is closed when it passes. None for X.509.
    expiry_s: int | None


def authenticate(
    connect: Connect,
    peer_certificate: bytes | None,
    registry: Registry,
    hub_host: str,
    now_s: float,
    skew_s: float,
    trust_anchors: frozenset[bytes] = frozenset(),
) -> Admission:
    """Check a CONNECT and the TLS client certificate (DER); raise Rejected with the reason.

    trust_anchors contains the DER of every certificate in the client CA file.
    """
    if (connect.protocol_name, connect.protocol_level) != _MQTT_PROTOCOL:
        raise Rejected(
            f"protocol {connect.protocol_name!r} level {connect.protocol_level}; "
            "expected MQTT 3.1.1"
        )

    identity = registry.find(connect.client_id)
    if identity is None:
        raise Rejected("client id not in the registry")
    _check_username(connect.username, identity, hub_host)
    will_prefix = events_prefix(identity)
    if connect.will_topic is not None and not connect.will_topic.startswith(will_prefix):
        raise Rejected(f"will topic {connect.will_topic!r} outside {will_prefix}")

    if identity.scheme == "sas":
        method, expiry_s = _check_sas(connect.password, identity, hub_host, now_s, skew_s)
        return Admission(identity, method, expiry_s)
    method = _check_certificate(peer_certificate, identity, now_s, trust_anchors)
    return Admission(identity, method, None)


def _check_username(username: str | None, identity: Identity, hub_host: str) -> None:
    """Require `<hub host>/<client id>/?api-version=<non-empty>`, host compared in any case."""
    if username is None:
        raise Rejected("no user name")
    path, separator, query = username.partition("/?")
    expected_path = f"{hub_host}/{identity.client_id}"
    host, _, client_path = path.partition("/")
    if not separator or host.lower() != hub_host.lower() or client_path != identity.client_id:
        raise Rejected(
            f"user name {username!r} does not match {expected_path}/?api-version=<version>"
        )
    parameters = urllib.parse.parse_qs(query, keep_blank_values=True)
    if not any(parameters.get("api-version", [])):
        raise Rejected(f"user name {username!r} has no api-version")


def _check_sas(
    password: bytes | None, identity: Identity, hub_host: str, now_s: float, skew_s: float
) -> tuple[str, int]:
    """Verify a SAS token; return which key signed it and the token's expiry."""
    if password is None:
        raise Rejected("no password; this device authenticates with a SAS token")
    try:
        text = password.decode("utf-8")
        # The source is not just "password": the log redacts the word after "password:".
        token = parse_sas_token(text, "password field")
    except UnicodeDecodeError as exc:
        raise Rejected("password is not UTF-8") from exc
    except CredentialError as exc:
        raise Rejected(str(exc)) from exc
    except ValueError as exc:
        # int() rejects more than 4300 digits (sys.int_info.default_max_str_digits).
        raise Rejected("token se has more than 4300 digits; expected epoch seconds") from exc
    if token.expiry_s > MAX_EXPIRY_S:
        raise Rejected(
            f"token se has {len(str(token.expiry_s))} digits and lies after 9999-12-31; "
            "expected epoch seconds"
        )

    fields = raw_token_fields(text)
    expected_scope = identity.resource_uri(hub_host)
    if token.resource.lower() != expected_scope.lower():
        raise Rejected(f"token scope sr={token.resource!r}; expected {expected_scope!r}")
    if token.expiry_s + skew_s <= now_s:
        raise Rejected(
            f"token expired: se={token.expiry_s} ({_utc(token.expiry_s)}), "
            f"now={int(now_s)} ({_utc(now_s)}), skew={skew_s:g} s"
        )

    signature = decode_signature(fields["sig"])
    message = f"{fields['sr']}\n{fields['se']}".encode()
    for name, key in identity.keys:
        expected = hmac.new(key, message, hashlib.sha256).digest()
        if hmac.compare_digest(expected, signature):
            return f"sas {name}", token.expiry_s
    raise Rejected("signature matches neither the primary nor the secondary key")


def raw_token_fields(text: str) -> dict[str, str]:
    """Split the token's fields without decoding them; parse_sas_token has checked them."""
    body = text.split(" ", 1)[1]
    return dict(part.partition("=")[::2] for part in body.split("&"))


def decode_signature(sig: str) -> bytes:
    try:
        return base64.b64decode(urllib.parse.unquote(sig), validate=True)
    except binascii.Error as exc:
        raise Rejected("token signature is not URL-encoded base64") from exc


def _check_certificate(
    certificate_der: bytes | None, identity: Identity, now_s: float,
    trust_anchors: frozenset[bytes],
) -> str:
    """Match the TLS client certificate by thumbprint, or by CA chain and common name.

    The TLS layer has already verified the chain against the client CA file, because the
    emulator requests certificates only when it has one and OpenSSL then fails every
    handshake with a certificate that does not chain to it.
    """
    if certificate_der is None:
        raise Rejected(f"no client certificate; this device authenticates with {identity.scheme}")
    certificate = x509.load_der_x509_certificate(certificate_der)
    if not certificate.not_valid_before_utc.timestamp() <= now_s:
        raise Rejected(f"client certificate not valid before {certificate.not_valid_before_utc}")
    if certificate.not_valid_after_utc.timestamp() < now_s:
        raise Rejected(f"client certificate expired at {certificate.not_valid_after_utc}")

    if identity.ca_signed:
        _check_issued_by_ca(certificate, certificate_der, trust_anchors)
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = str(names[0].value) if names else None
        if common_name != identity.device_id:
            raise Rejected(f"certificate CN {common_name!r} is not the device id")
        return "x509 ca"

    sha1 = hashlib.sha1(certificate_der).hexdigest()
    sha256 = hashlib.sha256(certificate_der).hexdigest()
    if sha1 in identity.thumbprints or sha256 in identity.thumbprints:
        return "x509 thumbprint"
    raise Rejected(f"certificate thumbprint sha1={sha1} matches no registered thumbprint")


def _check_issued_by_ca(
    certificate: x509.Certificate, certificate_der: bytes, trust_anchors: frozenset[bytes]
) -> None:
    """Reject a leaf that was its own trust anchor in the TLS handshake.

    Thumbprint devices' self-signed certificates sit in the client CA file, so OpenSSL
    accepts each of them as its own root. IoT Hub admits a CA-signed device only through a
    registered CA, and a device's own certificate is not one.
    """
    if certificate_der in trust_anchors or certificate.issuer == certificate.subject:
        raise Rejected(
            "certificate is self-issued or is itself in the client CA file; a ca_signed "
            "device needs a certificate issued by a CA in --client-ca"
        )


def _utc(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
