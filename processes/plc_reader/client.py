"""The reader's Modbus connections: pymodbus enters the gateway here and nowhere else.

Three transports: Modbus TCP, Modbus RTU on a serial port, and RTU frames over TCP for
serial-to-Ethernet converters in transparent mode.

Every pymodbus exception and Modbus exception response is translated into PlcReadError,
which names the endpoint, unit id, table and address and carries the short reason that bad
samples report.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

import serial
from pymodbus.client import ModbusSerialClient, ModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from common.config import BIT_TABLES, PlcDevice, PlcSettings, Tag
from common.errors import PlcError
from common.modbus_tags import ReadRequest
from processes.plc_reader.resolver import (
    Address,
    HostResolver,
    Resolve,
    ResolveError,
    format_address,
    resolve_tcp,
)

# Modbus exception codes from the Modbus application protocol specification v1.1b3.
EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}

REASON_TIMEOUT = "timeout"
REASON_CONNECTION = "connection failed"
REASON_PROTOCOL = "protocol error"
REASON_TRANSACTION_ID = "transaction id mismatch"


class PlcReadError(PlcError):
    """A failed connect or read, with the short reason text that bad samples carry."""

    def __init__(self, message: str, reason: str, connection_lost: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.connection_lost = connection_lost


class _TcpClient(ModbusTcpClient):
    """ModbusTcpClient that connects to resolved addresses and raises the socket error.

    pymodbus 3.16's connect() calls socket.create_connection, whose getaddrinfo runs on the
    caller's thread with no timeout, and it catches the OSError, logs it on the pymodbus
    logger and returns False, so the cause (refused, unreachable, timed out) would be lost.
    """

    def __init__(
        self, resolver: HostResolver, timeout_s: float, framer: FramerType = FramerType.SOCKET
    ) -> None:
        # retries=0: a read without a response fails after timeout_s instead of waiting
        # for pymodbus's own retries (3 by default), so the reader's schedule stays on time.
        super().__init__(
            resolver.host, port=resolver.port, timeout=timeout_s, retries=0, framer=framer
        )
        self._resolver = resolver

    def connect(self) -> bool:
        if self.socket:
            return True
        params = self.comm_params
        try:
            addresses = self._resolver.addresses()
        except ResolveError as exc:
            raise PlcReadError(str(exc), exc.reason, connection_lost=True) from exc

        # Like socket.create_connection, try each address in turn and report the last error.
        error: OSError | None = None
        for address in addresses:
            try:
                self.socket = _open_socket(address, params.timeout_connect, params.source_address)
            except OSError as exc:
                error = exc
                continue
            return True

        tried = ",".join(format_address(address) for address in addresses)
        raise PlcReadError(
            f"connect to {params.host}:{params.port} ({tried}) failed: {error}",
            REASON_CONNECTION,
            connection_lost=True,
        ) from error


def _open_socket(
    address: Address, timeout_s: float | None, source_address: tuple[str, int] | None
) -> socket.socket:
    family, sockaddr = address
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        if source_address is not None:
            sock.bind(source_address)
        sock.connect(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


class _SerialClient(ModbusSerialClient):
    """ModbusSerialClient that raises the port's open error and starts with empty input.

    pymodbus 3.16's connect() logs the error on the pymodbus logger and returns False, so
    the cause (missing device, permission denied, port in use) would be lost.
    """

    def __init__(self, device: PlcDevice) -> None:
        super().__init__(
            device.serial_port,
            framer=FramerType.RTU,
            baudrate=device.baudrate,
            bytesize=device.byte_size,
            parity=device.parity,
            stopbits=device.stop_bits,
            timeout=device.timeout_s,
            retries=0,
        )

    def connect(self) -> bool:
        if self.socket:
            return True
        params = self.comm_params
        try:
            port = serial.serial_for_url(
                params.host,
                timeout=params.timeout_connect,
                write_timeout=params.timeout_connect,
                bytesize=params.bytesize,
                stopbits=params.stopbits,
                baudrate=params.baudrate,
                parity=params.parity,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise PlcReadError(
                f"open serial port {params.host} failed: {exc}",
                REASON_CONNECTION,
                connection_lost=True,
            ) from exc
        port.inter_byte_timeout = self.inter_byte_timeout
        port.reset_input_buffer()
        self.socket = port
        return True

    def flush_input(self) -> None:
        """Discard what the line delivers until it has been quiet for timeout_s.

        RTU frames carry no transaction id, so a late reply left in the input would be taken
        as the reply to the next request with the same function code and length. Draining
        until the line is quiet catches a reply up to timeout_s later than the timeout.
        The drain stops after three times timeout_s on a line that never goes quiet.
        """
        quiet_s = self.comm_params.timeout_connect or 0.0
        started = last_byte = time.monotonic()
        try:
            while self.socket is not None:
                now = time.monotonic()
                if now - last_byte >= quiet_s or now - started >= 3 * quiet_s:
                    return
                waiting = self.socket.in_waiting
                if waiting:
                    self.socket.read(waiting)
                    last_byte = time.monotonic()
                else:
                    time.sleep(max(self._recv_interval, 0.002))
        except (serial.SerialException, OSError):
            self.close()


class PlcConnection:
    """One Modbus connection to a device, opened on request and closed on any failure."""

    def __init__(
        self,
        settings: PlcSettings | PlcDevice,
        logger: logging.Logger,
        resolve: Resolve = resolve_tcp,
    ) -> None:
        self.unit_id = settings.unit_id
        self.timeout_s = settings.timeout_s
        self._client: ModbusTcpClient | ModbusSerialClient
        transport = settings.transport if isinstance(settings, PlcDevice) else "tcp"

        if isinstance(settings, PlcDevice) and transport == "rtu":
            self.endpoint = settings.serial_port
            self._client = _SerialClient(settings)
        else:
            self.endpoint = f"{settings.host}:{settings.port}"
            resolver = HostResolver(
                settings.host, settings.port, settings.timeout_s, logger, resolve
            )
            framer = FramerType.RTU if transport == "rtu_over_tcp" else FramerType.SOCKET
            self._client = _TcpClient(resolver, settings.timeout_s, framer)
        self._readers = {
            "holding_register": self._client.read_holding_registers,
            "input_register": self._client.read_input_registers,
            "coil": self._client.read_coils,
            "discrete_input": self._client.read_discrete_inputs,
        }

    @property
    def connected(self) -> bool:
        return self._client.connected

    def connect(self) -> None:
        """Resolve the host and open the TCP connection, or open the serial port.

        Raises PlcReadError naming the endpoint on failure. Blocks for at most timeout_s
        for the lookup, when one is started, plus timeout_s for each address tried.
        """
        self._client.connect()

    def close(self) -> None:
        self._client.close()

    def read(self, request: ReadRequest) -> list[int] | list[bool]:
        """Read the registers or bits of one request; raise PlcReadError on any failure.

        A Modbus exception response leaves the connection open. A timeout, a lost
        connection or a malformed response closes it, because a late response to this
        request would otherwise be taken for the response to the next one.
        """
        unit_id = self.unit_id if request.unit_id is None else request.unit_id
        where = (
            f"{self.endpoint} unit {unit_id} {request.table} "
            f"address {request.address} count {request.count}"
        )
        read = self._readers[request.table]
        response = self._exchange(
            "read from",
            where,
            lambda: read(request.address, count=request.count, device_id=unit_id),
        )
        return self._values(where, request, response)

    def write(self, tag: Tag, function_code: int, registers: list[int], coil: bool) -> None:
        """Send one write request for tag; raise PlcReadError on any failure.

        function_code 5 and 15 write coil, 6 the one register and 16 the registers. 22 applies
        registers[0] as the AND mask and registers[1] as the OR mask to the tag's register.
        Failures are handled as for reads: an exception response keeps the connection,
        others close it.
        """
        unit_id = self.unit_id if tag.unit_id is None else tag.unit_id
        where = (
            f"{self.endpoint} unit {unit_id} {tag.table} address {tag.address} "
            f"function code {function_code}"
        )

        def send() -> ModbusPDU:
            if function_code == 5:
                return self._client.write_coil(tag.address, coil, device_id=unit_id)
            if function_code == 15:
                return self._client.write_coils(tag.address, [coil], device_id=unit_id)
            if function_code == 6:
                return self._client.write_register(tag.address, registers[0], device_id=unit_id)
            if function_code == 22:
                return self._client.mask_write_register(
                    address=tag.address, and_mask=registers[0], or_mask=registers[1],
                    device_id=unit_id)
            return self._client.write_registers(tag.address, registers, device_id=unit_id)

        self._exchange("write to", where, send)

    def _exchange(
        self, operation: str, where: str, send: Callable[[], ModbusPDU]
    ) -> ModbusPDU:
        """Send one request and return its response, or raise PlcReadError on any failure.

        operation ("read from" or "write to") and where start every message.
        """
        try:
            response = send()
        except (ConnectionException, OSError) as exc:
            # pymodbus 3.16 lets a reset connection's OSError out of recv() untranslated.
            self.close()
            raise PlcReadError(
                f"{operation} {where} failed: connection lost: {exc}",
                REASON_CONNECTION,
                connection_lost=True,
            ) from exc
        except ModbusIOException as exc:
            if isinstance(self._client, _SerialClient):
                self._client.flush_input()
            self.close()
            raise self._io_error(where, exc, operation) from exc
        except ModbusException as exc:
            self.close()
            raise PlcReadError(
                f"{operation} {where} failed: {exc}", REASON_PROTOCOL, connection_lost=True
            ) from exc

        if response.isError():
            code = response.exception_code
            name = EXCEPTION_NAMES.get(code, "unknown exception code")
            raise PlcReadError(
                f"{operation} {where} failed: modbus exception {code} ({name})",
                f"modbus exception {code}",
                connection_lost=False,
            )
        return response

    def _io_error(
        self, where: str, exc: ModbusIOException, operation: str
    ) -> PlcReadError:
        # pymodbus 3.16 raises ModbusIOException both for a request without a response
        # within the timeout and for a response with the wrong transaction or device id.
        # Only the message text distinguishes them. Its framer already skips a reply whose
        # nonzero transaction id or unit id differs from the request's, so such a reply,
        # a late one included, ends as a timeout. A reply with transaction id 0 passes the
        # framer and is rejected by the id check that raises here.
        text = str(exc)
        if "No response received" in text:
            return PlcReadError(
                f"{operation} {where} timed out after {self.timeout_s:g} s",
                REASON_TIMEOUT,
                connection_lost=True,
            )
        if "transaction id" in text:
            return PlcReadError(
                f"{operation} {where} failed: the reply's transaction id does not match the "
                f"request's ({text})",
                REASON_TRANSACTION_ID,
                connection_lost=True,
            )
        return PlcReadError(
            f"{operation} {where} failed: {exc}", REASON_PROTOCOL, connection_lost=True
        )

    def _values(
        self, where: str, request: ReadRequest, response: ModbusPDU
    ) -> list[int] | list[bool]:
        # A bit response is padded to whole bytes, so cut it to the requested count.
        values: list[int] | list[bool]
        if request.table in BIT_TABLES:
            values = list(response.bits)[: request.count]
        else:
            values = list(response.registers)
        if len(values) < request.count:
            self.close()
            raise PlcReadError(
                f"read from {where} failed: response contains only {len(values)} values",
                REASON_PROTOCOL,
                connection_lost=True,
            )
        return values
