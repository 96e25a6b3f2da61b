"""One registration with Azure IoT Hub Device Provisioning Service (DPS) over MQTT, with paho.

register() connects, subscribes to the response topic, sends the register request and
polls the operation until DPS ends it. It follows every retry-after that DPS sends: after
"assigning", and after status 429 or any 5xx, which it also retries on its own up to
MAX_THROTTLED_RETRIES times. Everything else ends the attempt with DpsError, whose outcome
tells the caller whether to raise an alert. common/dps_topics.py describes the topics.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from common.dps_topics import (
    DEFAULT_RETRY_AFTER_S,
    RESPONSE_FILTER,
    parse_response_topic,
    poll_topic,
    register_topic,
    registration_username,
)
from common.errors import PlcBridgeError
from common.logs import fields

# Status 429 and 5xx responses to one attempt that are retried before it fails. The caller's
# backoff takes over after that, so a DPS that throttles for long is not hammered.
MAX_THROTTLED_RETRIES = 10
KEEPALIVE_S = 60

# Outcomes of a failed attempt.
UNREACHABLE = "unreachable"
REJECTED = "rejected"
THROTTLED = "throttled"
FAILED = "failed"
DISABLED = "disabled"
TIMED_OUT = "timed_out"
STOPPED = "stopped"


class DpsError(PlcBridgeError):
    """A registration attempt that did not end in an assignment; outcome names the reason."""

    def __init__(self, message: str, outcome: str) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass(frozen=True)
class Registration:
    id_scope: str
    registration_id: str
    host: str
    port: int
    api_version: str
    tls_context: ssl.SSLContext
    # A SAS token for symmetric-key attestation; None for X.509.
    password: str | None = field(repr=False)
    payload: Any
    timeout_s: float

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Assignment:
    assigned_hub: str
    device_id: str
    requests: int


class _Exchange:
    """A paho client whose callbacks, which run on paho's thread, post to a queue."""

    def __init__(self, registration: Registration) -> None:
        self.registration = registration
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=registration.registration_id, clean_session=True,
                             protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        client.connect_timeout = registration.timeout_s
        client.username_pw_set(
            registration_username(registration.id_scope, registration.registration_id,
                                  registration.api_version),
            registration.password)
        client.tls_set_context(registration.tls_context)
        # paho 2.x reason codes are objects; only str() of them is taken, on this side.
        client.on_connect = lambda _c, _u, _f, reason, _p: self.events.put(
            ("connack", (reason.is_failure, str(reason))))
        client.on_subscribe = lambda _c, _u, _m, reasons, _p: self.events.put(
            ("suback", [reason.is_failure for reason in reasons]))
        client.on_message = lambda _c, _u, message: self.events.put(
            ("message", (message.topic, bytes(message.payload))))
        client.on_disconnect = lambda _c, _u, _f, reason, _p: self.events.put(
            ("disconnect", str(reason)))
        self.client = client

    def wait(self, kinds: tuple[str, ...], stop: threading.Event, what: str) -> Any:
        """Return the value of the next event of one of kinds; raise DpsError on timeout."""
        deadline = time.monotonic() + self.registration.timeout_s
        while True:
            if stop.is_set():
                raise DpsError("stop requested during provisioning", STOPPED)
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise DpsError(f"no {what} from DPS {self.registration.endpoint} within "
                               f"{self.registration.timeout_s:g} s", TIMED_OUT)
            try:
                kind, value = self.events.get(timeout=min(remaining_s, 0.25))
            except queue.Empty:
                continue
            if kind in kinds:
                return value
            if kind == "disconnect":
                raise DpsError(f"DPS {self.registration.endpoint} closed the connection "
                               f"while waiting for {what}: {value}", UNREACHABLE)


def register(registration: Registration, stop: threading.Event,
             logger: logging.Logger) -> Assignment:
    """Run one registration; return the assignment or raise DpsError."""
    exchange = _Exchange(registration)
    _connect(exchange.client, registration)
    exchange.client.loop_start()
    try:
        rejected, reason = exchange.wait(("connack",), stop, "CONNACK")
        if rejected:
            raise DpsError(f"DPS {registration.endpoint} rejected the connection: {reason}; "
                           "check the id scope, the registration id and the key or "
                           "certificate", REJECTED)
        exchange.client.subscribe(RESPONSE_FILTER, qos=1)
        if any(exchange.wait(("suback",), stop, "SUBACK")):
            raise DpsError(f"DPS {registration.endpoint} rejected the subscription to "
                           f"{RESPONSE_FILTER}", REJECTED)
        return _run_operation(exchange, stop, logger)
    finally:
        exchange.client.disconnect()
        exchange.client.loop_stop()


def _connect(client: mqtt.Client, registration: Registration) -> None:
    where = registration.endpoint
    try:
        client.connect(registration.host, registration.port, keepalive=KEEPALIVE_S)
    except ssl.SSLCertVerificationError as exc:
        raise DpsError(f"TLS handshake with DPS {where} failed: {exc.verify_message}; check "
                       "credentials.ca_file", UNREACHABLE) from exc
    except ssl.SSLError as exc:
        raise DpsError(f"TLS handshake with DPS {where} failed: {exc.reason or exc}",
                       UNREACHABLE) from exc
    except socket.gaierror as exc:
        raise DpsError(f"cannot resolve DPS host {registration.host}: {exc.strerror}",
                       UNREACHABLE) from exc
    except (OSError, TimeoutError) as exc:
        raise DpsError(f"connect to DPS {where} failed: {exc.strerror or exc!r}",
                       UNREACHABLE) from exc


def _run_operation(exchange: _Exchange, stop: threading.Event,
                   logger: logging.Logger) -> Assignment:
    """Send register, then poll, until DPS ends the operation."""
    registration = exchange.registration
    operation_id: str | None = None
    throttled = 0
    request_number = 0
    while True:
        request_number += 1
        request_id = str(request_number)
        if operation_id is None:
            topic = register_topic(request_id)
            body = json.dumps({"registrationId": registration.registration_id,
                               "payload": registration.payload}).encode()
        else:
            topic = poll_topic(request_id, operation_id)
            body = b""
        exchange.client.publish(topic, body, qos=1)
        status, retry_after_s, document = _await_response(exchange, request_id, stop)

        outcome = str(document.get("status", ""))
        logger.info("dps_response %s", fields(
            registration_id=registration.registration_id, request=request_number,
            status=status, outcome=outcome or document.get("errorCode", "-"),
            retry_after_s=retry_after_s if retry_after_s is not None else "-"))
        if status == 202 or (status == 200 and outcome in ("assigning", "unassigned")):
            operation_id = str(document.get("operationId") or operation_id or "")
            if not operation_id:
                raise DpsError(f"DPS {registration.endpoint} responded with status {status} "
                               "without an operationId", REJECTED)
            _sleep(stop, retry_after_s)
            continue
        if status == 200:
            return _finish(registration, document, outcome, request_number)
        if status == 429 or status >= 500:
            throttled += 1
            if throttled > MAX_THROTTLED_RETRIES:
                raise DpsError(f"DPS {registration.endpoint} responded with status {status} "
                               f"{throttled} times in a row; {_error_text(document)}", THROTTLED)
            _sleep(stop, retry_after_s)
            continue
        raise DpsError(f"DPS {registration.endpoint} responded with status {status}: "
                       f"{_error_text(document)}", REJECTED)


def _await_response(exchange: _Exchange, request_id: str,
                    stop: threading.Event) -> tuple[int, float | None, dict[str, Any]]:
    """Wait for the response that carries request_id; drop stale ones of earlier requests."""
    while True:
        topic, payload = exchange.wait(("message",), stop, f"a response to request {request_id}")
        try:
            response = parse_response_topic(topic)
        except ValueError:
            continue
        if response.request_id != request_id:
            continue
        try:
            document = json.loads(payload) if payload else {}
        except ValueError:
            document = {}
        if not isinstance(document, dict):
            document = {}
        return response.status, response.retry_after_s, document


def _finish(registration: Registration, document: dict[str, Any], outcome: str,
            requests: int) -> Assignment:
    state = document.get("registrationState")
    state = state if isinstance(state, dict) else {}
    where = f"DPS {registration.endpoint}"
    if outcome == "assigned":
        hub, device_id = state.get("assignedHub"), state.get("deviceId")
        if not isinstance(hub, str) or not hub or not isinstance(device_id, str) or not device_id:
            raise DpsError(f"{where} responded 'assigned' without assignedHub and deviceId",
                           REJECTED)
        return Assignment(hub, device_id, requests)
    if outcome == DISABLED:
        raise DpsError(f"{where}: the enrollment of {registration.registration_id} is "
                       "disabled; enable it in DPS", DISABLED)
    if outcome == FAILED:
        raise DpsError(f"{where}: registration of {registration.registration_id} failed: "
                       f"errorCode={state.get('errorCode')} "
                       f"message={state.get('errorMessage')!r}", FAILED)
    raise DpsError(f"{where} responded with operation status {outcome!r}; expected "
                   "assigned, failed or disabled", REJECTED)


def _error_text(document: dict[str, Any]) -> str:
    return (f"errorCode={document.get('errorCode')} message={document.get('message')!r} "
            f"trackingId={document.get('trackingId')}")


def _sleep(stop: threading.Event, retry_after_s: float | None) -> None:
    if stop.wait(DEFAULT_RETRY_AFTER_S if retry_after_s is None else retry_after_s):
        raise DpsError("stop requested during provisioning", STOPPED)
