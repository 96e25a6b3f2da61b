"""A local mosquitto 2.0 broker with TLS on loopback, for the demo and the tests.

`python -m devstack.mosquitto --port N --certs DIR --workdir DIR` creates the development
certificates in DIR when they are missing (see devstack.dev_certs), writes mosquitto.conf
into the work folder and replaces itself with mosquitto running in the foreground, so a
SIGTERM sent to this process reaches the broker itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from devstack.dev_certs import dev_cert_paths, ensure_dev_certs

# Debian installs the broker in /usr/sbin, which is not on an ordinary user's PATH.
_FALLBACK_BINARY = Path("/usr/sbin/mosquitto")


def find_mosquitto() -> str:
    """Return the mosquitto binary's path; raise FileNotFoundError with the fix if missing."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if _FALLBACK_BINARY.exists():
        return str(_FALLBACK_BINARY)
    raise FileNotFoundError(
        "mosquitto not found on PATH or in /usr/sbin; install Debian's mosquitto package"
    )


def write_config(
    port: int,
    certs_dir: Path,
    workdir: Path,
    require_certificate: bool = False,
    allow_anonymous: bool = True,
    persistence: bool = False,
) -> Path:
    """Write mosquitto.conf for a TLS listener on 127.0.0.1:port and return its path.

    The broker accepts any client and keeps nothing on disk. Its log goes to mosquitto.log
    in workdir. With require_certificate the listener also demands a client certificate
    signed by the development CA, for X.509 tests. With allow_anonymous false and no
    password file, mosquitto refuses every client with CONNACK 5, for refusal tests. With
    persistence, sessions and their queued QoS 1 messages survive a restart of the broker,
    so a subscriber misses nothing that was published while it reconnected.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    certs = dev_cert_paths(certs_dir.resolve())
    log_file = workdir.resolve() / "mosquitto.log"
    lines = [
        "# Written by devstack.mosquitto; rewritten at every start.",
        # mosquitto 2.0.11 started as root switches to the "mosquitto" user before it reads
        # the certificates and opens its log, and could then read neither the 0600 keys nor
        # a root-owned 0700 temporary folder.
        "user root" if os.geteuid() == 0 else "",
        "per_listener_settings false",
        f"allow_anonymous {'true' if allow_anonymous else 'false'}",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {workdir.resolve()}/",
        # Queue without limit for a persistent subscriber that is offline (0 = no limit).
        "max_queued_messages 0",
        f"log_dest file {log_file}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "",
        f"listener {port} 127.0.0.1",
        "tls_version tlsv1.2",
        f"cafile {certs.ca_cert}",
        f"certfile {certs.server_cert}",
        f"keyfile {certs.server_key}",
        f"require_certificate {'true' if require_certificate else 'false'}",
    ]
    path = workdir / "mosquitto.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for_tls(
    port: int,
    ca_file: Path,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until 127.0.0.1:port completes a TLS handshake for "localhost" against ca_file.

    Raises TimeoutError after timeout_s, or RuntimeError at once if process has exited.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca_file))
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"mosquitto exited with status {process.returncode}")
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=1.0) as raw,
                context.wrap_socket(raw, server_hostname="localhost"),
            ):
                return
        except OSError as exc:
            last_error = exc
            time.sleep(0.05)
    raise TimeoutError(
        f"no TLS handshake with 127.0.0.1:{port} within {timeout_s:g} s: {last_error}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.mosquitto",
        description="Run mosquitto in the foreground with TLS on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, required=True, help="TLS listener port on 127.0.0.1")
    parser.add_argument("--certs", type=Path, required=True,
                        help="folder of the development certificates; created when missing")
    parser.add_argument("--workdir", type=Path, required=True,
                        help="folder for mosquitto.conf and mosquitto.log")
    parser.add_argument("--require-certificate", action="store_true",
                        help="demand a client certificate signed by the development CA")
    args = parser.parse_args(argv)

    if not 1 <= args.port <= 65535:
        parser.error(f"invalid --port {args.port}; expected 1 to 65535")
    try:
        binary = find_mosquitto()
        ensure_dev_certs(args.certs)
        config = write_config(args.port, args.certs, args.workdir, args.require_certificate)
    except OSError as exc:
        print(f"devstack.mosquitto: {exc}", file=sys.stderr)
        return 1

    print(f"devstack.mosquitto: TLS on 127.0.0.1:{args.port}, log {args.workdir}/mosquitto.log",
          flush=True)
    os.execv(binary, [binary, "-c", str(config)])


if __name__ == "__main__":
    sys.exit(main())
