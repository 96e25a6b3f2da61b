"""An Azure IoT Hub Device Provisioning Service (DPS) emulator over MQTT with TLS.

    python -m devstack.dps_emulator --listen 127.0.0.1:8884 \\
        --cert server.pem --key server.key --enrollments enrollments.toml --faults faults.json

The emulator checks each CONNECT as DPS does: client id = registration id, the user name
`<id scope>/registrations/<registration id>/api-version=<version>`, and a SAS token signed
with the individual enrollment's key or with the key derived from a group enrollment's key,
or for X.509 enrollments the client certificate's thumbprint. It responds to register and
operation-status requests itself and assigns each device to its enrollment's hub. The
enrollments and the fault modes are files that it reads again whenever they change.
docs/dps-emulator.md describes both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import signal
import ssl
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import __version__
from common.credentials import parse_sas_token
from common.dps_topics import (
    RESPONSE_FILTER,
    Request,
    parse_request_topic,
    registration_resource,
    response_topic,
)
from common.errors import CredentialError
from common.logs import fields, setup_logging
from devstack.dps_enrollments import Enrollment, Enrollments, parse_enrollments
from devstack.dps_faults import DpsFaults, parse_dps_faults
from devstack.followed_file import FollowedFile
from devstack.hub_auth import MAX_EXPIRY_S, Rejected, decode_signature, raw_token_fields
from devstack.hub_emulator import OneLineParser, OptionsError, parse_endpoint
from devstack.mqtt_frames import (
    CONNACK_ACCEPTED,
    CONNACK_NOT_AUTHORIZED,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBLISH,
    SUBACK_FAILURE,
    SUBSCRIBE,
    UNSUBSCRIBE,
    Connect,
    FrameError,
    connack,
    parse_connect,
    parse_publish,
    parse_subscribe,
    pingresp,
    puback,
    publish_payload,
    publish_qos0,
    read_packet,
    suback,
    unsuback,
)

# A client that has not finished TLS or sent CONNECT by then is dropped.
HANDSHAKE_TIMEOUT_S = 10.0
TLS_SHUTDOWN_TIMEOUT_S = 1.0
# A register request is a small JSON document, so a larger body is rejected as invalid.
MAX_REQUEST_BYTES = 64 * 1024
# DPS error codes for the responses the emulator sends.
ERROR_THROTTLED = 429001
ERROR_BAD_REQUEST = 400004
ERROR_NOT_FOUND = 404201
ERROR_FAILED = 400209


@dataclass
class Operation:
    operation_id: str
    registration_id: str
    enrollment: Enrollment
    payload: Any
    polls_left: int
    created: str


class DpsEmulator:
    """The TLS listener, the enrollments in force and the registration operations."""

    def __init__(self, args: argparse.Namespace, logger: logging.Logger) -> None:
        self.args = args
        self.logger = logger
        self.enrollments = FollowedFile(args.enrollments, parse_enrollments, None,
                                        "enrollments", logger)
        self.faults = FollowedFile(args.faults, parse_dps_faults, DpsFaults(), "faults", logger)
        self.tls = _server_tls_context(args)
        self.operations: dict[str, Operation] = {}
        self._throttled = 0
        self._throttle_generation = -1
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        try:
            admitted = await self._admit(reader, writer, peer)
            if admitted is not None:
                await self._serve(reader, writer, *admitted)
        except (FrameError, OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            self.logger.info("connection_failed %s", fields(peer=peer, error=repr(exc)))
        except Exception:
            # A bug must not stop the listener.
            self.logger.exception("connection_failed %s", fields(peer=peer))
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _admit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer: str) -> tuple[str, Enrollment] | None:
        """Read and check the CONNECT; return the registration id and its enrollment."""
        packet = await asyncio.wait_for(read_packet(reader), HANDSHAKE_TIMEOUT_S)
        if packet is None or packet.packet_type != CONNECT:
            self.logger.info("connect_failed %s", fields(peer=peer, error="no CONNECT"))
            return None
        connect = parse_connect(packet.body)
        ssl_object = writer.get_extra_info("ssl_object")
        certificate = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        try:
            enrollment, method = self._authenticate(connect, certificate)
        except Rejected as exc:
            self.logger.info("connect_rejected %s", fields(
                registration_id=connect.client_id, peer=peer, reason=exc))
            writer.write(connack(CONNACK_NOT_AUTHORIZED))
            await writer.drain()
            return None
        self.logger.info("connect_accepted %s", fields(
            registration_id=connect.client_id, peer=peer, enrollment=enrollment.name,
            auth=method))
        writer.write(connack(CONNACK_ACCEPTED))
        await writer.drain()
        return connect.client_id, enrollment

    def _authenticate(self, connect: Connect,
                      certificate: bytes | None) -> tuple[Enrollment, str]:
        enrollments = self.enrollments.current()
        if enrollments is None:
            raise Rejected("no valid enrollments file")
        registration_id = connect.client_id
        expected_user = registration_resource(enrollments.id_scope, registration_id)
        user = connect.username or ""
        path, separator, version = user.partition("/api-version=")
        if not separator or not version or path.lower() != expected_user.lower():
            raise Rejected(f"user name {user!r} does not match "
                           f"{expected_user}/api-version=<version>")

        individual = enrollments.individual_for(registration_id)
        if individual is not None and individual.attestation == "x509":
            return individual, _check_thumbprint(certificate, individual)
        candidates = [individual] if individual is not None else list(enrollments.groups)
        if not candidates:
            raise Rejected("registration id matches no individual enrollment, and there is "
                           "no group enrollment")
        return self._check_sas(connect, enrollments, candidates)

    def _check_sas(self, connect: Connect, enrollments: Enrollments,
                   candidates: list[Enrollment]) -> tuple[Enrollment, str]:
        """Verify the SAS token against each candidate enrollment's keys."""
        if connect.password is None:
            raise Rejected("no password; a symmetric-key enrollment needs a SAS token")
        try:
            text = connect.password.decode("utf-8")
            token = parse_sas_token(text, "password field")
        except (UnicodeDecodeError, CredentialError, ValueError) as exc:
            raise Rejected(f"invalid SAS token: {exc}") from exc
        expected = registration_resource(enrollments.id_scope, connect.client_id)
        if token.resource.lower() != expected.lower():
            raise Rejected(f"token scope sr={token.resource!r}; expected {expected!r}")
        if token.policy not in (None, "registration"):
            raise Rejected(f"token skn={token.policy!r}; expected registration or none")
        if token.expiry_s > MAX_EXPIRY_S or token.expiry_s + self.args.skew_s <= time.time():
            raise Rejected(f"token expired or out of range: se={token.expiry_s}")

        raw = raw_token_fields(text)
        signature = decode_signature(raw["sig"])
        message = f"{raw['sr']}\n{raw['se']}".encode()
        for enrollment in candidates:
            for name, key in enrollment.device_keys(connect.client_id):
                digest = hmac.new(key, message, hashlib.sha256).digest()
                if hmac.compare_digest(digest, signature):
                    return enrollment, f"sas {enrollment.kind} {name}"
        raise Rejected("signature matches no key of the matching enrollments")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     registration_id: str, enrollment: Enrollment) -> None:
        """Respond to SUBSCRIBE, PUBLISH and PINGREQ until the client disconnects."""
        while True:
            packet = await read_packet(reader)
            if packet is None or packet.packet_type == DISCONNECT:
                self.logger.info("disconnected %s", fields(registration_id=registration_id))
                return
            if packet.packet_type == SUBSCRIBE:
                packet_id = int.from_bytes(packet.body[:2], "big")
                filters = parse_subscribe(packet.flags, packet.body)
                codes = [0 if topic == RESPONSE_FILTER else SUBACK_FAILURE for topic in filters]
                writer.write(suback(packet_id, codes))
            elif packet.packet_type == UNSUBSCRIBE:
                writer.write(unsuback(int.from_bytes(packet.body[:2], "big")))
            elif packet.packet_type == PINGREQ:
                writer.write(pingresp())
            elif packet.packet_type == PUBLISH:
                publish = parse_publish(packet.flags, packet.body)
                if publish.packet_id is not None:
                    writer.write(puback(publish.packet_id))
                request = parse_request_topic(publish.topic)
                if request is None:
                    self.logger.info("publish_rejected %s", fields(
                        registration_id=registration_id, topic=publish.topic))
                    return
                body = publish_payload(publish, packet.body)
                writer.write(self._respond(registration_id, enrollment, request, body))
            elif packet.packet_type != PUBACK:
                self.logger.info("packet_rejected %s", fields(
                    registration_id=registration_id, packet_type=packet.packet_type))
                return
            await writer.drain()

    def _respond(self, registration_id: str, enrollment: Enrollment, request: Request,
                 body: bytes) -> bytes:
        """Build the response PUBLISH to one register or poll request, and log it."""
        self.requests += 1
        faults = self.faults.current()
        status, document = self._answer(registration_id, enrollment, request, body, faults)
        retry_after = faults.retry_after_s if status in (202, 429) else None
        self.logger.info("request %s", fields(
            kind=request.kind, registration_id=registration_id, rid=request.request_id,
            status=status, outcome=document.get("status", document.get("errorCode")),
            count=self.requests))
        topic = response_topic(status, request.request_id, retry_after)
        return publish_qos0(topic, json.dumps(document).encode())

    def _answer(self, registration_id: str, enrollment: Enrollment, request: Request,
                body: bytes, faults: DpsFaults) -> tuple[int, dict[str, Any]]:
        if self.faults.generation != self._throttle_generation:
            self._throttle_generation = self.faults.generation
            self._throttled = 0
        if self._throttled < faults.throttle_requests:
            self._throttled += 1
            return 429, _error(ERROR_THROTTLED, "Operations are being throttled.")

        if request.kind == "register":
            return self._register(registration_id, enrollment, body, faults)
        operation = self.operations.get(request.operation_id or "")
        if operation is None or operation.registration_id != registration_id:
            return 404, _error(ERROR_NOT_FOUND, f"operation {request.operation_id!r} not found")
        if operation.polls_left > 0:
            operation.polls_left -= 1
            return 202, {"operationId": operation.operation_id, "status": "assigning"}
        return 200, self._outcome(operation, faults)

    def _register(self, registration_id: str, enrollment: Enrollment, body: bytes,
                  faults: DpsFaults) -> tuple[int, dict[str, Any]]:
        try:
            if len(body) > MAX_REQUEST_BYTES:
                raise ValueError(f"body of {len(body)} bytes")
            document = json.loads(body)
            if not isinstance(document, dict):
                raise ValueError("body is not a JSON object")
        except ValueError as exc:
            return 400, _error(ERROR_BAD_REQUEST, f"invalid register request: {exc}")
        if str(document.get("registrationId", "")).lower() != registration_id.lower():
            return 400, _error(ERROR_BAD_REQUEST, "registrationId differs from the client id")

        operation = Operation(f"4.{uuid.uuid4().hex}", registration_id, enrollment,
                              document.get("payload"), faults.assigning_polls, _now_text())
        self.operations[operation.operation_id] = operation
        self.logger.info("registration %s", fields(
            registration_id=registration_id, operation_id=operation.operation_id,
            payload=json.dumps(operation.payload, sort_keys=True)))
        return 202, {"operationId": operation.operation_id, "status": "assigning"}

    def _outcome(self, operation: Operation, faults: DpsFaults) -> dict[str, Any]:
        """Return the final operation status: disabled, failed or assigned."""
        state: dict[str, Any] = {
            "registrationId": operation.registration_id,
            "createdDateTimeUtc": operation.created,
            "lastUpdatedDateTimeUtc": _now_text(),
            "etag": uuid.uuid4().hex,
        }
        if faults.disabled:
            status = "disabled"
        elif faults.failed:
            status = "failed"
            state.update(errorCode=ERROR_FAILED, errorMessage="Custom allocation failed.")
        else:
            status = "assigned"
            enrollment = self.enrollments.current()
            # The enrollment as it is now, so that moving it to another hub takes effect.
            current = _find(enrollment, operation) or operation.enrollment
            state.update(assignedHub=current.assigned_hub,
                         deviceId=current.device_id or operation.registration_id,
                         substatus="initialAssignment", payload=operation.payload)
        state["status"] = status
        return {"operationId": operation.operation_id, "status": status,
                "registrationState": state}


def _find(enrollments: Enrollments | None, operation: Operation) -> Enrollment | None:
    if enrollments is None:
        return None
    individual = enrollments.individual_for(operation.registration_id)
    if individual is not None:
        return individual
    return next((group for group in enrollments.groups
                 if group.name == operation.enrollment.name), None)


def _check_thumbprint(certificate: bytes | None, enrollment: Enrollment) -> str:
    if certificate is None:
        raise Rejected("no client certificate; this enrollment uses X.509")
    sha1 = hashlib.sha1(certificate).hexdigest()
    sha256 = hashlib.sha256(certificate).hexdigest()
    if sha1 in enrollment.thumbprints or sha256 in enrollment.thumbprints:
        return "x509 thumbprint"
    raise Rejected(f"certificate thumbprint sha1={sha1} matches no enrolled thumbprint")


def _error(code: int, message: str) -> dict[str, Any]:
    return {"errorCode": code, "trackingId": str(uuid.uuid4()), "message": message,
            "timestampUtc": _now_text()}


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _peer(writer: asyncio.StreamWriter) -> str:
    address = writer.get_extra_info("peername")
    return f"{address[0]}:{address[1]}" if address else "unknown"


def _server_tls_context(args: argparse.Namespace) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(args.cert, args.key)
        if args.client_ca is not None:
            # Optional: symmetric-key devices send no certificate.
            context.verify_mode = ssl.CERT_OPTIONAL
            context.load_verify_locations(args.client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise OptionsError(f"cannot load the TLS files: {exc}") from exc
    return context


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m devstack.dps_emulator",
                            description="Emulate Azure IoT Hub DPS over MQTT with TLS.")
    parser.add_argument("--listen", default="127.0.0.1:8884",
                        help="host:port of the MQTT TLS listener; port 0 picks a free one")
    parser.add_argument("--cert", type=Path, required=True, help="server certificate (PEM)")
    parser.add_argument("--key", type=Path, required=True, help="server private key (PEM)")
    parser.add_argument("--client-ca", type=Path,
                        help="CA bundle for X.509 devices' certificates; without it no client "
                             "certificate is requested")
    parser.add_argument("--enrollments", type=Path, required=True,
                        help="enrollments (TOML), read again whenever it changes")
    parser.add_argument("--faults", type=Path,
                        help="JSON file of fault modes, read again whenever it changes")
    parser.add_argument("--skew-s", type=float, default=300.0,
                        help="seconds a SAS token is still accepted after its se (default 300)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


async def _run(emulator: DpsEmulator, host: str, port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    try:
        server = await asyncio.start_server(
            emulator.handle, host, port, ssl=emulator.tls,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S)
    except OSError as exc:
        emulator.logger.error("listen_failed %s", fields(host=host, port=port, error=exc))
        return 1
    mqtt_port = server.sockets[0].getsockname()[1]
    emulator.logger.info("started %s", fields(version=__version__, mqtt_port=mqtt_port,
                                             enrollments=emulator.enrollments.current()))
    print(f"dps_emulator ready mqtt_port={mqtt_port}", flush=True)
    await stop.wait()
    server.close()
    emulator.logger.info("stopped %s", fields(version=__version__))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        host, port = parse_endpoint("--listen", args.listen, allow_zero=True)
        logger = setup_logging("dps_emulator", args.log_level)
        emulator = DpsEmulator(args, logger)
        if emulator.enrollments.current() is None:
            raise OptionsError(f"--enrollments {args.enrollments}: missing or invalid; see "
                               "the log line above")
    except OptionsError as exc:
        print(f"dps_emulator: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_run(emulator, host, port))


if __name__ == "__main__":
    sys.exit(main())
