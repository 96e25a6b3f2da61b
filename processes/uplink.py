"""The uplink: publishes the buffer's pages to Azure IoT Hub, or to any MQTT broker, over TLS.

`python -m processes.uplink --config FILE`

Two threads share the work, because ZeroMQ sockets must stay on one thread and paho's
callbacks run on its network thread:

- The main thread owns every ZeroMQ socket: the DEALER to the buffer's delivery ROUTER and
  the tap. It forwards pages to the network thread and turns the network thread's events
  into link and puback messages.
- The "mqtt-network" thread owns the paho client and its socket. It connects, waits for
  CONNACK, runs paho's network loop with its own select(), publishes, and reconnects with
  backoff. Every connection attempt gets a fresh paho client, so paho never resends a page
  of an old connection. The buffer redelivers unacknowledged pages to the next session
  instead.

Each direction is a queue.Queue plus a socketpair wake-up that the other side polls.

Delivery is at least once. A page that was published but whose PUBACK was lost is sent
again in the next session, so the cloud side may see a page_seq twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import queue
import random
import secrets
import select
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import zmq

from common import wire
from common.alerts import AlertBook
from common.backoff import Backoff
from common.clock import HubClock, TimeFloor
from common.config import Config, CredentialSettings
from common.credential_files import (
    ClientCertificate,
    read_passphrase,
    validate_credential_files,
)
from common.credential_guard import CredentialGuard, DateSource, TokenState
from common.credentials import (
    ConnectionString,
    SasToken,
    mint_sas_token,
    read_connection_string,
    read_password_file,
)
from common.errors import CredentialError, PlcBridgeError, UplinkError
from common.last_good_credentials import CredentialSnapshot, read_snapshot
from common.lifecycle import gateway_version, run_process
from common.logs import fields
from common.payload import CONTENT_ENCODING, CONTENT_TYPE
from common.socket_monitor import SocketMonitor
from common.tap import Tap
from common.token_client import TokenServerClient
from processes.uplink_commands import CommandDispatcher, CommandResult, Handler, ResultOutbox
from processes.uplink_fallback import Choice, CredentialSets
from processes.uplink_first_boot import wait_for_provisioning
from processes.uplink_health import HEALTH_PAGE_SEQ, HealthMonitor, LinkFigures
from processes.uplink_metrics import MetricsServer
from processes.uplink_rotation import RotationCommand
from processes.uplink_tag_writes import TagWriter
from processes.uplink_token import RemoteTokenSource, TokenUnavailableError

PROCESS = "uplink"

# A minted SAS token is replaced at a random fraction of its remaining lifetime in this
# range. 0.8 is what Azure's C SDK uses. The jitter keeps a fleet whose gateways started
# together from reconnecting to the hub at the same moment, and the renewal still comes
# well before the hub closes the connection for an expired token.
SAS_RENEW_FRACTION_MIN = 0.75
SAS_RENEW_FRACTION_MAX = 0.85

# How long the main thread waits in one poll; it also bounds how late it notices a stop.
MAIN_POLL_S = 0.2

# How often the link state is repeated to the buffer and the tap counters are published.
LINK_REPEAT_S = 1.0

# The buffer may start after the uplink; only a longer silence is worth a warning.
BUFFER_WARNING_S = 5.0

# Linger of the DEALER, so the final "link down" still reaches a running buffer at exit.
DEALER_LINGER_MS = 200


# ---------------------------------------------------------------------------------------
# Identity: where to connect and as whom, read once from the credential files.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedPassword:
    """The MQTT password for one connection attempt, and the SAS expiry it carries."""

    text: str | None = field(repr=False)
    expiry_s: int | None
    minted: bool
    # Seconds of lifetime left by the monotonic clock, when the source knows them.
    left_s: float | None = None


@dataclass(frozen=True)
class PasswordSource:
    """Produces the password of each connection: a fresh SAS token, a given one, or a file's.

    Only one of key, token, static and remote is set, or none for X.509 or a broker without
    passwords. remote fetches tokens from the on-site token server.
    """

    key: bytes | None = field(default=None, repr=False)
    resource_uri: str = ""
    ttl_s: int = 0
    token: SasToken | None = None
    static: str | None = field(default=None, repr=False)
    remote: RemoteTokenSource | None = None

    def issue(self, now_s: float) -> IssuedPassword:
        """Return the next connection's password; raise TokenUnavailableError without one."""
        if self.remote is not None:
            # Renewable like a minted token, because the server issues a new one on request.
            fetched, left_s = self.remote.issue()
            return IssuedPassword(fetched.token.text, fetched.token.expiry_s, minted=True,
                                  left_s=left_s)
        if self.key is not None:
            expiry_s = int(now_s) + self.ttl_s
            text = mint_sas_token(self.resource_uri, self.key, expiry_s)
            return IssuedPassword(text, expiry_s, minted=True)
        if self.token is not None:
            return IssuedPassword(self.token.text, self.token.expiry_s, minted=False)
        return IssuedPassword(self.static, None, minted=False)

    def prepare_renewal(self) -> float | None:
        """Return None when the next token is ready, or the seconds to wait before asking
        again, while the connection keeps its token."""
        return self.remote.prepare_renewal() if self.remote is not None else None


@dataclass(frozen=True)
class Identity:
    """Everything one MQTT connection needs, resolved once at start."""

    connect_host: str
    port: int
    client_id: str
    username: str | None
    tls_context: ssl.SSLContext | None
    topic_format: str
    c2d_filter: str | None
    password: PasswordSource
    description: str
    client_certificate: ClientCertificate | None = None
    # Topic of the gateway's own messages, with {kind} to fill in; None sends none.
    event_topic_format: str | None = None
    # The CA bundle that tls_context trusts, for the error of a failed verification.
    ca_file: Path | None = None

    def topic(self, page_seq: int) -> str:
        return self.topic_format.format(page_seq=page_seq)

    def event_topic(self, kind: str) -> str | None:
        """Return the topic of an alert or health message, or None when there is none."""
        if self.event_topic_format is None:
            return None
        return self.event_topic_format.format(kind=kind)


def load_identity(config: Config, logger: logging.Logger) -> Identity:
    """Read the credential files named in the configuration; raise CredentialError if unusable."""
    # The same validation as the credential watcher's, so a bad file gets the same clear
    # error, such as a client key that does not match its certificate.
    loaded = validate_credential_files(config.credentials)
    if config.uplink.mode == "azure":
        identity = _azure_identity(config, logger)
    else:
        identity = _mqtt_identity(config, logger)
    return dataclasses.replace(identity, client_certificate=loaded.client_certificate,
                               ca_file=config.credentials.ca_file)


# A rotation written while the files are read is read again, at most this many times.
SNAPSHOT_ATTEMPTS = 3


def load_identity_with_snapshot(
    config: Config, logger: logging.Logger
) -> tuple[Identity, CredentialSnapshot | None]:
    """Load the identity and the bytes of the files it was built from.

    The files are read before and after the identity is built. The bytes are returned only
    when both reads agree, because only then are they the set that will connect and that
    the uplink may save as the last good set.
    """
    identity = None
    for _attempt in range(SNAPSHOT_ATTEMPTS):
        try:
            before = read_snapshot(config.credentials)
        except (OSError, ValueError):
            before = None
        identity = load_identity(config, logger)
        try:
            after = read_snapshot(config.credentials)
        except (OSError, ValueError):
            after = None
        if before is not None and before == after:
            return identity, before
    # The files keep changing, so the credential watcher restarts the uplink soon anyway.
    logger.warning("credential_snapshot_unstable %s",
                   fields(attempts=SNAPSHOT_ATTEMPTS,
                          consequence="this run does not save its credentials as the last "
                          "good set and cannot fall back to it"))
    assert identity is not None
    return identity, None


def _azure_identity(config: Config, logger: logging.Logger) -> Identity:
    credentials = config.credentials
    if credentials.token_server is not None:
        return _token_server_identity(config, logger)
    assert credentials.connection_string_file is not None  # the config loader enforces it
    connection = read_connection_string(credentials.connection_string_file)

    if connection.x509 and credentials.client_cert_file is None:
        raise CredentialError(
            f"{credentials.connection_string_file}: the connection string selects x509, "
            "but credentials.client_cert_file and credentials.client_key_file are not set"
        )
    if connection.token is not None:
        _check_token_resource(connection, connection.token, logger)

    password = PasswordSource(
        key=connection.shared_access_key,
        resource_uri=connection.resource_uri,
        ttl_s=config.uplink.sas_ttl_s,
        token=connection.token,
    )
    return Identity(
        connect_host=connection.connect_host,
        port=config.uplink.port,
        client_id=connection.client_id,
        username=(
            f"{connection.host_name}/{connection.client_id}/"
            f"?api-version={config.uplink.api_version}"
        ),
        tls_context=build_tls_context(credentials),
        topic_format=_azure_topic_format(connection),
        event_topic_format=_azure_event_topic_format(connection),
        c2d_filter=_c2d_filter(connection),
        password=password,
        description=f"azure hub={connection.host_name} auth={connection.scheme.replace(' ', '_')}",
    )


def _token_server_identity(config: Config, logger: logging.Logger) -> Identity:
    """Build the identity of a gateway whose SAS tokens come from the on-site token server."""
    settings = config.credentials.token_server
    assert settings is not None
    connection = ConnectionString(host_name=settings.hub_host_name,
                                  device_id=settings.device_id, module_id=None,
                                  gateway_host_name=None)
    source = RemoteTokenSource(
        TokenServerClient(settings),
        lambda: random.uniform(SAS_RENEW_FRACTION_MIN, SAS_RENEW_FRACTION_MAX),
        Backoff(config.uplink.reconnect_min_s, config.uplink.reconnect_max_s), logger,
    )
    return Identity(
        connect_host=connection.connect_host,
        port=config.uplink.port,
        client_id=connection.client_id,
        username=(f"{connection.host_name}/{connection.client_id}/"
                  f"?api-version={config.uplink.api_version}"),
        tls_context=build_tls_context(config.credentials),
        topic_format=_azure_topic_format(connection),
        event_topic_format=_azure_event_topic_format(connection),
        c2d_filter=_c2d_filter(connection),
        password=PasswordSource(remote=source),
        description=f"azure hub={connection.host_name} auth=token_server",
    )


def _azure_topic_format(connection: ConnectionString) -> str:
    """Build the telemetry topic with its property bag, leaving {page_seq} to fill in.

    The property bag carries the message id and the content type and encoding, URL-encoded,
    as IoT Hub's MQTT support expects them.
    """
    content_type = urllib.parse.quote(CONTENT_TYPE, safe="")
    content_encoding = urllib.parse.quote(CONTENT_ENCODING, safe="")
    return (_azure_events_prefix(connection) + "$.mid={page_seq}"
            + f"&$.ct={content_type}&$.ce={content_encoding}")


def _azure_event_topic_format(connection: ConnectionString) -> str:
    """Build the topic of alert and health messages, leaving {kind} to fill in.

    The application property plcbridge-kind distinguishes them from pages in the cloud's
    message routing. Their body is JSON in UTF-8, not compressed.
    """
    return (_azure_events_prefix(connection)
            + "plcbridge-kind={kind}&$.ct=application%2Fjson&$.ce=utf-8")


def _azure_events_prefix(connection: ConnectionString) -> str:
    device = connection.device_id.replace("{", "{{").replace("}", "}}")
    if connection.module_id:
        module = connection.module_id.replace("{", "{{").replace("}", "}}")
        return f"devices/{device}/modules/{module}/messages/events/"
    return f"devices/{device}/messages/events/"


def _c2d_filter(connection: ConnectionString) -> str | None:
    # NOTE: IoT Hub delivers cloud-to-device messages to device identities. A module
    # identity does not subscribe, because the hub is understood to keep no such queue for
    # modules. This was not checked against a real hub.
    if connection.module_id:
        return None
    return f"devices/{connection.device_id}/messages/devicebound/#"


def _check_token_resource(
    connection: ConnectionString, token: SasToken, logger: logging.Logger
) -> None:
    """Warn when a given token is signed for another device, because the hub will refuse it."""
    resource = token.resource.lower()
    accepted = (connection.resource_uri.lower(), connection.host_name.lower())
    if resource not in accepted:
        logger.warning(
            "sas_check %s",
            fields(
                token_resource=token.resource,
                expected=connection.resource_uri,
                consequence="the hub will refuse the connection (CONNACK 5)",
            ),
        )


def _mqtt_identity(config: Config, logger: logging.Logger) -> Identity:
    broker = config.uplink.broker
    assert broker is not None  # the config loader builds it in mqtt mode
    credentials = config.credentials

    password_text = (
        read_password_file(credentials.password_file) if credentials.password_file else None
    )
    if password_text is not None and not broker.username:
        raise CredentialError(
            f"{credentials.password_file}: credentials.password_file is set but "
            "uplink.broker.username is empty; MQTT 3.1.1 sends a password only with a "
            "username, so set uplink.broker.username"
        )
    if not broker.tls and not _is_loopback(broker.host):
        logger.warning(
            "tls_off %s",
            fields(
                host=broker.host,
                consequence="pages and the password cross the network unencrypted; "
                "set uplink.broker.tls = true for a remote broker",
            ),
        )

    client_id = broker.client_id.replace("{", "{{").replace("}", "}}")
    template = broker.topic_template.replace("{client_id}", client_id)
    event_topic_format = None
    if broker.event_topic is not None:
        event_topic_format = broker.event_topic.replace("{client_id}", client_id)
    c2d_filter = None
    if broker.command_topic is not None:
        c2d_filter = broker.command_topic.format(client_id=broker.client_id)
    return Identity(
        connect_host=broker.host,
        port=config.uplink.port,
        client_id=broker.client_id,
        username=broker.username or None,
        tls_context=build_tls_context(credentials) if broker.tls else None,
        topic_format=template,
        event_topic_format=event_topic_format,
        c2d_filter=c2d_filter,
        password=PasswordSource(static=password_text),
        description=f"mqtt tls={'on' if broker.tls else 'off'}",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_tls_context(credentials: CredentialSettings) -> ssl.SSLContext:
    """Build a TLS 1.2+ client context that trusts only credentials.ca_file.

    The operating system's store is deliberately not loaded: pinning the roots means a
    gateway trusts exactly the roots the operator deployed. Host names are checked.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED

    ca_file = credentials.ca_file
    try:
        # Every certificate in the file is loaded, so a bundle with the current and the next
        # root keeps working across the hub's change of CA.
        context.load_verify_locations(cafile=str(ca_file))
    except FileNotFoundError as exc:
        raise CredentialError(
            f"{ca_file}: CA file not found; set credentials.ca_file to the PEM bundle of the "
            "broker's root certificates"
        ) from exc
    except PermissionError as exc:
        raise CredentialError(
            f"{ca_file}: CA file not readable by this user; check its permissions"
        ) from exc
    except (ssl.SSLError, OSError) as exc:
        raise CredentialError(
            f"{ca_file}: no usable PEM certificate in the CA file ({exc}); "
            "expected the broker's root certificates in PEM form"
        ) from exc
    if context.cert_store_stats()["x509"] == 0:
        raise CredentialError(
            f"{ca_file}: no certificate in the CA file; expected the broker's root "
            "certificates in PEM form"
        )

    if credentials.client_cert_file is not None and credentials.client_key_file is not None:
        _load_client_certificate(context, credentials)
    return context


def _load_client_certificate(context: ssl.SSLContext, credentials: CredentialSettings) -> None:
    cert_file = credentials.client_cert_file
    key_file = credentials.client_key_file
    passphrase_file = credentials.client_key_passphrase_file
    passphrase = read_passphrase(passphrase_file) if passphrase_file is not None else None
    try:
        # The certificate file may carry the device certificate followed by its chain, and
        # OpenSSL then sends the whole chain in the handshake.
        context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file),
                                password=passphrase)
    except FileNotFoundError as exc:
        raise CredentialError(
            f"client certificate {cert_file} or key {key_file} not found: {exc.filename}"
        ) from exc
    except PermissionError as exc:
        raise CredentialError(
            f"client certificate {cert_file} or key {key_file} not readable by this user"
        ) from exc
    except (ssl.SSLError, OSError) as exc:
        # OpenSSL's reason names the problem (a PEM error, KEY_VALUES_MISMATCH) but never
        # the key's content.
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise CredentialError(
            f"client certificate {cert_file} with key {key_file} cannot be loaded: {reason}; "
            "expected a PEM certificate and its unencrypted PEM private key"
        ) from exc


# ---------------------------------------------------------------------------------------
# Messages between the two threads.
# ---------------------------------------------------------------------------------------


class Wakeup:
    """A socketpair that one thread writes a byte to, so the other's poll returns.

    The reading thread calls drain() before it empties the queue that goes with this
    wake-up. Until then a byte is unread, which is enough, so notify() makes no system
    call. Only one thread notifies each Wakeup, so the flag needs no lock.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._unread = False

    def fileno(self) -> int:
        return self._reader.fileno()

    def notify(self) -> None:
        if self._unread:
            return
        self._unread = True
        # A full pipe already contains a pending wake-up, which is all the reader needs, and
        # a closed one means the reading thread has ended.
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")

    def drain(self) -> None:
        # The byte is read before the flag is cleared. A notify() in between writes no byte,
        # but its item is already in the queue that the caller empties next.
        with contextlib.suppress(BlockingIOError):
            self._reader.recv(4096)
        self._unread = False

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


@dataclass(frozen=True)
class LinkEvent:
    """Something that happened on the network thread, for the main thread to act on.

    kind is one of connecting, connected, connect_failed, disconnected, puback, c2d, tap,
    credential_set and fatal. connection numbers the connection attempt it belongs to. A tap
    event has its tap kind in reason and its values in values. A c2d event has the
    message's body in payload.
    """

    kind: str
    connection: int
    page_seq: int = -1
    reason: str = ""
    topic: str = ""
    size: int = 0
    values: dict[str, Any] = field(default_factory=dict)
    payload: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class PublishRequest:
    """A page to publish, or with topic set an alert or health message (negative page_seq)."""

    connection: int
    page_seq: int
    payload: bytes = field(repr=False)
    topic: str | None = None


@dataclass
class Connection:
    """The state of one connection attempt and the paho client made for it alone."""

    number: int
    client: mqtt.Client
    connected: bool = False
    closed: bool = False
    refused: str | None = None
    refused_code: int | None = None
    close_reason: str = ""
    # paho's last error message before CONNACK, such as a TLS alert read after the handshake.
    connect_error: str = ""
    renew_at: float | None = None
    mid_to_page: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """The end of a connection attempt: whether CONNACK had arrived, and the reason."""

    was_connected: bool
    reason: str
    renew: bool = False
    connected_s: float = 0.0
    rejected: bool = False
    tls_rejected: bool = False
    closed_before_connack: bool = False


# A connection that stayed up this long was accepted and worked, so the next reconnect
# starts again at reconnect_min_s.
STABLE_CONNECTION_S = 10.0


def held_long_enough(connected_s: float, reconnect_max_s: float) -> bool:
    """Return whether a connection held long enough to reset the reconnect backoff.

    A broker that accepts and drops at once (another client with the same id, for example)
    is retried ever more slowly instead of once every reconnect_min_s.
    """
    return connected_s >= min(STABLE_CONNECTION_S, reconnect_max_s)


# ---------------------------------------------------------------------------------------
# The network thread: paho, connects, reconnects.
# ---------------------------------------------------------------------------------------

# paho 2.x reason code values of a CONNACK that rejects the credentials: MQTT 3.1.1's
# return codes 4 (bad user name or password) and 5 (not authorized) arrive converted to
# the MQTT 5 values. IoT Hub rejects every failed CONNECT with 5.
CREDENTIALS_REJECTED_CODES = (134, 135)


class CredentialsRejectedError(UplinkError):
    """A CONNACK that rejects the credentials: bad user name or password, or not authorized."""


class ClosedBeforeConnackError(UplinkError):
    """The broker closed the connection after the TLS handshake and before CONNACK."""


class TlsRejectedError(UplinkError):
    """A TLS handshake that failed over a certificate: the CA bundle does not trust the
    server's, or the server rejected the client's."""


# Fragments of OpenSSL 3 reasons of a handshake that the server ended over the client's
# certificate, such as SSLV3_ALERT_BAD_CERTIFICATE, TLSV1_ALERT_UNKNOWN_CA and
# TLSV13_ALERT_CERTIFICATE_REQUIRED.
CLIENT_CERTIFICATE_ALERTS = ("CERTIFICATE", "UNKNOWN_CA")


def _names_certificate_alert(reason: str) -> bool:
    upper = reason.upper()
    return any(fragment in upper for fragment in CLIENT_CERTIFICATE_ALERTS)


class MqttLink(threading.Thread):
    """Runs paho for one connection after another until stop() is called."""

    def __init__(
        self,
        identity: Identity,
        snapshot: CredentialSnapshot | None,
        config: Config,
        logger: logging.Logger,
        events: queue.Queue[LinkEvent],
        events_wakeup: Wakeup,
    ) -> None:
        super().__init__(name="mqtt-network", daemon=True)
        self._identity = identity
        self._settings = config.uplink
        self._logger = logger
        self._clock = HubClock()
        self._guard = CredentialGuard(
            config.credentials, TimeFloor(config.gateway.state_dir, logger), self._clock,
            self._date_source(identity), identity.client_certificate, logger, self._report_tap,
        )
        self._sets = CredentialSets(config, logger, lambda other: load_identity(other, logger),
                                    identity, snapshot, self._report_tap)
        self._rejected_attempts = 0
        if identity.password.remote is not None:
            identity.password.remote.report = self._report_tap
        self._events = events
        self._events_wakeup = events_wakeup
        self._requests: queue.Queue[PublishRequest] = queue.Queue()
        self._wakeup = Wakeup()
        self._events_posted = False  # events queued by paho callbacks, not yet announced
        self._stop_requested = threading.Event()

        # Written only by this thread and read by the main thread for its counters.
        self.published = 0
        self.reconnects = 0
        self.dropped = 0
        self.token_expiry_s: int | None = None
        # What the thread did after a stop request, in order, for the shutdown's log line.
        self.shutdown_steps: list[str] = []

    # -- called from the main thread ----------------------------------------------------

    def request_publish(self, requests: list[PublishRequest]) -> None:
        for request in requests:
            self._requests.put(request)
        self._wakeup.notify()

    def stop(self) -> None:
        self._stop_requested.set()
        self._wakeup.notify()

    # -- the thread ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run_connections()
        except Exception as exc:
            # A bug, not a network condition: report it and let the main thread exit
            # non-zero, so supervisord restarts the uplink from a clean state.
            self._logger.exception("network_thread_failed %s", fields(error=type(exc).__name__))
            self._post(LinkEvent("fatal", 0, reason=f"{type(exc).__name__}: {exc}"))
        finally:
            self._wakeup.close()

    def _run_connections(self) -> None:
        backoff = Backoff(self._settings.reconnect_min_s, self._settings.reconnect_max_s)
        number = 0
        while not self._stop_requested.is_set():
            number += 1
            if number > 1:
                self.reconnects += 1

            outcome = self._run_connection(number, retrying=backoff.attempts > 0)
            if self._stop_requested.is_set():
                return
            if outcome.rejected:
                self._rejected_attempts += 1
                self._guard.after_rejection()
                if self._identity.password.remote is not None:
                    self._identity.password.remote.discard()
            choice = None
            if outcome.rejected or outcome.tls_rejected:
                choice = self._sets.after_failure(outcome.reason, self._clock.now())
            elif outcome.closed_before_connack:
                choice = self._sets.after_early_close(outcome.reason, self._clock.now())
            if choice is not None:
                self._use(choice)
                if choice.at_once:
                    continue

            if held_long_enough(outcome.connected_s, self._settings.reconnect_max_s):
                backoff.reset()
            if outcome.renew:
                self._logger.info("sas_renew %s", fields(reason=outcome.reason))
                continue

            delay_s = backoff.next_delay_s()
            if outcome.rejected:
                self._report_rejection(outcome.reason, delay_s)
                self._stop_requested.wait(delay_s)
                continue
            event = "disconnected" if outcome.was_connected else "connect_failed"
            self._logger.warning(
                "%s %s",
                event,
                fields(
                    reason=outcome.reason,
                    next_delay_s=f"{delay_s:.2f}",
                    consequence="pages wait in the buffer until the next connection",
                ),
            )
            self._stop_requested.wait(delay_s)

    def _date_source(self, identity: Identity) -> DateSource | None:
        if identity.tls_context is None:
            return None
        return DateSource(identity.connect_host, self._settings.date_port, identity.tls_context)

    def _use(self, choice: Choice) -> None:
        """Connect with another credential set from the next attempt on."""
        self._identity = choice.identity
        self._guard.use_credentials(choice.identity.client_certificate,
                                    self._date_source(choice.identity))
        self._logger.info("credential_set %s",
                          fields(set="last_good" if choice.last_good else "current",
                                 identity=choice.identity.description))
        self._post(LinkEvent("credential_set", 0, values={"identity": choice.identity,
                                                          "last_good": choice.last_good}))

    def _report_rejection(self, reason: str, delay_s: float) -> None:
        """Raise one alert for a run of rejected connects, then log each retry at INFO."""
        if self._rejected_attempts > 1:
            self._logger.info(
                "connect_rejected_again %s",
                fields(rejected_attempts=self._rejected_attempts, next_delay_s=f"{delay_s:.2f}"),
            )
            return

        if self._identity.password.key is not None:
            remedy = "a freshly minted SAS token is tried on each attempt"
        elif self._identity.password.remote is not None:
            remedy = ("a new SAS token is fetched from the token server for each attempt; "
                      "check the device key that the server holds for this device")
        elif self._identity.password.token is not None:
            remedy = "only a new SAS token or device key in the connection string fixes this"
        else:
            remedy = "check the device's registration and certificate"
        self._logger.error(
            "credentials_rejected %s",
            fields(reason=reason, next_delay_s=f"{delay_s:.2f}",
                   max_delay_s=f"{self._settings.reconnect_max_s:g}", remedy=remedy,
                   consequence="pages wait in the buffer; retries are logged at INFO"),
        )
        self._report_tap("credentials_rejected", reason=reason, remedy=remedy)

    def _report_tap(self, kind: str, **values: Any) -> None:
        """Publish an event on the uplink's tap; the main thread owns the tap's socket."""
        self._post(LinkEvent("tap", 0, reason=kind, values=values))

    def _run_connection(self, number: int, retrying: bool) -> Outcome:
        """Connect, wait for CONNACK, serve the connection; return how it ended."""
        self._guard.before_connect(retrying)
        try:
            issued = self._identity.password.issue(self._clock.now())
        except TokenUnavailableError as exc:
            self._post(LinkEvent("connect_failed", number, reason=str(exc)))
            return Outcome(False, str(exc))
        token = None
        self.token_expiry_s = issued.expiry_s
        if issued.expiry_s is not None:
            token = TokenState(issued.expiry_s, issued.minted)
        self._guard.check_token(token, retrying)
        connection = Connection(number, self._new_client(issued))
        connection.client.user_data_set(connection)
        host, port = self._identity.connect_host, self._identity.port
        self._logger.info(
            "connecting %s",
            fields(host=host, port=port, client_id=self._identity.client_id, attempt=number),
        )
        self._post(LinkEvent("connecting", number, reason=f"{host}:{port}"))

        # Connect and wait for CONNACK.
        try:
            self._open(connection)
            self._await_connack(connection)
        except UplinkError as exc:
            if self._stop_requested.is_set():
                # Without a CONNACK there is no session to end with DISCONNECT.
                self.shutdown_steps.extend(("network_loop_stopped", "disconnect_skipped"))
            self._close(connection)
            rejected = isinstance(exc, CredentialsRejectedError)
            if not self._stop_requested.is_set():
                self._post(LinkEvent("connect_failed", number, reason=str(exc),
                                     values={"rejected": rejected}))
            return Outcome(False, str(exc), rejected=rejected,
                           tls_rejected=isinstance(exc, TlsRejectedError),
                           closed_before_connack=isinstance(exc, ClosedBeforeConnackError))

        self._note_accepted()
        self._sets.on_accepted()
        # Serve the connection until it drops, a stop is requested or the token is due.
        if issued.minted and issued.expiry_s is not None:
            remaining_s = issued.left_s
            if remaining_s is None:
                remaining_s = max(0.0, issued.expiry_s - self._clock.now())
            fraction = random.uniform(SAS_RENEW_FRACTION_MIN, SAS_RENEW_FRACTION_MAX)
            connection.renew_at = time.monotonic() + remaining_s * fraction
        self._post(LinkEvent("connected", number, reason=f"{host}:{port}",
                             values={"last_good": self._sets.on_last_good}))
        self._subscribe_c2d(connection)
        connected_at = time.monotonic()
        outcome = self._serve(connection)
        outcome = dataclasses.replace(outcome, connected_s=time.monotonic() - connected_at)

        # Leave cleanly when the broker is still there. On a stop the steps are recorded for
        # the shutdown's log line: the loop has stopped, then DISCONNECT, then the release.
        stopping = self._stop_requested.is_set()
        steps = ["network_loop_stopped"]
        if connection.closed:
            steps.append("disconnect_skipped")
        else:
            steps.append("disconnect_sent" if self._disconnect(connection)
                         else "disconnect_timed_out")
        self._close(connection)
        if stopping:
            self.shutdown_steps.extend(steps)
        self._post(LinkEvent("disconnected", number, reason=outcome.reason))
        return outcome

    def _new_client(self, issued: IssuedPassword) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self._identity.client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        # paho logs a dropped socket at ERROR; this module reports it once, with the next
        # delay, so paho's own lines appear only when debugging.
        if self._logger.isEnabledFor(logging.DEBUG):
            client.enable_logger(self._logger.getChild("paho"))
        client.connect_timeout = self._settings.connect_timeout_s

        # paho 2.2 rescans its whole in-flight list on every PUBACK, so this stays small.
        client.max_inflight_messages_set(self._settings.max_inflight_pages)
        if self._identity.username is not None:
            client.username_pw_set(self._identity.username, issued.text)
        if self._identity.tls_context is not None:
            client.tls_set_context(self._identity.tls_context)

        # Under TLS 1.3 a server that rejects the client certificate sends its alert after
        # the handshake, and paho 2.2 reports that read error only through its log. The
        # callback is removed at CONNACK, because paho formats every message it passes.
        # NOTE: the hub emulator closes without an alert, so the tests cover only the
        # count of closes in processes/uplink_fallback.py, not this path.
        client.on_log = self._on_log_before_connack
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _note_accepted(self) -> None:
        self._guard.on_connected()
        if self._rejected_attempts:
            attempts = self._rejected_attempts
            self._logger.info("credentials_accepted %s", fields(after_rejected_attempts=attempts))
            self._report_tap("credentials_accepted", after_rejected_attempts=attempts)
            self._rejected_attempts = 0

    def _open(self, connection: Connection) -> None:
        """Open TCP and TLS and send CONNECT, each bounded by connect_timeout_s in paho."""
        host, port = self._identity.connect_host, self._identity.port
        timeout_s = self._settings.connect_timeout_s
        where = f"{host}:{port}"
        try:
            rc = connection.client.connect(host, port, keepalive=self._settings.keepalive_s)
        except TimeoutError as exc:
            raise UplinkError(
                f"connect timeout: no TCP connection or TLS handshake with {where} "
                f"within {timeout_s:g} s"
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            raise TlsRejectedError(
                f"TLS handshake with {where} failed: certificate verify failed: "
                f"{exc.verify_message}; check that "
                f"{self._identity.ca_file} contains the broker's root CA and that the "
                f"broker's certificate names {host}"
            ) from exc
        except ssl.SSLError as exc:
            reason = str(exc.reason or exc)
            error = TlsRejectedError if _names_certificate_alert(reason) else UplinkError
            raise error(f"TLS handshake with {where} failed: {reason}") from exc
        except ConnectionRefusedError as exc:
            raise UplinkError(
                f"connection to {where} refused; check that the broker runs and that "
                "uplink.port is its TLS port"
            ) from exc
        except socket.gaierror as exc:
            raise UplinkError(f"cannot resolve {host}: {exc.strerror}") from exc
        except OSError as exc:
            raise UplinkError(f"connect to {where} failed: {exc.strerror or exc}") from exc
        except ValueError as exc:
            # For example a host name that IDNA cannot encode, such as one with an empty label.
            raise UplinkError(f"cannot connect to {where}: {exc}") from exc

        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise UplinkError(f"sending CONNECT to {where} failed: {mqtt.error_string(rc)}")

    def _await_connack(self, connection: Connection) -> None:
        """Wait for CONNACK; paho has no bound of its own for a broker that stays silent."""
        where = f"{self._identity.connect_host}:{self._identity.port}"
        timeout_s = self._settings.connect_timeout_s
        deadline = time.monotonic() + timeout_s
        while not connection.connected:
            if connection.refused is not None:
                error = UplinkError
                if connection.refused_code in CREDENTIALS_REJECTED_CODES:
                    error = CredentialsRejectedError
                raise error(
                    f"broker {where} refused the connection: CONNACK {connection.refused!r}"
                    f"{self._refusal_hint()}"
                )
            if connection.closed:
                if _names_certificate_alert(connection.connect_error):
                    raise TlsRejectedError(
                        f"TLS connection to {where} failed before CONNACK: the server "
                        f"rejected the client certificate: {connection.connect_error}")
                raise ClosedBeforeConnackError(
                    f"connection to {where} closed before CONNACK: {connection.close_reason}"
                )
            if self._stop_requested.is_set():
                raise UplinkError("stop requested while waiting for CONNACK")
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise UplinkError(
                    f"connect timeout: no CONNACK from {where} within {timeout_s:g} s"
                )
            self._pump(connection, remaining_s)

    def _refusal_hint(self) -> str:
        password = self._identity.password
        if password.key is not None or password.token is not None or password.remote is not None:
            return "; check the device key or SAS token, its expiry and this gateway's clock"
        return ""

    def _serve(self, connection: Connection) -> Outcome:
        while True:
            if connection.closed:
                return Outcome(True, connection.close_reason or "connection closed")
            if self._stop_requested.is_set():
                return Outcome(True, "stop requested")
            now = time.monotonic()
            if connection.renew_at is not None and now >= connection.renew_at:
                # A token from the token server may not be ready yet. The connection then
                # keeps its current token and checks again after retry_s.
                retry_s = self._identity.password.prepare_renewal()
                if retry_s is None:
                    return Outcome(True, "the SAS token reached its renewal time", renew=True)
                connection.renew_at = now + retry_s
            self._guard.watchdog()
            wait_s = 1.0
            if connection.renew_at is not None:
                wait_s = max(0.0, min(wait_s, connection.renew_at - now))
            self._pump(connection, wait_s)

    def _pump(self, connection: Connection, timeout_s: float) -> None:
        """Wait for socket traffic or a wake-up, then let paho read, write and ping."""
        client = connection.client
        sock = client.socket()
        if sock is None:
            connection.closed = True
            return

        # Bytes already decrypted inside the TLS object do not make the socket readable.
        pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
        read_sockets: list[Any] = [sock, self._wakeup]
        write_sockets: list[Any] = [sock] if client.want_write() else []
        readable, writable, _ = select.select(
            read_sockets, write_sockets, [], 0.0 if pending else timeout_s
        )

        if self._wakeup in readable:
            self._wakeup.drain()
        rc = mqtt.MQTT_ERR_SUCCESS
        if sock in readable or pending:
            rc = client.loop_read()
        if rc == mqtt.MQTT_ERR_SUCCESS and sock in writable and client.socket() is not None:
            rc = client.loop_write()
        if rc == mqtt.MQTT_ERR_SUCCESS and client.socket() is not None:
            rc = client.loop_misc()
        if rc != mqtt.MQTT_ERR_SUCCESS and connection.closed:
            connection.close_reason = self._describe_loss(connection.close_reason, rc)

        # One wake-up for all the events of this pass, so the main thread does not compete
        # for the GIL while paho is still reading the rest of the PUBACKs.
        self._announce_events()
        self._publish_requested(connection)
        self._announce_events()

    def _announce_events(self) -> None:
        if self._events_posted:
            self._events_posted = False
            self._events_wakeup.notify()

    @staticmethod
    def _describe_loss(reason: str, rc: mqtt.MQTTErrorCode) -> str:
        # paho reports a dropped socket as the reason code "Unspecified error", and its
        # error string is more specific.
        if reason in ("", "Unspecified error"):
            return mqtt.error_string(rc)
        return reason

    def _publish_requested(self, connection: Connection) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return

            # A page meant for an earlier connection goes back to the buffer's next session.
            if request.connection != connection.number or not connection.connected:
                self.dropped += 1
                continue
            if connection.closed or connection.client.socket() is None:
                self.dropped += 1
                continue

            topic = request.topic or self._identity.topic(request.page_seq)
            info = connection.client.publish(topic, request.payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                self._logger.warning(
                    "publish_failed %s",
                    fields(
                        page_seq=request.page_seq,
                        error=mqtt.error_string(info.rc),
                        consequence="the buffer resends the page after the reconnect",
                    ),
                )
                continue
            connection.mid_to_page[info.mid] = request.page_seq
            if request.topic is None:
                self.published += 1

    def _subscribe_c2d(self, connection: Connection) -> None:
        topic_filter = self._identity.c2d_filter
        if topic_filter is None:
            return
        rc, _mid = connection.client.subscribe(topic_filter, qos=1)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._logger.warning(
                "c2d_subscribe_failed %s",
                fields(topic=topic_filter, error=mqtt.error_string(rc)),
            )

    def _disconnect(self, connection: Connection) -> bool:
        """Send DISCONNECT and give paho a short, bounded time to write it.

        Return False when the socket still had bytes to write at the deadline, which happens
        when the broker has stopped reading and the socket's send buffer is full.
        """
        client = connection.client
        # No page is published after the DISCONNECT. The buffer sends them to the next session.
        connection.connected = False
        client.disconnect()
        deadline = time.monotonic() + min(1.0, self._settings.shutdown_timeout_s / 2)
        while client.socket() is not None and client.want_write():
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return False
            self._pump(connection, remaining_s)
        return True

    @staticmethod
    def _close(connection: Connection) -> None:
        """Close the socket. The paho client is freed with the Connection, which only the
        network thread refers to."""
        sock = connection.client.socket()
        if sock is not None:
            sock.close()

    def _post(self, event: LinkEvent) -> None:
        self._events.put(event)
        self._events_wakeup.notify()

    def _post_from_callback(self, event: LinkEvent) -> None:
        """Queue an event from a paho callback. Callbacks run inside _pump, which wakes the
        main thread once at its end."""
        self._events.put(event)
        self._events_posted = True

    # -- paho callbacks, on this thread ---------------------------------------------------
    #
    # Reason codes are paho ReasonCode objects. Only str() and is_failure are used on
    # them: int() on one inside a callback has crashed paho's network thread in the field.

    @staticmethod
    def _on_log_before_connack(
        _client: mqtt.Client, connection: Connection, level: int, message: str
    ) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            connection.connect_error = message

    def _on_connect(
        self, client: mqtt.Client, connection: Connection, _flags: Any, reason_code: Any,
        _properties: Any,
    ) -> None:
        client.on_log = None
        if reason_code.is_failure:
            # .value is a plain attribute; int(reason_code) is what crashed paho's thread.
            connection.refused = str(reason_code)
            connection.refused_code = reason_code.value
        else:
            connection.connected = True

    def _on_disconnect(
        self, _client: mqtt.Client, connection: Connection, _flags: Any, reason_code: Any,
        _properties: Any,
    ) -> None:
        connection.closed = True
        connection.close_reason = str(reason_code)

    def _on_publish(
        self, _client: mqtt.Client, connection: Connection, mid: int, _reason_code: Any,
        _properties: Any,
    ) -> None:
        page_seq = connection.mid_to_page.pop(mid, None)
        if page_seq is not None:
            self._post_from_callback(LinkEvent("puback", connection.number, page_seq=page_seq))

    def _on_subscribe(
        self, _client: mqtt.Client, _connection: Connection, _mid: int, reason_codes: Any,
        _properties: Any,
    ) -> None:
        for reason_code in reason_codes:
            if reason_code.is_failure:
                self._logger.warning(
                    "c2d_subscribe_refused %s",
                    fields(
                        topic=self._identity.c2d_filter,
                        reason=str(reason_code),
                        consequence="cloud-to-device messages will not arrive",
                    ),
                )

    def _on_message(
        self, _client: mqtt.Client, connection: Connection, message: mqtt.MQTTMessage
    ) -> None:
        # The body is not logged, because a command may carry a secret such as a key.
        payload = bytes(message.payload)
        self._logger.info("c2d_message %s", fields(topic=message.topic, bytes=len(payload)))
        self._post_from_callback(
            LinkEvent("c2d", connection.number, topic=message.topic, size=len(payload),
                      payload=payload))


# ---------------------------------------------------------------------------------------
# The main thread: the buffer's DEALER, the tap, link state and counters.
# ---------------------------------------------------------------------------------------


def new_session_id() -> str:
    """Return a session id that no earlier uplink process can have used."""
    return secrets.token_hex(8)


class Uplink:
    """The main thread's side: talks to the buffer and the tap, drives the network thread."""

    def __init__(
        self, config: Config, logger: logging.Logger, stop: threading.Event, identity: Identity,
        snapshot: CredentialSnapshot | None = None,
    ) -> None:
        self._config = config
        self._settings = config.uplink
        self._logger = logger
        self._stop = stop
        self._identity = identity

        self._events: queue.Queue[LinkEvent] = queue.Queue()
        self._events_wakeup = Wakeup()
        self._event_handlers: dict[str, Callable[[LinkEvent], None]] = {
            "connecting": self._on_connecting,
            "connected": self._on_connected,
            "connect_failed": self._on_connect_failed,
            "disconnected": self._on_disconnected,
            "puback": self._on_puback,
            "c2d": self._on_c2d,
            "tap": self._on_tap,
            "credential_set": self._on_credential_set,
            "fatal": self._on_fatal,
        }
        self._link = MqttLink(identity, snapshot, config, logger, self._events,
                              self._events_wakeup)

        # Link state as the buffer should see it.
        self._session = new_session_id()
        self._link_up = False
        self._connection = 0
        self._sessions: dict[int, str] = {}
        self._outstanding: set[int] = set()

        # Counters for the tap.
        self._pubacks = 0
        self._pages_not_sent = 0
        self._last_rate_published = 0
        self._last_rate_s = time.monotonic()
        self._buffer_unreachable_since: float | None = None
        self._buffer_warned = False
        self._link_since_ms = int(time.time() * 1000)
        self._rate = 0.0
        self._health_failures = 0

        runtime_dir = config.gateway.runtime_dir
        self._delivery = wire.endpoint(runtime_dir, wire.DELIVERY)
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            runtime_dir.mkdir(parents=True, exist_ok=True)
            self._dealer, self._tap = self._open_sockets()
        except (OSError, zmq.ZMQError, PlcBridgeError) as exc:
            self._context.destroy(linger=0)
            self._events_wakeup.close()
            raise UplinkError(
                f"cannot open the ZeroMQ sockets in {runtime_dir}: {exc}; check that the "
                "folder is writable and that no other uplink runs with this runtime_dir"
            ) from exc
        self._results = ResultOutbox(logger)
        self._tag_writer = TagWriter(config, self._context, self._report_result, logger)
        # The table of cloud-to-device commands: a name and the function that handles it.
        self._rotation = RotationCommand(config, logger)
        handlers: dict[str, Handler] = {
            "write_tag": self._tag_writer.handle,
            "rotate_credentials": self._rotation.handle,
        }
        self._commands = CommandDispatcher(handlers, self._publish_result, logger)
        book = AlertBook(PROCESS, runtime_dir, logger, self._tap.publish)
        self._health = HealthMonitor(config, logger, book, self._context, identity.description)
        self._metrics = MetricsServer(config.metrics, lambda: self._health.last_snapshot,
                                      logger)

    def _open_sockets(self) -> tuple[zmq.Socket[bytes], Tap]:
        tap = Tap(self._context, self._config.gateway.runtime_dir, PROCESS)
        dealer = wire.make_socket(self._context, zmq.DEALER, wire.DATA_HWM, DEALER_LINGER_MS)

        # Queue messages only for a connected buffer: without one, the repeated link state
        # would pile up and reach a restarted buffer as a burst of stale messages.
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        # The monitor goes on before the connect, so it reports the first connection too.
        self._dealer_monitor = SocketMonitor(
            dealer, "delivery", self._logger, tap.publish,
            "no pages to publish and no pubacks reach the buffer until it connects again")
        dealer.connect(self._delivery)
        return dealer, tap

    def run(self) -> None:
        self._tap.publish(
            "start", version=gateway_version(), identity=self._identity.description,
            host=self._identity.connect_host, port=self._identity.port,
            client_id=self._identity.client_id,
        )
        self._link.start()
        try:
            self._loop()
        finally:
            self._shut_down()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._events_wakeup.fileno(), zmq.POLLIN)
        poller.register(self._dealer_monitor.socket, zmq.POLLIN)
        poller.register(self._tag_writer.socket, zmq.POLLIN)
        next_tick_s = time.monotonic()

        while not self._stop.is_set():
            timeout_s = max(0.0, min(MAIN_POLL_S, next_tick_s - time.monotonic()))
            ready = dict(poller.poll(int(timeout_s * 1000)))

            if self._dealer in ready:
                self._receive_pages()
            if self._events_wakeup.fileno() in ready:
                self._events_wakeup.drain()
            if self._dealer_monitor.socket in ready:
                self._dealer_monitor.drain()
            if self._tag_writer.socket in ready:
                self._tag_writer.receive()
            self._handle_events()
            self._tag_writer.expire()

            if time.monotonic() >= next_tick_s:
                next_tick_s = time.monotonic() + LINK_REPEAT_S
                self._send_link()
                self._publish_counters()
                self._watch_health()

    # -- pages from the buffer ------------------------------------------------------------

    def _receive_pages(self) -> None:
        """Hand every page that arrived to the network thread, with a single wake-up."""
        requests = []
        while True:
            try:
                frames = self._dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            request = self._handle_buffer_message(frames)
            if request is not None:
                requests.append(request)
        if requests:
            self._link.request_publish(requests)

    def _handle_buffer_message(self, frames: list[bytes]) -> PublishRequest | None:
        try:
            message = wire.decode(frames)
            if message.kind != wire.PAGE or message.payload is None:
                raise ValueError(f"expected a page with a payload, got kind {message.kind!r}")
            page_seq = message.header.get("page_seq")
            if not isinstance(page_seq, int) or isinstance(page_seq, bool):
                raise ValueError(f"invalid page_seq {page_seq!r}")
        except ValueError as exc:
            self._logger.warning(
                "invalid_buffer_message %s",
                fields(error=exc, consequence="message ignored"),
            )
            self._tap.publish("error", message=f"invalid message from the buffer: {exc}")
            return None

        # The buffer redelivers every unacknowledged page in the next session.
        if not self._link_up:
            self._pages_not_sent += 1
            self._logger.debug("page_held %s", fields(page_seq=page_seq, reason="link down"))
            return None
        self._outstanding.add(page_seq)
        if self._tap.data_wanted:
            self._tap.publish_data(page_seq=page_seq, bytes=len(message.payload),
                                   page=message.payload.decode("utf-8", errors="replace"))
        return PublishRequest(self._connection, page_seq, message.payload)

    # -- events from the network thread ---------------------------------------------------

    def _handle_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._handle_event(event)

    def _handle_event(self, event: LinkEvent) -> None:
        self._event_handlers[event.kind](event)

    def _on_connecting(self, event: LinkEvent) -> None:
        self._tap.publish("connecting", endpoint=event.reason, attempt=event.connection)

    def _on_connected(self, event: LinkEvent) -> None:
        self._session = new_session_id()
        self._connection = event.connection
        self._sessions = {
            number: session
            for number, session in self._sessions.items()
            if number >= event.connection - 1
        }
        self._sessions[event.connection] = self._session
        self._link_up = True
        self._link_since_ms = int(time.time() * 1000)
        self._outstanding.clear()

        self._logger.info(
            "connected %s",
            fields(endpoint=event.reason, client_id=self._identity.client_id,
                   session=self._session),
        )
        self._tap.publish("connected", endpoint=event.reason, session=self._session)
        on_last_good = bool(event.values.get("last_good"))
        self._health.on_connected(last_good=on_last_good)
        self._send_link()
        self._send_alerts()
        # A rotation's result waits on disk for the uplink that connects with the new files.
        for result in self._rotation.stored_results(on_last_good):
            self._commands.report(result)
        self._send_results()

    def _on_connect_failed(self, event: LinkEvent) -> None:
        self._tap.publish("connect_failed", reason=event.reason, attempt=event.connection)
        # A run of rejected connects gets one credentials_rejected event instead.
        if not event.values.get("rejected"):
            self._tap.publish("error", message=event.reason)

    def _on_tap(self, event: LinkEvent) -> None:
        self._tap.publish(event.reason, **event.values)
        self._health.on_tap_event(event.reason, event.values)

    def _on_credential_set(self, event: LinkEvent) -> None:
        """Follow the network thread to another credential set, for the topics it names."""
        self._identity = event.values["identity"]
        last_good = bool(event.values["last_good"])
        self._tap.publish("credential_set", set="last_good" if last_good else "current",
                          identity=self._identity.description)
        self._health.on_credential_set(last_good)

    def _on_disconnected(self, event: LinkEvent) -> None:
        if event.connection != self._connection:
            return
        self._link_up = False
        self._link_since_ms = int(time.time() * 1000)
        self._outstanding.clear()
        self._tap.publish("disconnected", reason=event.reason, session=self._session)
        self._send_link()

    def _on_puback(self, event: LinkEvent) -> None:
        if self._results.owns(event.page_seq):
            payload = self._results.acknowledged(event.page_seq)
            if payload is not None:
                self._rotation.acknowledged(payload)
            return
        if event.page_seq < 0:
            self._health.on_cloud_ack(event.page_seq)
            return
        session = self._sessions.get(event.connection)
        if session is None:
            return
        self._health.on_puback()
        self._pubacks += 1
        if event.connection == self._connection:
            self._outstanding.discard(event.page_seq)
        self._send(wire.PUBACK, {"session": session, "page_seq": event.page_seq})

    def _on_c2d(self, event: LinkEvent) -> None:
        self._tap.publish("c2d", topic=event.topic, bytes=event.size)
        self._commands.dispatch(event.payload, event.topic)

    # -- command results --------------------------------------------------------------------

    def _report_result(self, result: CommandResult) -> None:
        """Report the deferred result of a command, such as a write result from the reader."""
        self._commands.report(result)

    def _publish_result(self, result: CommandResult) -> None:
        self._tap.publish("command_result", **result.body())
        self._results.add(result)
        self._send_results()

    def _send_results(self) -> None:
        """Send the results that the broker has not acknowledged, once per connection."""
        self._send_events("command-result", self._results.due)

    def _on_fatal(self, event: LinkEvent) -> None:
        message = f"the MQTT network thread stopped on an error: {event.reason}"
        self._tap.publish("error", message=message)
        raise UplinkError(message)

    # -- messages to the buffer and the tap -----------------------------------------------

    def _send_link(self) -> None:
        free = self._settings.max_inflight_pages - len(self._outstanding) if self._link_up else 0
        self._send(
            wire.LINK,
            {"session": self._session, "state": "up" if self._link_up else "down",
             "free": max(0, free)},
        )

    def _send(self, kind: bytes, header: dict[str, Any]) -> None:
        try:
            self._dealer.send_multipart(wire.encode(kind, header), zmq.NOBLOCK)
        except zmq.Again:
            # No buffer is connected, or it stopped reading. It learns the link state from the
            # next repeat, and a page whose puback was dropped stays unacknowledged, so the
            # buffer sends it again in the next session: a duplicate, not a loss.
            self._note_buffer_unreachable()
            return
        self._buffer_unreachable_since = None
        if self._buffer_warned:
            self._buffer_warned = False
            self._logger.info("buffer_reachable %s", fields(endpoint=self._delivery))

    def _note_buffer_unreachable(self) -> None:
        """Warn once when the buffer stays unreachable, not during the usual start-up race."""
        now = time.monotonic()
        if self._buffer_unreachable_since is None:
            self._buffer_unreachable_since = now
        waited_s = now - self._buffer_unreachable_since
        if not self._buffer_warned and waited_s >= BUFFER_WARNING_S:
            self._buffer_warned = True
            self._logger.warning(
                "buffer_unreachable %s",
                fields(
                    endpoint=self._delivery,
                    waited_s=f"{waited_s:.1f}",
                    consequence="no pages to publish until the buffer answers",
                ),
            )

    def _publish_counters(self) -> None:
        now = time.monotonic()
        published = self._link.published
        elapsed_s = max(now - self._last_rate_s, 1e-6)
        rate = (published - self._last_rate_published) / elapsed_s
        self._rate = rate
        self._last_rate_published = published
        self._last_rate_s = now

        self._tap.counters.update(
            connected=int(self._link_up),
            pages_published=published,
            pubacks=self._pubacks,
            publish_rate=round(rate, 1),
            reconnects=self._link.reconnects,
            inflight=len(self._outstanding),
            pages_not_sent=self._pages_not_sent + self._link.dropped,
            commands=self._commands.received,
            writes_pending=self._tag_writer.pending,
        )
        self._tap.publish_counters_if_due()

    # -- health: alerts, status file, messages to the cloud ---------------------------------

    def _watch_health(self) -> None:
        figures = LinkFigures(
            connected=self._link_up,
            since_ts_ms=self._link_since_ms,
            publish_rate=round(self._rate, 1),
            pages_published=self._link.published,
            pubacks=self._pubacks,
            reconnects=self._link.reconnects,
            outstanding=len(self._outstanding),
            token_expiry_s=self._link.token_expiry_s,
        )
        try:
            self._health.tick(figures)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            # A status file of another version, say, must never stop the delivery of data.
            self._note_health_failure(exc)
        self._send_alerts()
        health = self._health.health_message(figures)
        topic = self._identity.event_topic("health")
        if health is not None and topic is not None and self._link_up:
            self._link.request_publish(
                [PublishRequest(self._connection, HEALTH_PAGE_SEQ, health, topic)])

    def _note_health_failure(self, exc: Exception) -> None:
        self._health_failures += 1
        # Logged at the first failure and then every 600th, about every ten minutes.
        if self._health_failures % 600 == 1:
            self._logger.error(
                "health_check_failed %s",
                fields(error=f"{type(exc).__name__}: {exc}", failures=self._health_failures,
                       consequence="alerts and health-status.json are not updated"))
            self._tap.publish("error", message=f"health check failed: {exc}")

    def _send_alerts(self) -> None:
        """Send the alert changes that the cloud has not acknowledged, once per connection."""
        self._send_events("alert", self._health.cloud_messages)

    def _send_events(
        self, kind: str, unsent: Callable[[int], list[tuple[int, bytes]]]
    ) -> None:
        """Publish unsent(connection), a list of (page_seq, payload), to the kind's topic."""
        topic = self._identity.event_topic(kind)
        if topic is None or not self._link_up:
            return
        requests = [PublishRequest(self._connection, page_seq, payload, topic)
                    for page_seq, payload in unsent(self._connection)]
        if requests:
            self._link.request_publish(requests)

    # -- shutdown ----------------------------------------------------------------------------

    def _shut_down(self) -> None:
        """Stop the network thread within shutdown_timeout_s, even if the broker is silent."""
        started_s = time.monotonic()
        self._link.stop()

        # The network thread may sit in a TCP connect or TLS handshake that paho bounds only
        # by connect_timeout_s. It is a daemon thread, so it then ends with the process.
        join_s = max(0.1, self._settings.shutdown_timeout_s - DEALER_LINGER_MS / 1000 - 0.3)
        self._link.join(join_s)
        waited_s = f"{time.monotonic() - started_s:.2f}"
        if self._link.is_alive():
            self._logger.info(
                "stop_without_network_thread %s",
                fields(waited_s=waited_s, reason="connect or TLS handshake still in progress"),
            )
        else:
            # Released: the thread has ended, and with it the last reference to the client.
            steps = [*(self._link.shutdown_steps or ["network_loop_stopped"]), "client_released"]
            self._logger.info("link_stopped %s", fields(steps=",".join(steps), waited_s=waited_s))

        self._link_up = False
        self._send_link()
        self._tap.publish("stop", pages_published=self._link.published, pubacks=self._pubacks)
        self._tag_writer.close()
        self._health.close()
        self._metrics.close()
        self._tap.close()
        self._dealer_monitor.close()
        self._dealer.close()
        self._context.term()
        if not self._link.is_alive():
            self._events_wakeup.close()


def body(config: Config, logger: logging.Logger, stop: threading.Event) -> None:
    """Run the uplink until stop is set; raise CredentialError for unusable credentials."""
    if not wait_for_provisioning(config, logger, stop):
        return
    identity, snapshot = load_identity_with_snapshot(config, logger)
    logger.info(
        "identity %s",
        fields(
            mode=config.uplink.mode,
            identity=identity.description,
            host=identity.connect_host,
            port=identity.port,
            client_id=identity.client_id,
            ca_file=config.credentials.ca_file,
        ),
    )
    Uplink(config, logger, stop, identity, snapshot).run()


def main() -> int:
    return run_process(PROCESS, body)


if __name__ == "__main__":
    sys.exit(main())
