"""A small MQTT 3.1.1 framer for the hub emulator: packet boundaries, CONNECT, PUBLISH, SUBSCRIBE.

Only what the emulator inspects is decoded. Every packet keeps its exact bytes, so the
emulator can forward it unchanged to the broker behind it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

# Control packet types (MQTT 3.1.1 section 2.2.1).
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
SUBSCRIBE = 8
DISCONNECT = 14

# CONNACK return codes (section 3.2.2.3). IoT Hub returns 5 for every failed CONNECT.
CONNACK_ACCEPTED = 0
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_NOT_AUTHORIZED = 5

# The protocol allows 256 MiB. IoT Hub takes messages up to 256 KB, so 1 MiB bounds the
# memory a misbehaving client can make the emulator hold while staying above every valid
# message.
MAX_REMAINING_LENGTH = 1024 * 1024


class FrameError(Exception):
    """A packet that breaks MQTT 3.1.1 framing or field encoding."""


@dataclass(frozen=True)
class Packet:
    packet_type: int
    flags: int
    body: bytes = field(repr=False)
    # Fixed header and body exactly as read, for byte-for-byte forwarding.
    raw: bytes = field(repr=False)


@dataclass(frozen=True)
class Connect:
    protocol_name: str
    protocol_level: int
    clean_session: bool
    keep_alive_s: int
    client_id: str
    will_topic: str | None
    username: str | None
    # The SAS token; repr=False keeps it out of tracebacks and logs.
    password: bytes | None = field(repr=False)


@dataclass(frozen=True)
class Publish:
    topic: str
    qos: int
    retain: bool
    packet_id: int | None


async def read_packet(reader: asyncio.StreamReader) -> Packet | None:
    """Read one whole packet; return None on a clean end of stream before its first byte.

    Raises FrameError for a malformed or oversized remaining length, and
    asyncio.IncompleteReadError when the stream ends inside a packet.
    """
    first = await reader.read(1)
    if not first:
        return None

    header = bytearray(first)
    remaining = 0
    for position in range(4):
        byte = (await reader.readexactly(1))[0]
        header.append(byte)
        remaining |= (byte & 0x7F) << (7 * position)
        if not byte & 0x80:
            break
    else:
        raise FrameError("remaining length longer than 4 bytes")
    if remaining > MAX_REMAINING_LENGTH:
        raise FrameError(f"packet of {remaining} bytes exceeds the {MAX_REMAINING_LENGTH} limit")

    body = await reader.readexactly(remaining) if remaining else b""
    return Packet(first[0] >> 4, first[0] & 0x0F, body, bytes(header) + body)


class _Fields:
    """Reads MQTT's length-prefixed fields from a packet body, in order."""

    def __init__(self, body: bytes, packet_name: str) -> None:
        self._body = body
        self._offset = 0
        self._packet_name = packet_name

    def take(self, count: int) -> bytes:
        end = self._offset + count
        if end > len(self._body):
            raise FrameError(f"{self._packet_name} ends early at byte {len(self._body)}")
        chunk = self._body[self._offset:end]
        self._offset = end
        return chunk

    def uint16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def binary(self) -> bytes:
        return self.take(self.uint16())

    def text(self, name: str) -> str:
        try:
            return self.binary().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FrameError(f"{self._packet_name}: {name} is not UTF-8") from exc

    def rest(self) -> bytes:
        return self._body[self._offset:]


def parse_connect(body: bytes) -> Connect:
    """Decode a CONNECT body (section 3.1); raise FrameError naming the bad field."""
    fields = _Fields(body, "CONNECT")
    protocol_name = fields.text("protocol name")
    protocol_level = fields.take(1)[0]
    flags = fields.take(1)[0]
    keep_alive_s = fields.uint16()
    _check_connect_flags(flags)

    client_id = fields.text("client id")
    will_topic = None
    if flags & 0x04:
        will_topic = fields.text("will topic")
        fields.binary()  # the will message is forwarded, never inspected
    username = fields.text("user name") if flags & 0x80 else None
    password = fields.binary() if flags & 0x40 else None
    if fields.rest():
        raise FrameError(f"CONNECT: {len(fields.rest())} bytes after the last field")

    return Connect(
        protocol_name=protocol_name,
        protocol_level=protocol_level,
        clean_session=bool(flags & 0x02),
        keep_alive_s=keep_alive_s,
        client_id=client_id,
        will_topic=will_topic,
        username=username,
        password=password,
    )


def _check_connect_flags(flags: int) -> None:
    """Apply the connect flag rules of section 3.1.2.3 that make a CONNECT malformed."""
    will = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    if flags & 0x01:
        raise FrameError("CONNECT: reserved flag bit 0 is set")
    if not will and (will_qos or flags & 0x20):
        raise FrameError("CONNECT: will QoS or will retain set without the will flag")
    if will_qos == 3:
        raise FrameError("CONNECT: will QoS 3, which MQTT 3.1.1 forbids")
    if flags & 0x40 and not flags & 0x80:
        raise FrameError("CONNECT: password flag set without the user name flag")


def parse_publish(flags: int, body: bytes) -> Publish:
    """Decode a PUBLISH variable header (section 3.3); the payload is left alone."""
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise FrameError("PUBLISH with QoS bits 11, which MQTT 3.1.1 forbids")
    fields = _Fields(body, "PUBLISH")
    topic = fields.text("topic")
    packet_id = fields.uint16() if qos > 0 else None
    return Publish(topic=topic, qos=qos, retain=bool(flags & 0x01), packet_id=packet_id)


def parse_subscribe(flags: int, body: bytes) -> list[str]:
    """Decode a SUBSCRIBE (section 3.8) and return its topic filters in order."""
    if flags != 0x02:
        raise FrameError(f"SUBSCRIBE with fixed header flags {flags:#06b}; expected 0b0010")
    fields = _Fields(body, "SUBSCRIBE")
    fields.uint16()  # the packet id
    topic_filters: list[str] = []
    while fields.rest():
        topic_filters.append(fields.text("topic filter"))
        requested_qos = fields.take(1)[0]
        if requested_qos > 2:
            raise FrameError(f"SUBSCRIBE: requested QoS byte {requested_qos:#04x}; expected 0 to 2")
    if not topic_filters:
        raise FrameError("SUBSCRIBE without a topic filter")
    return topic_filters


def connack(return_code: int) -> bytes:
    """Build a CONNACK with session present 0 and the given return code."""
    return bytes((CONNACK << 4, 2, 0, return_code))


# Packet types that only the DPS emulator answers itself rather than forwards.
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
SUBACK_FAILURE = 0x80


def publish_payload(publish: Publish, body: bytes) -> bytes:
    """Return the application message of a PUBLISH body that parse_publish decoded."""
    header_bytes = 2 + len(publish.topic.encode("utf-8")) + (2 if publish.qos else 0)
    return body[header_bytes:]


def encode_packet(first_byte: int, body: bytes) -> bytes:
    """Frame a body with its fixed header and remaining length (section 2.2.3)."""
    length = bytearray()
    remaining = len(body)
    while True:
        byte, remaining = remaining & 0x7F, remaining >> 7
        length.append(byte | 0x80 if remaining else byte)
        if not remaining:
            return bytes([first_byte]) + bytes(length) + body


def publish_qos0(topic: str, payload: bytes) -> bytes:
    encoded = topic.encode("utf-8")
    return encode_packet(PUBLISH << 4, len(encoded).to_bytes(2, "big") + encoded + payload)


def puback(packet_id: int) -> bytes:
    return encode_packet(PUBACK << 4, packet_id.to_bytes(2, "big"))


def suback(packet_id: int, return_codes: list[int]) -> bytes:
    return encode_packet(SUBACK << 4, packet_id.to_bytes(2, "big") + bytes(return_codes))


def unsuback(packet_id: int) -> bytes:
    return encode_packet(UNSUBACK << 4, packet_id.to_bytes(2, "big"))


def pingresp() -> bytes:
    return bytes((PINGRESP << 4, 0))
