"""The drain rate of the buffer and the uplink together, timed from the stored pages.

Run `python bench/bench_drain.py` from the checkout, with the project's virtualenv.

Each run starts mosquitto with TLS on loopback and `python -m processes.buffer` on a fresh
store. A DEALER in this script plays the reader and fills the store with the backlog in
1,000-sample pages. Then `python -m processes.uplink` starts in azure mode against
mosquitto, and the script reads the number of stored pages from the LMDB file every 2 ms.

Two times are printed for each run:
- start-up: from starting the uplink to its "connected" log line (imports, TLS, CONNACK);
- drain: from that line to an empty store, so every page was published, acknowledged by
  the broker and deleted by the buffer.

bench/bench_gateway.py times its drain from `plcbridge ctl start` to the buffer's
once-a-second tap counters, so that figure also contains supervisord's startsecs, the
start-up and up to a second of tap granularity. This script times the delivery path alone.

Also printed for the drain: the CPU seconds of the buffer, mosquitto and the uplink, per
thread group ("main", "zmq" for ZeroMQ's I/O threads, "other" for the uplink's MQTT
network thread) and the machine's idle CPU seconds, from /proc; the resident memory of each
process at the start and the end; and minor page faults. --profile records py-spy stacks.
The machine's other load shows in the idle figure, so compare runs made close together.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_buffer import make_batches, measure_ingest, wait_until_sealed  # noqa: E402

from devstack.dev_certs import ensure_dev_certs  # noqa: E402
from devstack.gateway_toml import gateway_dirs, gateway_toml  # noqa: E402
from devstack.mosquitto import find_mosquitto, wait_for_tls, write_config  # noqa: E402

PAGE_SAMPLES = 1000
DEVICE_KEY = "cGxjYnJpZGdlLXRlc3QtZGV2aWNlLWtleS0zMmJ5dGU="
TIMEOUT_S = 300.0



@dataclass(frozen=True)
class RunResult:
    startup_s: float
    drain_s: float
    samples: int
    cpu_s: dict[str, float]  # per process during the drain, and "idle" for the machine
    rss_mib: dict[str, float]  # at the start of the drain, and with "/end" at its end
    minor_faults: dict[str, int]  # per process during the drain

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.drain_s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_s(pid: int) -> float:
    """Return the user plus system CPU seconds of a process, threads included."""
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[str, float]:
    """Return the CPU seconds of each thread of a process: "main", "zmq" for ZeroMQ's own
    threads, and "other" for the rest, which in the uplink is the MQTT network thread."""
    result = {"main": 0.0, "zmq": 0.0, "other": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        if task.name == str(pid):
            name = "main"
        elif (task / "comm").read_text().startswith("ZMQbg"):
            name = "zmq"
        else:
            name = "other"
        result[name] += cpu_s_of(task / "stat")
    return result


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def cpu_s_of(stat: Path) -> float:
    parts = stat.read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu_s() -> float:
    """Return the machine's idle CPU seconds since boot, all cores together."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()
    return (int(parts[4]) + int(parts[5])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_process(module: str, config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", module, "--config", str(config)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_log(path: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while text not in path.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{text} not logged:\n{path.read_text()}")
        time.sleep(0.01)


def stored_pages(env: lmdb.Environment, pages_db: lmdb._Database) -> int:
    with env.begin() as txn:
        entries: int = txn.stat(pages_db)["entries"]
        return entries


def wait_connected(log_path: Path, uplink: subprocess.Popen[bytes]) -> float:
    """Wait for the uplink's "connected" log line and return when it appeared.

    The log is read rather than the tap, because a tap subscriber that connects after the
    event misses it.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if uplink.poll() is not None:
            raise RuntimeError(f"the uplink exited with status {uplink.returncode}")
        if " connected endpoint=" in log_path.read_text():
            return time.monotonic()
        time.sleep(0.002)
    raise RuntimeError("the uplink did not connect within 30 s")


def profile(pid: int, name: str, folder: Path) -> subprocess.Popen[bytes]:
    """Start py-spy on a process, writing its sampled stacks into folder/<name>.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--threads",
         "--nonblocking", "--rate", "1000", "--format", "raw",
         "--output", str(folder / f"{name}.txt")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def time_drain(root: Path, config: Path, samples: int, pids: dict[str, int],
               profile_dir: Path | None) -> RunResult:
    """Start the uplink on the filled store and time it until the store is empty."""
    env = lmdb.open(str(root / "state" / "buffer"), readonly=True, lock=True, max_dbs=4)
    pages_db = env.open_db(b"pages", create=False)
    uplink = start_process("processes.uplink", config, root / "uplink.log")
    pids = {**pids, "uplink": uplink.pid}
    try:
        started = time.monotonic()
        connected = wait_connected(root / "uplink.log", uplink)
        cpu_before = {name: cpu_s(pid) for name, pid in pids.items()}
        cpu_before["idle"] = idle_cpu_s()
        faults_before = {name: minor_faults(pid) for name, pid in pids.items()}
        threads_before = {name: thread_cpu_s(pids[name]) for name in ("buffer", "uplink")}
        rss_before = {name: rss_mib(pid) for name, pid in pids.items()}
        profilers = [profile(pids[name], name, profile_dir)
                     for name in ("buffer", "uplink")] if profile_dir else []
        deadline = connected + TIMEOUT_S
        while stored_pages(env, pages_db) > 0:
            if time.monotonic() > deadline or uplink.poll() is not None:
                raise RuntimeError("the backlog did not drain")
            time.sleep(0.002)
        drained = time.monotonic()

        cpu = {name: cpu_s(pid) - cpu_before[name] for name, pid in pids.items()}
        cpu["idle"] = idle_cpu_s() - cpu_before["idle"]
        faults = {name: minor_faults(pid) - faults_before[name] for name, pid in pids.items()}
        for process, before in threads_before.items():
            for name, value in thread_cpu_s(pids[process]).items():
                cpu[f"{process}/{name}"] = value - before[name]
        rss = {**rss_before, **{f"{name}/end": rss_mib(pid) for name, pid in pids.items()}}
        for profiler in profilers:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=30)
        return RunResult(connected - started, drained - connected, samples, cpu, rss, faults)
    finally:
        stop_process(uplink)
        env.close()


def run_once(args: argparse.Namespace, batches: list[tuple[int, bytes]], certs: Path
             ) -> RunResult:
    root = Path(tempfile.mkdtemp(prefix="pb-drain-", dir="/tmp"))
    broker_port = free_port()
    config = root / "gateway.toml"
    config.write_text(gateway_toml(
        gateway={**gateway_dirs(root), "log_level": "INFO"},
        buffer={"max_bytes": 1073741824, "page_max_samples": PAGE_SAMPLES,
                "page_max_bytes": 262144, "page_max_age_ms": 200, "sync": not args.no_sync},
        uplink={"mode": "azure", "port": broker_port, "max_inflight_pages": args.inflight},
        credentials={"connection_string_file": f"{root}/connection-string.txt",
                     "ca_file": str(certs / "ca.pem")},
    ))
    (root / "connection-string.txt").write_text(
        f"HostName=localhost;DeviceId=drain-bench;SharedAccessKey={DEVICE_KEY}\n")
    broker = subprocess.Popen(
        [find_mosquitto(), "-c", str(write_config(broker_port, certs, root / "mosquitto"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    buffer = start_process("processes.buffer", config, root / "buffer.log")
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        wait_for_tls(broker_port, certs / "ca.pem", 10, broker)
        wait_for_log(root / "buffer.log", "buffer_ready", buffer)
        measure_ingest(context, root / "run", batches)
        wait_until_sealed(context, root / "run", len(batches))
        pids = {"buffer": buffer.pid, "broker": broker.pid}
        return time_drain(root, config, sum(count for count, _array in batches), pids,
                          args.profile)
    finally:
        context.destroy(linger=0)
        stop_process(buffer)
        stop_process(broker)
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2_000_000, help="backlog in samples")
    parser.add_argument("--runs", type=int, default=3, help="runs to take the median of")
    parser.add_argument("--inflight", type=int, default=20, help="uplink.max_inflight_pages to set")
    parser.add_argument("--profile", type=Path, help="record py-spy stacks into this folder")
    parser.add_argument("--no-sync", action="store_true", help="set buffer.sync = false")
    args = parser.parse_args()

    certs = ROOT / "var" / "dev-certs"
    ensure_dev_certs(certs)
    batches = make_batches(args.samples, PAGE_SAMPLES)
    print(f"backlog: {args.samples} samples in {len(batches)} pages of {PAGE_SAMPLES}; "
          f"sync={not args.no_sync} max_inflight_pages={args.inflight}")

    results = []
    for run in range(1, args.runs + 1):
        result = run_once(args, batches, certs)
        results.append(result)
        cpu = " ".join(f"{name} {value:.2f}" for name, value in result.cpu_s.items())
        rss = " ".join(f"{name} {value:.1f}" for name, value in result.rss_mib.items())
        print(f"run {run}: start-up {result.startup_s:.3f} s, drain {result.drain_s:.3f} s = "
              f"{result.samples_per_s:,.0f} samples/s; CPU s: {cpu}; RSS MiB: {rss}; "
              f"minor page faults: {result.minor_faults}")

    rate = statistics.median(result.samples_per_s for result in results)
    startup = statistics.median(result.startup_s for result in results)
    print(f"median of {args.runs}: drain {rate:,.0f} samples/s, start-up {startup:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
