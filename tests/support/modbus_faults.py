"""A Modbus TCP server with scripted faults, written on raw sockets so that it can misbehave.

Register i of either register table contains i & 0xFFFF, so a value shows which address it
came from and a reply landing on the wrong request is visible. Behaviours:

    normal        answer every read correctly
    wrong_tid     answer with the transaction id plus 1000
    tid_zero      answer with transaction id 0
    late_first    answer the server's first request after late_s, the rest at once
    exception:N   answer with Modbus exception code N
    silent        accept requests and never answer
"""

from __future__ import annotations

import socket
import struct
import threading


class FaultyModbusServer:
    """A loopback Modbus TCP server on its own threads; close() stops it."""

    def __init__(self, behaviour: str = "normal", late_s: float = 0.5) -> None:
        self.behaviour = behaviour
        self.late_s = late_s
        self.requests = 0
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port: int = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="faulty-plc", daemon=True)
        self._accept.start()

    def close(self) -> None:
        self._stop.set()
        self._accept.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)
        self._server.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _peer = self._server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        try:
            while not self._stop.is_set():
                request = self._receive(conn)
                if request is None:
                    continue
                if not request:
                    return
                self.requests += 1
                reply = self._reply(request)
                if reply is None:
                    continue
                if self.requests == 1 and self.behaviour == "late_first":
                    # Sent on the same socket after the client's timeout, as a slow PLC does.
                    self._stop.wait(self.late_s)
                conn.sendall(reply)
        except OSError:
            return
        finally:
            conn.close()

    def _receive(self, conn: socket.socket) -> bytes | None:
        """Return one request frame, b"" when the client closed, None on a quiet interval."""
        try:
            header = conn.recv(7, socket.MSG_WAITALL)
        except TimeoutError:
            return None
        if len(header) < 7:
            return b""
        length = struct.unpack(">H", header[4:6])[0]
        conn.settimeout(1.0)
        body = conn.recv(length - 1, socket.MSG_WAITALL)
        conn.settimeout(0.1)
        return header + body

    def _reply(self, request: bytes) -> bytes | None:
        tid, _protocol, _length, unit = struct.unpack(">HHHB", request[:7])
        function, address, count = struct.unpack(">BHH", request[7:12])
        if self.behaviour == "silent":
            return None
        if self.behaviour == "wrong_tid":
            tid = (tid + 1000) & 0xFFFF
        elif self.behaviour == "tid_zero":
            tid = 0

        if self.behaviour.startswith("exception:"):
            code = int(self.behaviour.split(":")[1])
            pdu = struct.pack(">BB", function | 0x80, code)
        else:
            words = [(address + i) & 0xFFFF for i in range(count)]
            pdu = struct.pack(f">BB{count}H", function, 2 * count, *words)
        return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu
