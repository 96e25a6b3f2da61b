"""An Azure IoT Hub emulator for the demo and the tests: it checks credentials like the hub.

    python -m devstack.hub_emulator --listen 127.0.0.1:8883 --https-port 8443 \\
        --cert server.pem --key server.key --registry registry.toml \\
        --upstream 127.0.0.1:18883 --upstream-ca ca.pem --hub-host localhost

A TLS listener takes MQTT 3.1.1 clients, validates each CONNECT against the device
registry (client id, user name, SAS token or X.509 certificate) and rejects a failure with
CONNACK 5. An accepted client's packets go byte for byte to the MQTT broker behind it,
where any subscriber can watch. A second port serves HTTPS and returns the emulator's
clock in the `Date` header. SIGHUP, or a change of the --cert or --key file, loads the
server certificate and key again for new connections, as the hub does when it moves to a
certificate under a new root. docs/hub-emulator.md describes the registry, the fault modes
and the log lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import logging
import signal
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from common import __version__
from common.logs import fields, setup_logging
from devstack.hub_auth import Admission, Rejected, authenticate
from devstack.hub_faults import FaultsFile
from devstack.hub_registry import Identity, Registry, RegistryError, load_registry
from devstack.hub_topics import publish_allowed, subscribe_allowed
from devstack.mqtt_frames import (
    CONNACK,
    CONNACK_NOT_AUTHORIZED,
    CONNACK_SERVER_UNAVAILABLE,
    CONNECT,
    DISCONNECT,
    PUBACK,
    PUBLISH,
    SUBSCRIBE,
    FrameError,
    Packet,
    connack,
    parse_connect,
    parse_publish,
    parse_subscribe,
    read_packet,
)

# A client that has not finished TLS, sent CONNECT or sent an HTTP request by then is
# dropped, so a stalled client keeps no task busy for long.
HANDSHAKE_TIMEOUT_S = 10.0
# Upper bound of a watchdog sleep, so a changed clock offset or close_after_s takes effect
# within this time on a live connection.
WATCHDOG_PERIOD_S = 0.1
# Request line and headers of one HTTP request; a longer head gets no response.
MAX_HTTP_HEAD_BYTES = 16 * 1024
# How long a closing TLS connection waits for the peer's close_notify. asyncio's default
# ssl_shutdown_timeout is 30 s (Python 3.11), which held SIGTERM up behind a silent client.
TLS_SHUTDOWN_TIMEOUT_S = 1.0
# After accept() fails, for example with no file descriptor left (EMFILE), the listener
# waits this long before it tries again, so that it does not spin. Clients wait meanwhile
# in the kernel's backlog.
ACCEPT_RETRY_S = 0.5
# How often the emulator stats its certificate and key files to notice that they changed.
CERTIFICATE_CHECK_S = 0.2


@dataclass(frozen=True)
class Options:
    listen_host: str
    listen_port: int
    https_port: int
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    registry_file: Path
    upstream_host: str
    upstream_port: int
    upstream_ca_file: Path | None
    skew_s: float
    faults_file: Path | None
    hub_host: str


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
ServeFunction = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class OptionsError(Exception):
    """A bad command-line value or file; the message names the option, file and value."""


class HubEmulator:
    """The two listeners and the live sessions that they have accepted."""

    def __init__(self, options: Options, registry: Registry, logger: logging.Logger) -> None:
        self.options = options
        self.registry = registry
        self.logger = logger
        self.faults = FaultsFile(options.faults_file, logger)
        self.tls = _listener_contexts(options)
        self._certificate_files = _file_signatures(options.cert_file, options.key_file)
        self.upstream_tls = upstream_tls_context(options)
        self.trust_anchors = load_trust_anchors(options.client_ca_file)
        self.sessions: dict[str, Session] = {}
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def now(self) -> float:
        """Return the emulator's clock: the system clock plus the clock_offset_s fault."""
        return time.time() + self.faults.current().clock_offset_s

    async def start(self) -> tuple[int, int]:
        """Open both listeners and return their ports (useful when 0 was requested)."""
        host = self.options.listen_host
        listeners = (
            (self.options.listen_port, self._serve_mqtt, "mqtt"),
            (self.options.https_port, self._serve_https, "https"),
        )
        ports: list[int] = []
        for port, serve, port_name in listeners:
            listener = socket.create_server((host, port), backlog=64)
            listener.setblocking(False)
            self._listeners.append(listener)
            ports.append(listener.getsockname()[1])
            self._spawn(self._accept_loop(listener, serve, port_name), f"accept-{port_name}")
        self._spawn(self._watch_certificate_files(), "certificate-files")
        return ports[0], ports[1]

    def reload_certificate(self, trigger: str) -> bool:
        """Load the server certificate and key again; keep the old ones if that fails.

        Connections already open keep the certificate they were accepted with. New ones get
        the new certificate, so clients must trust its root before the files change.
        """
        self._certificate_files = _file_signatures(self.options.cert_file, self.options.key_file)
        try:
            contexts = _listener_contexts(self.options)
            subject, issuer = _certificate_names(self.options.cert_file)
        except (OptionsError, OSError, ValueError) as exc:
            self.logger.error(
                "certificate_reload_failed %s; new connections keep the previous certificate",
                fields(trigger=trigger, error=exc))
            return False
        self.tls = contexts
        self.logger.info("certificate_reloaded %s", fields(
            trigger=trigger, cert=self.options.cert_file, subject=subject, issuer=issuer))
        return True

    async def _watch_certificate_files(self) -> None:
        """Reload when the certificate or key file changes: mtime, size or inode.

        A rotation written file by file may first give a certificate that does not match
        the key. That load fails, the old certificate stays, and the next change retries.
        """
        while True:
            await asyncio.sleep(CERTIFICATE_CHECK_S)
            current = _file_signatures(self.options.cert_file, self.options.key_file)
            if current != self._certificate_files:
                self.reload_certificate("file_changed")

    async def stop(self) -> None:
        """Close the listeners and every connection; each session logs its end."""
        for listener in self._listeners:
            listener.close()
        for session in list(self.sessions.values()):
            session.close("emulator stopping")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Coroutine[object, object, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(
        self, listener: socket.socket, serve: ServeFunction, port_name: str
    ) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            try:
                connection, address = await loop.sock_accept(listener)
            except OSError as exc:
                # EMFILE, ENFILE, ENOBUFS or ECONNABORTED end this accept(), not the listener.
                if failures == 0:
                    self.logger.warning(
                        "accept_failed %s; new clients wait in the backlog, retrying every %g s",
                        fields(port=port_name, error=exc), ACCEPT_RETRY_S)
                failures += 1
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            if failures:
                self.logger.info("accept_recovered %s", fields(port=port_name, failures=failures))
                failures = 0
            # The context is looked up at each accept, so a reloaded certificate applies.
            self._spawn(self._handle(connection, serve, self.tls[port_name], port_name),
                        f"{port_name}-{address[0]}:{address[1]}")

    async def _handle(
        self, connection: socket.socket, serve: ServeFunction, context: ssl.SSLContext,
        port_name: str,
    ) -> None:
        """Apply the blackhole fault or complete TLS, then serve the connection and close it."""
        # TLS starts here rather than in asyncio.start_server, because the blackhole fault
        # must hold a connection without sending even a TLS handshake.
        try:
            peer = _address(connection.getpeername())
        except OSError:
            peer = "unknown"  # the client has already gone
        try:
            if self.faults.current().blackhole:
                await self._swallow(connection, port_name, peer)
                return
            streams = await self._accept_tls(connection, context, port_name, peer)
            if streams is None:
                return
            writer = streams[1]
            try:
                await serve(*streams)
            except Exception:
                # A bug here must not stop the listener, and asyncio would report it only
                # when the task is garbage-collected.
                self.logger.exception("connection_failed %s", fields(port=port_name, peer=peer))
            finally:
                await _close(writer)
        finally:
            connection.close()

    async def _swallow(self, connection: socket.socket, port_name: str, peer: str) -> None:
        """Read and drop whatever the client sends until it gives up."""
        self.logger.info("blackholed %s", fields(port=port_name, peer=peer))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while await loop.sock_recv(connection, 65536):
                pass

    async def _accept_tls(
        self, connection: socket.socket, context: ssl.SSLContext, port_name: str, peer: str
    ) -> Stream | None:
        """Complete the server side of the TLS handshake; None (and a log line) on failure."""
        loop = asyncio.get_running_loop()
        # The limit bounds readuntil() on the HTTPS port. MQTT reads use readexactly(),
        # which it does not bound, and mqtt_frames caps their size instead.
        reader = asyncio.StreamReader(limit=MAX_HTTP_HEAD_BYTES)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, connection, ssl=context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S,
            )
        except OSError as exc:
            # ssl.SSLError is an OSError: an untrusted client certificate ends here. A client
            # that closes before the handshake gives an exception without a message.
            error = str(exc) or f"{type(exc).__name__}: closed during the TLS handshake"
            self.logger.info("tls_failed %s", fields(port=port_name, peer=peer, error=error))
            return None
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _serve_mqtt(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        admitted = await self._admit(reader, writer)
        if admitted is None:
            return
        admission, connect_packet = admitted
        upstream = await self._open_upstream(admission, connect_packet, writer)
        if upstream is None:
            return
        session = Session(self, admission, (reader, writer), upstream)
        previous = self.sessions.get(admission.identity.client_id)
        if previous is not None:
            # IoT Hub keeps one connection per identity: a new one drops the old.
            previous.close("replaced by a new connection of the same client id")
        self.sessions[admission.identity.client_id] = session
        try:
            await session.run()
        finally:
            if self.sessions.get(admission.identity.client_id) is session:
                del self.sessions[admission.identity.client_id]

    async def _admit(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[Admission, Packet] | None:
        """Read and check the CONNECT; on rejection send CONNACK 5 and return None."""
        peer = _peer(writer)
        try:
            packet = await asyncio.wait_for(read_packet(reader), HANDSHAKE_TIMEOUT_S)
        except (FrameError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            self.logger.info("connect_failed %s", fields(peer=peer, error=str(exc) or "timed out"))
            return None
        if packet is None or packet.packet_type != CONNECT:
            error = "closed before CONNECT" if packet is None else "first packet is not CONNECT"
            self.logger.info("connect_failed %s", fields(peer=peer, error=error))
            return None
        try:
            if packet.flags:
                raise FrameError(f"CONNECT with fixed header flags {packet.flags:#06b}; "
                                 "expected 0")
            connect = parse_connect(packet.body)
        except FrameError as exc:
            self.logger.info("connect_failed %s", fields(peer=peer, error=exc))
            return None

        try:
            if self.faults.current().refuse:
                raise Rejected("refuse fault is set")
            ssl_object = writer.get_extra_info("ssl_object")
            certificate = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            admission = authenticate(
                connect, certificate, self.registry, self.options.hub_host, self.now(),
                self.options.skew_s, self.trust_anchors,
            )
        except Rejected as exc:
            self.logger.info("connect_rejected %s", fields(
                client_id=connect.client_id, peer=peer, reason=exc))
            writer.write(connack(CONNACK_NOT_AUTHORIZED))
            with contextlib.suppress(OSError):
                await writer.drain()
            return None

        self.logger.info("connect_accepted %s", fields(
            client_id=connect.client_id, peer=peer, auth=admission.method,
            expiry=admission.expiry_s if admission.expiry_s is not None else "none"))
        return admission, packet

    async def _open_upstream(
        self, admission: Admission, connect_packet: Packet, writer: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Connect to the broker and send it the CONNECT unchanged; None if it is down."""
        host, port = self.options.upstream_host, self.options.upstream_port
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, ssl=self.upstream_tls,
                    server_hostname=host if self.upstream_tls else None,
                    ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S if self.upstream_tls else None,
                ),
                HANDSHAKE_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            self.logger.error("upstream_failed %s; sent CONNACK 3 to the client", fields(
                client_id=admission.identity.client_id, upstream=f"{host}:{port}",
                error=str(exc) or "timed out"))
            writer.write(connack(CONNACK_SERVER_UNAVAILABLE))
            with contextlib.suppress(OSError):
                await writer.drain()
            return None
        upstream[1].write(connect_packet.raw)
        return upstream

    async def _serve_https(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Respond to one HTTP request with the emulator's clock in the Date header."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANDSHAKE_TIMEOUT_S)
        except (OSError, TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            self.logger.info("https_failed %s", fields(
                peer=_peer(writer), error=repr(exc)))
            return
        method = head.split(b" ", 1)[0].decode("ascii", "replace")
        date = email.utils.formatdate(self.now(), usegmt=True)
        if method in ("GET", "HEAD"):
            status, extra = "200 OK", ""
        else:
            status, extra = "405 Method Not Allowed", "Allow: GET, HEAD\r\n"
        writer.write(
            f"HTTP/1.1 {status}\r\nDate: {date}\r\n{extra}Content-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode("ascii")
        )
        with contextlib.suppress(OSError):
            await writer.drain()
        self.logger.debug("https_served %s", fields(peer=_peer(writer), method=method, date=date))

class Session:
    """One accepted client and its broker connection, pumped both ways until either ends."""

    def __init__(
        self, hub: HubEmulator, admission: Admission, client: Stream, upstream: Stream
    ) -> None:
        self.hub = hub
        self.admission = admission
        self.client = client
        self.upstream = upstream
        self.client_id = admission.identity.client_id
        self._accepted_at = time.monotonic()
        self._closed = asyncio.Event()
        self._connack_sent = asyncio.Event()
        self._first_puback_logged = False
        self._reason = ""
        self._delayed: set[asyncio.Task[None]] = set()
        # The PUBACK held last. Each held PUBACK waits for the one before it, because MQTT
        # 3.1.1 section 4.6 requires PUBACKs in PUBLISH order even when the delay changes.
        self._last_delayed: asyncio.Task[None] | None = None

    def close(self, reason: str) -> None:
        """Ask the session to end; the first reason given is the one logged."""
        if not self._closed.is_set():
            self._reason = reason
            self._closed.set()

    async def run(self) -> None:
        workers = [
            asyncio.create_task(self._pump_from_client(), name=f"{self.client_id}-from-client"),
            asyncio.create_task(self._pump_from_broker(), name=f"{self.client_id}-from-broker"),
            asyncio.create_task(self._watch_expiry(), name=f"{self.client_id}-watchdog"),
            asyncio.create_task(self._closed.wait()),
        ]
        try:
            await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [*workers, *self._delayed]:
                task.cancel()
            results = await asyncio.gather(*workers, return_exceptions=True)
            self.upstream[1].close()
            self.client[1].close()
            self._log_end(results)

    def _log_end(self, results: Sequence[object]) -> None:
        # CancelledError is a BaseException, so the cancelled workers are not failures.
        failures = [result for result in results if isinstance(result, Exception)]
        if failures and not self._reason:
            self.hub.logger.error("session_failed %s", fields(
                client_id=self.client_id, error=repr(failures[0])))
            return
        self.hub.logger.info("disconnected %s", fields(
            client_id=self.client_id, reason=self._reason or "emulator stopping"))

    async def _pump_from_client(self) -> None:
        """Forward the client's packets to the broker, enforcing the hub's topic rules."""
        reader, _ = self.client
        _, upstream_writer = self.upstream
        identity = self.admission.identity
        try:
            while True:
                packet = await read_packet(reader)
                if packet is None:
                    self.close("client closed the connection")
                    return
                violation = _check_client_packet(packet, identity)
                if violation:
                    self.close(violation)
                    return
                upstream_writer.write(packet.raw)
                await upstream_writer.drain()
                if packet.packet_type == DISCONNECT:
                    # The broker closes its side next, which would otherwise be logged as
                    # the reason.
                    self.close("client sent DISCONNECT")
                    return
        except (FrameError, OSError, asyncio.IncompleteReadError) as exc:
            self.close(f"client stream failed: {exc!r}")

    async def _pump_from_broker(self) -> None:
        """Forward the broker's packets to the client, delaying the CONNACK by connack_delay_s
        and PUBACKs by puback_delay_s."""
        reader, _ = self.upstream
        _, client_writer = self.client
        try:
            while True:
                packet = await read_packet(reader)
                if packet is None:
                    self.close("broker closed the connection")
                    return
                if packet.packet_type == CONNACK and not self._connack_sent.is_set():
                    await self._delay_connack()
                delay_s = self.hub.faults.current().puback_delay_s
                if packet.packet_type == PUBACK and (delay_s > 0 or self._delayed):
                    self._hold_puback(delay_s, packet.raw)
                    continue
                client_writer.write(packet.raw)
                if packet.packet_type == PUBACK:
                    self._log_first_puback()
                await client_writer.drain()
                self._connack_sent.set()
        except (FrameError, OSError, asyncio.IncompleteReadError) as exc:
            self.close(f"broker stream failed: {exc!r}")

    async def _delay_connack(self) -> None:
        """Hold the CONNACK for connack_delay_s. Later packets from the broker wait behind it,
        as they would behind a slow hub."""
        delay_s = self.hub.faults.current().connack_delay_s
        if delay_s <= 0:
            return
        self.hub.logger.info("connack_delayed %s", fields(
            client_id=self.client_id, delay_s=f"{delay_s:g}"))
        await asyncio.sleep(delay_s)

    def _hold_puback(self, delay_s: float, data: bytes) -> None:
        task = asyncio.create_task(self._send_later(delay_s, data, self._last_delayed))
        self._last_delayed = task
        self._delayed.add(task)
        task.add_done_callback(self._delayed.discard)

    async def _send_later(
        self, delay_s: float, data: bytes, previous: asyncio.Task[None] | None
    ) -> None:
        await asyncio.sleep(delay_s)
        if previous is not None:
            await asyncio.wait({previous})
        writer = self.client[1]
        if not writer.is_closing():
            writer.write(data)
            self._log_first_puback()

    def _log_first_puback(self) -> None:
        """Log the session's first PUBACK once: when a client's new credentials first worked."""
        if self._first_puback_logged:
            return
        self._first_puback_logged = True
        self.hub.logger.info("first_puback %s", fields(
            client_id=self.client_id,
            after_accept_ms=round((time.monotonic() - self._accepted_at) * 1000, 1)))

    async def _watch_expiry(self) -> None:
        """Close at the token's se by the emulator's clock, or when close_after_s has passed.

        Both count from the broker's CONNACK, so a token accepted within the skew after its
        se still gets CONNACK 0 before the close, as a client of the hub would see it.
        """
        expiry_s = self.admission.expiry_s
        await self._connack_sent.wait()
        self._accepted_at = time.monotonic()
        while True:
            now = self.hub.now()
            if expiry_s is not None and now >= expiry_s:
                self.close(f"token expired: se={expiry_s}, now={int(now)}")
                return
            close_after_s = self.hub.faults.current().close_after_s
            if close_after_s is not None and time.monotonic() - self._accepted_at >= close_after_s:
                self.close(f"close_after_s fault: {close_after_s:g} s since CONNACK")
                return
            await asyncio.sleep(WATCHDOG_PERIOD_S)


def _check_client_packet(packet: Packet, identity: Identity) -> str | None:
    """Return why the hub would close the connection over this packet, or None."""
    if packet.packet_type == CONNECT:
        return "second CONNECT on one connection"
    if packet.packet_type == SUBSCRIBE:
        for topic_filter in parse_subscribe(packet.flags, packet.body):
            if not subscribe_allowed(identity, topic_filter):
                return (f"subscribe to {topic_filter!r}, which IoT Hub does not offer to "
                        f"{identity.client_id}")
        return None
    if packet.packet_type != PUBLISH:
        return None
    publish = parse_publish(packet.flags, packet.body)
    if publish.qos == 2:
        return f"QoS 2 publish to {publish.topic!r}; IoT Hub supports QoS 0 and 1 only"
    if not publish_allowed(identity, publish.topic):
        return (f"publish to {publish.topic!r}, which IoT Hub does not accept from "
                f"{identity.client_id}")
    return None


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close a stream, and abort it if the peer does not finish the TLS close in time."""
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), TLS_SHUTDOWN_TIMEOUT_S * 2)
    writer.transport.abort()


def server_tls_context(options: Options, request_client_certificate: bool) -> ssl.SSLContext:
    """Build a listener's TLS context; with a client CA file the MQTT port requests certificates.

    Python's ssl module has no verification callback, so a client certificate that does not
    chain to the client CA file fails the handshake. A self-signed thumbprint device's
    certificate therefore has to be in that file too.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(options.cert_file, options.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise OptionsError(
            f"cannot load --cert {options.cert_file} with --key {options.key_file}: {exc}"
        ) from exc
    if request_client_certificate and options.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=options.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise OptionsError(f"cannot load --client-ca {options.client_ca_file}: {exc}") from exc
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _listener_contexts(options: Options) -> dict[str, ssl.SSLContext]:
    """Build the TLS contexts of both listeners, keyed by port name."""
    return {
        "mqtt": server_tls_context(options, request_client_certificate=True),
        "https": server_tls_context(options, request_client_certificate=False),
    }


def _file_signatures(*paths: Path) -> tuple[tuple[int, int, int] | None, ...]:
    """Return each file's (mtime_ns, size, inode), or None for a file that cannot be stat'ed."""
    signatures: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            status = path.stat()
        except OSError:
            signatures.append(None)
        else:
            signatures.append((status.st_mtime_ns, status.st_size, status.st_ino))
    return tuple(signatures)


def _certificate_names(cert_file: Path) -> tuple[str, str]:
    """Return the subject and issuer of the first certificate in cert_file, for the log."""
    certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return certificate.subject.rfc4514_string(), certificate.issuer.rfc4514_string()


def upstream_tls_context(options: Options) -> ssl.SSLContext | None:
    """Build the context for the broker connection; None means plain TCP."""
    if options.upstream_ca_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=options.upstream_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise OptionsError(f"cannot load --upstream-ca {options.upstream_ca_file}: {exc}") from exc
    return context


def load_trust_anchors(client_ca_file: Path | None) -> frozenset[bytes]:
    """Return the DER of every certificate in the client CA file, for the CA-signed check."""
    if client_ca_file is None:
        return frozenset()
    try:
        certificates = x509.load_pem_x509_certificates(client_ca_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise OptionsError(f"cannot load --client-ca {client_ca_file}: {exc}") from exc
    return frozenset(certificate.public_bytes(Encoding.DER) for certificate in certificates)


def _peer(writer: asyncio.StreamWriter) -> str:
    return _address(writer.get_extra_info("peername"))


def _address(address: tuple[str, int] | None) -> str:
    return f"{address[0]}:{address[1]}" if address else "unknown"


class OneLineParser(argparse.ArgumentParser):
    """Reports a usage error in one line, so a test or the demo can show it whole."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def parse_endpoint(option: str, text: str, allow_zero: bool) -> tuple[str, int]:
    host, separator, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    lowest = 0 if allow_zero else 1
    if not separator or not host or not port_text.isdigit() or not (
        lowest <= int(port_text) <= 65535
    ):
        raise OptionsError(
            f"invalid {option} {text!r}; expected host:port with a port of {lowest} to 65535"
        )
    return host, int(port_text)


def build_options(args: argparse.Namespace) -> Options:
    """Check the parsed arguments; raise OptionsError naming the option and the value."""
    listen_host, listen_port = parse_endpoint("--listen", args.listen, allow_zero=True)
    upstream_host, upstream_port = parse_endpoint("--upstream", args.upstream, allow_zero=False)
    if not 0 <= args.https_port <= 65535:
        raise OptionsError(f"invalid --https-port {args.https_port}; expected 0 to 65535")
    if not args.skew_s >= 0:
        raise OptionsError(f"invalid --skew-s {args.skew_s:g}; expected 0 or more seconds")
    hub_host = args.hub_host
    if not hub_host or any(ch in hub_host for ch in "/?# ") or not hub_host.isprintable():
        raise OptionsError(f"invalid --hub-host {hub_host!r}; expected a host name")
    return Options(
        listen_host=listen_host,
        listen_port=listen_port,
        https_port=args.https_port,
        cert_file=args.cert,
        key_file=args.key,
        client_ca_file=args.client_ca,
        registry_file=args.registry,
        upstream_host=upstream_host,
        upstream_port=upstream_port,
        upstream_ca_file=args.upstream_ca,
        skew_s=args.skew_s,
        faults_file=args.faults,
        hub_host=hub_host,
    )


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m devstack.hub_emulator",
        description="Emulate Azure IoT Hub's MQTT credential checks in front of a broker.",
    )
    parser.add_argument("--listen", default="127.0.0.1:8883",
                        help="host:port of the MQTT TLS listener; port 0 picks a free one")
    parser.add_argument("--https-port", type=int, default=0,
                        help="port of the HTTPS Date listener on the same host; 0 picks one")
    parser.add_argument("--cert", type=Path, required=True, help="server certificate (PEM)")
    parser.add_argument("--key", type=Path, required=True, help="server private key (PEM)")
    parser.add_argument("--client-ca", type=Path,
                        help="CA bundle that X.509 device certificates must chain to; without "
                        "it no client certificate is requested")
    parser.add_argument("--registry", type=Path, required=True,
                        help="device registry (TOML); see docs/hub-emulator.md")
    parser.add_argument("--upstream", required=True,
                        help="host:port of the MQTT broker that accepted traffic goes to")
    parser.add_argument("--upstream-ca", type=Path,
                        help="CA file for the broker's TLS certificate; without it the "
                        "emulator connects to the broker over plain TCP")
    parser.add_argument("--skew-s", type=float, default=300.0,
                        help="seconds a SAS token is still accepted after its se (default 300)")
    parser.add_argument("--faults", type=Path,
                        help="JSON file of fault modes, read again whenever it changes")
    parser.add_argument("--hub-host", required=True,
                        help="the hub's host name, as in HostName= of the connection string")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


async def _serve(hub: HubEmulator) -> int:
    """Listen until SIGTERM or SIGINT; print the ready line once both ports are open."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    # The handler runs on the event loop, between connections' steps, not inside one.
    loop.add_signal_handler(signal.SIGHUP, hub.reload_certificate, "SIGHUP")

    options = hub.options
    try:
        mqtt_port, https_port = await hub.start()
    except OSError as exc:
        hub.logger.error("listen_failed %s", fields(host=options.listen_host, error=exc))
        return 1
    hub.logger.info("started %s", fields(
        version=__version__, mqtt_port=mqtt_port, https_port=https_port,
        upstream=f"{options.upstream_host}:{options.upstream_port}", hub_host=options.hub_host,
        identities=len(hub.registry.identities), skew_s=options.skew_s))
    print(f"hub_emulator ready mqtt_port={mqtt_port} https_port={https_port}", flush=True)

    await stop.wait()
    await hub.stop()
    hub.logger.info("stopped %s", fields(version=__version__))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        options = build_options(args)
        registry = load_registry(options.registry_file)
        if registry.uses_x509 and options.client_ca_file is None:
            raise OptionsError(
                f"{options.registry_file} has X.509 devices but no --client-ca is given, so "
                "no client certificate would be requested"
            )
        logger = setup_logging("hub_emulator", args.log_level)
        hub = HubEmulator(options, registry, logger)
    except (OptionsError, RegistryError) as exc:
        print(f"hub_emulator: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(hub))


if __name__ == "__main__":
    sys.exit(main())
