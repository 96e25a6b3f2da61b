"""The token server's cost per token: latency of a fetch, with each method, and its memory.

Run `python bench/bench_token_server.py` from the checkout, with the project's virtualenv.

It starts `plcbridge token-server` on loopback with the development certificates in a
temporary folder, with the rate limit raised out of the way. One client then fetches tokens
one after the other, each on a new TLS connection as the gateway does: with a client
certificate (one request), and by challenge (two requests). Each run prints the median
latency and the sequential rate; the summary gives the medians over the runs and the
server's resident memory after them.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.config import TokenServerSettings
from common.token_client import TokenServerClient
from devstack.dev_certs import ensure_dev_certs, make_client_cert

ROOT = Path(__file__).resolve().parents[1]
SERIAL = "BENCH-SN-1"
DEVICE_ID = "bench-device"


def write_secret(path: Path) -> Path:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    return path


def start_server(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    certs, _created = ensure_dev_certs(folder / "certs")
    key_file, secret_file = write_secret(folder / "device.key"), write_secret(folder / "gw.secret")
    config = folder / "server.toml"
    config.write_text(
        f'audit_log_file = "{folder}/audit.jsonl"\n'
        f'[listen]\nhost = "127.0.0.1"\nport = 0\ncert_file = "{certs.server_cert}"\n'
        f'key_file = "{certs.server_key}"\nclient_ca_file = "{certs.ca_cert}"\n'
        '[tokens]\nhub_host_name = "localhost"\n'
        "[rate_limit]\nburst = 10000\nper_minute = 600000\n"
        f'[[devices]]\nserial = "{SERIAL}"\ndevice_id = "{DEVICE_ID}"\n'
        f'key_file = "{key_file}"\nsecret_file = "{secret_file}"\n')
    log = folder / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "token-server", "--config", str(config)],
            cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = re.search(r"token_server_ready .*port=(\d+)", log.read_text())
        if found:
            return process, int(found[1])
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"token server not ready within 15 s:\n{log.read_text()}")


def client(folder: Path, port: int, method: str) -> TokenServerClient:
    certs = folder / "certs"
    auth: dict[str, object]
    if method == "certificate":
        cert, key = make_client_cert(folder / "client", certs / "ca.pem", certs / "ca.key",
                                     SERIAL)
        auth = {"client_cert_file": cert, "client_key_file": key}
    else:
        auth = {"serial": SERIAL, "secret_file": folder / "gw.secret"}
    return TokenServerClient(TokenServerSettings(
        url=f"https://localhost:{port}", host="localhost", port=port,
        ca_file=certs / "ca.pem", hub_host_name="localhost", device_id=DEVICE_ID,
        **auth))  # type: ignore[arg-type]


def measure(fetcher: TokenServerClient, tokens: int) -> list[float]:
    latencies = []
    for _ in range(tokens):
        started = time.perf_counter()
        fetcher.fetch()
        latencies.append(time.perf_counter() - started)
    return latencies


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=300, help="tokens per method and run")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="pb-bench-tokens-"))
    process, port = start_server(folder)
    try:
        for method in ("certificate", "challenge"):
            fetcher = client(folder, port, method)
            medians = []
            for run in range(args.runs):
                latencies = measure(fetcher, args.tokens)
                median_ms = statistics.median(latencies) * 1000
                medians.append(median_ms)
                print(f"{method} run {run + 1}: median {median_ms:.2f} ms a token, "
                      f"{len(latencies) / sum(latencies):.0f} tokens/s sequential")
            print(f"{method}: median of runs {statistics.median(medians):.2f} ms a token "
                  f"({', '.join(f'{m:.2f}' for m in medians)})")
        print(f"server resident memory after the runs: {resident_mib(process.pid):.1f} MiB")
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
