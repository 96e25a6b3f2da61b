"""A Modbus TCP server that replaces the PLC in the demo and in tests.

Run it with ``python -m devstack.plc_simulator --host 127.0.0.1 --port 15020``. It responds
to every unit id. With ``--framer rtu`` it speaks Modbus RTU frames over TCP, as a
serial-to-Ethernet converter in transparent mode does.

A tick counter grows by one every 10 ms of the server's monotonic clock, and every value
below is derived from that tick. Each table is written with one setValues call per tick, so
one read request gets a consistent snapshot and a test can check every sample against the
others read with it.

Register map, with zero-based protocol addresses:

    holding registers 0-1     tick counter, uint32, high word first       line1.counter
    holding registers 2-3     float32 sin(tick / 100), high word first    line1.sine
    holding register 4        (tick & 0xFFFF) ^ 0xA5A5, uint16            line1.check
    holding register 5        always 0
    holding registers 6-7     float32 NaN, as a PLC register contains before its program writes one
    holding registers 8-99    always 0
    holding registers 100+i   (tick + i) & 0xFFFF for i < --bench-registers, for benchmarks
    holding registers 100+N   16 registers after the N benchmark registers, 0 at start: a
                              scratch area for write tests that the tick never overwrites
    input register 0          round(200 + 50 * sin(tick / 1000)), int16 in tenths of a degree
    input registers 1-9       always 0
    input registers 10-11     serial number 22091017, uint32, high word first; with
                              --serial-file, the number in that file, read again
                              whenever the file changes, so a test can swap the PLC
    coil 0                    running flag: (tick // 100) % 2 == 0
    coils 1-15                false at start, never overwritten: scratch for write tests
    discrete input 0          stopped flag: the inverse of coil 0

Reading past the end of a table returns Modbus exception 2 (illegal data address).
SIGTERM or SIGINT stops the server cleanly with exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import struct
import sys
import time
from pathlib import Path

from pymodbus.framer import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

TICK_S = 0.010
SERIAL_NUMBER = 22091017
BENCH_START = 100
SCRATCH_REGISTERS = 16
UNSET_FLOAT32 = [0x7FC0, 0x0000]  # the float32 quiet NaN, high word first

# Function codes that select the table in pymodbus's setValues: 3 holding registers,
# 4 input registers, 1 coils, 2 discrete inputs.
HOLDING_REGISTERS = 3
INPUT_REGISTERS = 4
COILS = 1
DISCRETE_INPUTS = 2

# SimDevice id 0 responds to every unit id that has no device of its own.
ANY_UNIT = 0

logger = logging.getLogger("plcbridge.plc_simulator")


def split_uint32(value: int) -> list[int]:
    """Split an unsigned 32-bit value into two registers, high word first."""
    return [(value >> 16) & 0xFFFF, value & 0xFFFF]


def float32_registers(value: float) -> list[int]:
    """Encode a float32 as two registers, high word first."""
    high, low = struct.unpack(">HH", struct.pack(">f", value))
    return [high, low]


def holding_registers(tick: int, bench_registers: int) -> list[int]:
    """Return holding registers 0 to 100 + bench_registers - 1 for one tick."""
    counter = tick & 0xFFFFFFFF
    values = split_uint32(counter)
    values += float32_registers(math.sin(counter / 100))
    values.append((counter & 0xFFFF) ^ 0xA5A5)
    values += [0, *UNSET_FLOAT32]
    values += [0] * (BENCH_START - len(values))
    values += [(tick + i) & 0xFFFF for i in range(bench_registers)]
    return values


def input_registers(tick: int, serial_number: int = SERIAL_NUMBER) -> list[int]:
    """Return input registers 0 to 11 for one tick."""
    temperature_tenths = round(200 + 50 * math.sin(tick / 1000))
    values = [temperature_tenths & 0xFFFF]
    values += [0] * (10 - len(values))
    values += split_uint32(serial_number)
    return values


class SerialNumber:
    """The serial number in input registers 10-11: fixed, or taken from a file."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._mtime_ns: int | None = None
        self.value = SERIAL_NUMBER
        self.refresh()

    def refresh(self) -> None:
        """Read the file again when its modification time changed; keep the last number
        when the file is missing or does not contain a uint32."""
        if self._path is None:
            return
        try:
            mtime_ns = self._path.stat().st_mtime_ns
            if mtime_ns == self._mtime_ns:
                return
            self._mtime_ns = mtime_ns
            number = int(self._path.read_text().strip())
        except (OSError, ValueError) as exc:
            logger.warning("serial_file_unreadable path=%s error=%s", self._path, exc)
            return
        if not 0 <= number <= 0xFFFFFFFF:
            logger.warning("serial_file_out_of_range path=%s value=%d", self._path, number)
            return
        if number != self.value:
            logger.info("serial_number_changed old=%d new=%d", self.value, number)
        self.value = number


def running(tick: int) -> bool:
    return (tick // 100) % 2 == 0


def build_device(bench_registers: int) -> SimDevice:
    """Build a device with four separate tables, each valid from address 0.

    SimData addresses are zero-based protocol addresses. The deprecated
    ModbusSequentialDataBlock, by contrast, maps protocol address 0 to its address 1.
    """
    holding = holding_registers(0, bench_registers) + [0] * SCRATCH_REGISTERS
    inputs = input_registers(0)
    return SimDevice(
        id=ANY_UNIT,
        simdata=(
            [SimData(0, values=[True] + [False] * 15, datatype=DataType.BITS)],
            [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
            [SimData(0, values=holding, datatype=DataType.REGISTERS)],
            [SimData(0, values=inputs, datatype=DataType.REGISTERS)],
        ),
    )


async def write_tick(
    server: ModbusTcpServer, tick: int, bench_registers: int, serial_number: int
) -> None:
    """Write every table for one tick, with one setValues call per table.

    With no action callback configured, pymodbus 3.16's setValues does not yield to the event
    loop, so no response is sent between the first and the last register of a table.
    """
    flag = running(tick)
    await server.async_setValues(
        ANY_UNIT, HOLDING_REGISTERS, 0, holding_registers(tick, bench_registers)
    )
    await server.async_setValues(ANY_UNIT, INPUT_REGISTERS, 0,
                                 input_registers(tick, serial_number))
    await server.async_setValues(ANY_UNIT, COILS, 0, [flag])
    await server.async_setValues(ANY_UNIT, DISCRETE_INPUTS, 0, [not flag])


async def run_ticks(
    server: ModbusTcpServer, bench_registers: int, serial: SerialNumber
) -> None:
    """Write new values whenever the tick changes, until cancelled."""
    start = time.monotonic()
    last_tick = -1
    while True:
        elapsed = time.monotonic() - start
        tick = int(elapsed / TICK_S)
        if tick != last_tick:
            # A stat every 10th tick, 100 ms, is quick enough for a test that swaps the PLC.
            if tick % 10 == 0:
                serial.refresh()
            await write_tick(server, tick, bench_registers, serial.value)
            last_tick = tick
        await asyncio.sleep(TICK_S - (elapsed % TICK_S))


async def serve(host: str, port: int, bench_registers: int, framer: str = "socket",
                serial_file: Path | None = None) -> int:
    """Serve until SIGTERM or SIGINT, and return the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    server = ModbusTcpServer(
        build_device(bench_registers), address=(host, port), framer=FramerType(framer)
    )
    try:
        await server.serve_forever(background=True)
    except RuntimeError as exc:
        logger.error("listen_failed address=%s:%d error=%s", host, port, exc)
        return 1
    logger.info(
        "listening address=%s:%d framer=%s bench_registers=%d",
        host, port, framer, bench_registers,
    )

    serial = SerialNumber(serial_file)
    ticker = asyncio.create_task(run_ticks(server, bench_registers, serial), name="ticks")
    await stop.wait()

    ticker.cancel()
    await server.shutdown()
    logger.info("stopped address=%s:%d", host, port)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="plc_simulator", description="Modbus TCP server with self-checking values"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=15020, help="TCP port to listen on")
    parser.add_argument(
        "--bench-registers",
        type=int,
        default=1000,
        help="number of benchmark holding registers from address 100 (0 to 65420)",
    )
    parser.add_argument(
        "--framer",
        choices=("socket", "rtu"),
        default="socket",
        help="socket: Modbus TCP; rtu: Modbus RTU frames over TCP",
    )
    parser.add_argument(
        "--serial-file",
        type=Path,
        help="file with the serial number for input registers 10-11, as decimal text; "
        "read again whenever it changes (default: a fixed 22091017)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.bench_registers <= 65536 - BENCH_START - SCRATCH_REGISTERS:
        parser.error(f"--bench-registers {args.bench_registers} is not between 0 and 65420")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not between 0 and 65535")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # pymodbus 3.16 logs its listen and every client connection at INFO.
    logging.getLogger("pymodbus").setLevel(logging.WARNING)
    return asyncio.run(serve(args.host, args.port, args.bench_registers, args.framer,
                             args.serial_file))


if __name__ == "__main__":
    sys.exit(main())
