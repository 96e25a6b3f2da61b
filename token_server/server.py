"""The token server's HTTPS endpoint: authenticate a gateway, then sign a token for it.

Requests are served on one thread each (http.server's ThreadingHTTPServer). The TLS
handshake runs on that thread too, not in the accepting loop, so one slow or hostile client
cannot stall the others. A failed handshake, such as one with an expired client
certificate, is then written to the audit log with the client's address.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import ssl
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from common.errors import ConfigError
from common.logs import fields
from common.token_protocol import (
    CHALLENGE_PATH,
    MAX_BODY_BYTES,
    SERIAL_PATTERN,
    TOKEN_PATH,
    mac_matches,
)
from token_server import challenges
from token_server.audit import ISSUED, REFUSED, AuditLog
from token_server.bucket import RateLimiter
from token_server.challenges import ChallengeBook
from token_server.config import AllowedDevice, ServerConfig
from token_server.keys import KeyStore

CERTIFICATE = "certificate"
CHALLENGE = "challenge"

# Subject alternative name types that may carry a serial number.
SERIAL_SAN_TYPES = ("DNS", "URI", "email", "IP Address")


class Refusal(Exception):
    """A request that is refused: the HTTP status, the audit reason and a message."""

    def __init__(self, status: HTTPStatus, reason: str, message: str,
                 serial: str | None = None, device_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.serial = serial
        self.device_id = device_id


def build_server_context(config: ServerConfig) -> ssl.SSLContext:
    """Build the TLS 1.2+ server context; request a client certificate when a CA is set."""
    listen = config.listen
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(listen.cert_file), str(listen.key_file))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{listen.cert_file}: listen.cert_file with listen.key_file {listen.key_file} "
            f"cannot be loaded: {getattr(exc, 'reason', None) or exc}; expected a PEM "
            "certificate and its unencrypted PEM key"
        ) from exc
    if listen.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(listen.client_ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{listen.client_ca_file}: listen.client_ca_file cannot be loaded: {exc}; "
                "expected the PEM certificate of the CA that signs gateway certificates"
            ) from exc
        # Optional, because a gateway may respond to a challenge instead. A certificate that is
        # presented is still verified, and an invalid one fails the handshake.
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class TokenServer(ThreadingHTTPServer):
    daemon_threads = True
    # A restarted server gets its port back while old connections sit in TIME_WAIT.
    allow_reuse_address = True

    def __init__(self, config: ServerConfig, keys: KeyStore, audit: AuditLog,
                 logger: logging.Logger) -> None:
        if ":" in config.listen.host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((config.listen.host, config.listen.port), TokenRequestHandler)
        except OSError as exc:
            raise ConfigError(
                f"{config.path}: cannot listen on {config.listen.host}:{config.listen.port}: "
                f"{exc.strerror or exc}; check listen.host and listen.port"
            ) from exc
        self.config = config
        self.keys = keys
        self.audit = audit
        self.logger = logger
        self.limiter = RateLimiter(config.rate_limit.burst, config.rate_limit.per_minute)
        self.challenges = ChallengeBook(config.challenge.ttl_s, config.challenge.max_pending)
        context = build_server_context(config)
        self.socket = context.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Run the TLS handshake on the request's thread, then serve the request."""
        client = str(client_address[0])
        request.settimeout(self.config.listen.request_timeout_s)
        try:
            request.do_handshake()
        except ssl.SSLCertVerificationError as exc:
            self.audit.record(client, REFUSED, f"certificate_invalid: {exc.verify_message}",
                              method=CERTIFICATE)
            self.logger.warning("client_certificate_refused %s",
                                fields(client=client, reason=exc.verify_message))
            return
        except (ssl.SSLError, OSError) as exc:
            # A port scan or a client that does not trust this server; nothing was asked.
            self.logger.info("tls_handshake_failed %s",
                             fields(client=client, error=getattr(exc, "reason", None) or exc))
            return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a failed request with its traceback instead of printing it to stderr."""
        self.logger.exception("request_failed %s", fields(client=client_address[0]))


class TokenRequestHandler(BaseHTTPRequestHandler):
    server: TokenServer
    server_version = "plcbridge-token-server"
    sys_version = ""

    def do_POST(self) -> None:
        client = str(self.client_address[0])
        try:
            retry_s = self.server.limiter.take(client)
            if retry_s > 0:
                self.server.audit.record(client, REFUSED, "rate_limited")
                self._reply(HTTPStatus.TOO_MANY_REQUESTS,
                            {"error": "rate_limited", "message": "too many requests"},
                            {"Retry-After": str(math.ceil(retry_s))})
                return
            body = self._read_body()
            if self.path == CHALLENGE_PATH:
                self._challenge(client, body)
            elif self.path == TOKEN_PATH:
                self._token(client, body)
            else:
                raise Refusal(HTTPStatus.NOT_FOUND, "unknown_path",
                              f"no such endpoint; use {CHALLENGE_PATH} or {TOKEN_PATH}")
        except Refusal as refusal:
            self.server.audit.record(client, REFUSED, refusal.reason, refusal.serial,
                                     refusal.device_id, self._method())
            self._reply(refusal.status, {"error": refusal.reason, "message": str(refusal)})

    def _method(self) -> str:
        return CERTIFICATE if self._certificate_names() else CHALLENGE

    def _read_body(self) -> dict[str, Any]:
        length_text = self.headers.get("Content-Length", "")
        # str.isdigit() also accepts digits such as "²" that int() rejects, and a header of
        # thousands of digits exceeds int()'s conversion limit, so check the text first.
        if (not length_text.isascii() or not length_text.isdigit() or len(length_text) > 9
                or int(length_text) > MAX_BODY_BYTES):
            raise Refusal(HTTPStatus.BAD_REQUEST, "invalid_request",
                          f"expected a JSON body of at most {MAX_BODY_BYTES} bytes with "
                          "Content-Length")
        try:
            body = json.loads(self.rfile.read(int(length_text)) or b"{}")
        except (ValueError, RecursionError, OSError) as exc:
            raise Refusal(HTTPStatus.BAD_REQUEST, "invalid_request",
                          "the body is not valid JSON") from exc
        if not isinstance(body, dict):
            raise Refusal(HTTPStatus.BAD_REQUEST, "invalid_request", "expected a JSON object")
        return body

    def _challenge(self, client: str, body: dict[str, Any]) -> None:
        device = self._allowed_device(self._text(body, "serial"))
        if self.server.keys.secret(device.serial) is None:
            raise Refusal(HTTPStatus.FORBIDDEN, "challenge_not_configured",
                          "no challenge secret is configured for this serial; use its "
                          "client certificate", device.serial, device.device_id)
        nonce = self.server.challenges.issue(device.serial)
        if nonce is None:
            raise Refusal(HTTPStatus.SERVICE_UNAVAILABLE, "too_many_challenges",
                          "too many challenges pending; retry later", device.serial,
                          device.device_id)
        self.server.logger.debug("challenge_issued %s",
                                 fields(client=client, serial=device.serial))
        self._reply(HTTPStatus.OK, {"nonce": nonce,
                                    "expires_in_s": self.server.challenges.ttl_s})

    def _token(self, client: str, body: dict[str, Any]) -> None:
        names = self._certificate_names()
        if names:
            device = self._device_for_certificate(names)
            method = CERTIFICATE
        else:
            device = self._device_for_challenge(body)
            method = CHALLENGE

        issued = self.server.keys.issue(device, time.time())
        self.server.audit.record(client, ISSUED, "ok", device.serial, device.device_id,
                                 method, issued.expiry_s)
        self.server.logger.info("token_issued %s", fields(
            client=client, serial=device.serial, device_id=device.device_id, method=method,
            expiry_s=issued.expiry_s))
        config = self.server.config
        self._reply(HTTPStatus.OK, {
            "token": issued.token, "expiry_s": issued.expiry_s, "ttl_s": config.tokens.ttl_s,
            "device_id": device.device_id, "hub_host_name": config.tokens.hub_host_name,
        })

    def _certificate_names(self) -> list[str]:
        """Return the common names and alternative names of a verified client certificate."""
        certificate = self.connection.getpeercert()
        if not certificate:
            return []
        names = [value for rdn in certificate.get("subject", ())
                 for key, value in rdn if key == "commonName"]
        names += [value for kind, value in certificate.get("subjectAltName", ())
                  if kind in SERIAL_SAN_TYPES]
        return names

    def _device_for_certificate(self, names: list[str]) -> AllowedDevice:
        for name in names:
            device = self.server.config.device(name)
            if device is not None:
                return device
        raise Refusal(HTTPStatus.FORBIDDEN, "unknown_serial",
                      "the client certificate names no serial on the allow-list",
                      serial=names[0][:64])

    def _device_for_challenge(self, body: dict[str, Any]) -> AllowedDevice:
        serial = self._text(body, "serial")
        device = self._allowed_device(serial)
        secret = self.server.keys.secret(serial)
        nonce = self._text(body, "nonce", max_chars=128)
        mac = self._text(body, "mac", max_chars=128)
        outcome = self.server.challenges.redeem(serial, nonce)
        if outcome != challenges.ACCEPTED:
            raise Refusal(HTTPStatus.UNAUTHORIZED, outcome,
                          "the challenge is unknown, used, expired or for another serial; "
                          f"request a new one at {CHALLENGE_PATH}", serial, device.device_id)
        if secret is None or not mac_matches(secret, serial, nonce, mac):
            raise Refusal(HTTPStatus.UNAUTHORIZED, "mac_invalid",
                          "the challenge answer does not match this serial's secret",
                          serial, device.device_id)
        return device

    def _allowed_device(self, serial: str) -> AllowedDevice:
        if not SERIAL_PATTERN.fullmatch(serial):
            raise Refusal(HTTPStatus.BAD_REQUEST, "invalid_request",
                          "invalid serial; expected up to 64 letters, digits and - . _ :")
        device = self.server.config.device(serial)
        if device is None:
            raise Refusal(HTTPStatus.FORBIDDEN, "unknown_serial",
                          "this serial is not on the allow-list", serial)
        return device

    @staticmethod
    def _text(body: dict[str, Any], key: str, max_chars: int = 64) -> str:
        value = body.get(key)
        if not isinstance(value, str) or not value or len(value) > max_chars:
            raise Refusal(HTTPStatus.BAD_REQUEST, "invalid_request",
                          f"expected {key} as a string of 1 to {max_chars} characters")
        return value

    def _reply(self, status: HTTPStatus, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        # A token must not be kept by any cache on the way.
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        # http.server writes every request line to stderr; the audit log already has them.
        self.server.logger.debug("request %s", fields(client=self.client_address[0],
                                                      line=format % args))
