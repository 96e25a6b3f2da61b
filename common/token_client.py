"""The gateway's client of the on-site token server (common/token_protocol.py).

It trusts only the configured CA bundle, checks the server's host name, and proves the
gateway's identity with a client certificate or by responding to a challenge with the
shared secret. The secret and the tokens stay in memory; nothing is written to disk.
"""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass
from typing import Any

from common.config import TokenServerSettings
from common.credentials import CredentialFileError, SasToken, parse_sas_token
from common.errors import CredentialError, UplinkError
from common.token_protocol import (
    CHALLENGE_PATH,
    MAX_BODY_BYTES,
    TOKEN_PATH,
    challenge_mac,
    read_base64_secret,
)

# Maximum lifetime that a token reply may state. The server allows at most a day, so a larger
# value means a reply that is not the server's.
MAX_TTL_S = 86_400


class TokenServerError(UplinkError):
    """The token server could not be reached or gave no usable token. Names the URL."""


class TokenRefusedError(TokenServerError):
    """The token server rejected the request: a 4xx reply other than 429."""


@dataclass(frozen=True)
class FetchedToken:
    """A SAS token from the server, with its lifetime as the server stated it."""

    token: SasToken
    ttl_s: int


class TokenServerClient:
    """Fetches SAS tokens over HTTPS; each fetch opens its own short connection."""

    def __init__(self, settings: TokenServerSettings) -> None:
        self.settings = settings
        self.url = settings.url.rstrip("/")
        self._context = _client_context(settings)
        self._secret: bytes | None = None
        if settings.secret_file is not None:
            self._secret = read_base64_secret(settings.secret_file, "challenge secret")

    def fetch(self) -> FetchedToken:
        """Authenticate and return a fresh token; raise TokenServerError naming the URL."""
        body: dict[str, Any] = {}
        if self._secret is not None:
            serial = self.settings.serial
            assert serial is not None  # the configuration sets serial with secret_file
            nonce = self._post(CHALLENGE_PATH, {"serial": serial}).get("nonce")
            if not isinstance(nonce, str):
                raise TokenServerError(f"token server {self.url}: challenge reply has no nonce")
            body = {"serial": serial, "nonce": nonce,
                    "mac": challenge_mac(self._secret, serial, nonce)}
        return self._check_reply(self._post(TOKEN_PATH, body))

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        where = f"{self.url}{path}"
        connection = http.client.HTTPSConnection(
            self.settings.host, self.settings.port, timeout=self.settings.timeout_s,
            context=self._context)
        try:
            connection.request("POST", path, body=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read(MAX_BODY_BYTES + 1)
        except ssl.SSLCertVerificationError as exc:
            raise TokenServerError(
                f"TLS handshake with token server {where} failed: {exc.verify_message}; "
                f"check that {self.settings.ca_file} contains the server's CA and that its "
                f"certificate names {self.settings.host}"
            ) from exc
        except TimeoutError as exc:
            raise TokenServerError(
                f"request to token server {where} timed out after {self.settings.timeout_s:g} s"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            raise TokenServerError(f"cannot reach token server {where}: {reason}") from exc
        finally:
            connection.close()
        return self._decode(where, response.status, data)

    @staticmethod
    def _decode(where: str, status: int, data: bytes) -> dict[str, Any]:
        try:
            reply = json.loads(data) if len(data) <= MAX_BODY_BYTES else None
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise TokenServerError(f"token server {where}: HTTP {status} with a reply that "
                                   "is not a JSON object; check that the URL is the server's")
        if status == 200:
            return reply
        detail = f"HTTP {status} {reply.get('error')}: {str(reply.get('message'))[:200]}"
        if 400 <= status < 500 and status != 429:
            raise TokenRefusedError(f"token server {where} rejected the request: {detail}")
        raise TokenServerError(f"token server {where} failed: {detail}")

    def _check_reply(self, reply: dict[str, Any]) -> FetchedToken:
        """Check that the token is for this gateway's identity and has a plausible lifetime."""
        text, ttl_s = reply.get("token"), reply.get("ttl_s")
        if not isinstance(text, str) or not isinstance(ttl_s, int) or isinstance(ttl_s, bool) \
                or not 0 < ttl_s <= MAX_TTL_S:
            raise TokenServerError(
                f"token server {self.url}: reply lacks a token or a ttl_s from 1 to {MAX_TTL_S}")
        try:
            token = parse_sas_token(text, f"token from {self.url}")
        except CredentialError as exc:
            raise TokenServerError(str(exc)) from exc

        expected = f"{self.settings.hub_host_name}/devices/{self.settings.device_id}"
        host, _, path = token.resource.partition("/")
        resource_host, _, expected_path = expected.partition("/")
        if host.lower() != resource_host.lower() or path != expected_path:
            raise TokenServerError(
                f"token server {self.url} issued a token for sr={token.resource[:200]!r}, not "
                f"for {expected!r}, so the hub would reject it; check the server's "
                "hub_host_name and this serial's device_id against "
                "credentials.token_server.hub_host_name and device_id"
            )
        return FetchedToken(token, ttl_s)


def _client_context(settings: TokenServerSettings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(settings.ca_file))
    except (ssl.SSLError, OSError) as exc:
        raise CredentialFileError(
            settings.ca_file, f"credentials.token_server.ca_file cannot be loaded: {exc}; "
            "expected the PEM certificate of the CA that signed the token server's certificate"
        ) from exc
    if settings.client_cert_file is not None and settings.client_key_file is not None:
        try:
            context.load_cert_chain(str(settings.client_cert_file), str(settings.client_key_file))
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            raise CredentialFileError(
                settings.client_cert_file, "credentials.token_server.client_cert_file with "
                f"client_key_file {settings.client_key_file} cannot be loaded: {reason}; "
                "expected a PEM certificate and its unencrypted PEM key"
            ) from exc
    return context
