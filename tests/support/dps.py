"""The DPS emulator for tests: started on a free loopback port with its own files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from devstack.dev_certs import dev_cert_paths
from tests.gateway_files import stop_process

_READY = re.compile(r"dps_emulator ready mqtt_port=(\d+)")
ID_SCOPE = "0ne00TEST01"


def enrollments_toml(individual: dict[str, dict[str, Any]] | None = None,
                     groups: dict[str, dict[str, Any]] | None = None,
                     id_scope: str = ID_SCOPE) -> str:
    """Render an enrollments file: {"gw-01": {"primary_key": "...", "assigned_hub": ...}}."""
    lines = [f"id_scope = {json.dumps(id_scope)}", ""]
    for section, tables in (("individual", individual or {}), ("groups", groups or {})):
        for name, table in tables.items():
            lines.append(f"[{section}.{json.dumps(name)}]")
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in table.items())
            lines.append("")
    return "\n".join(lines)


class DpsStack:
    """The DPS emulator with an enrollments file and a faults file in workdir."""

    def __init__(self, certs_dir: Path, workdir: Path, enrollments: str) -> None:
        self.certs = dev_cert_paths(certs_dir)
        self.ca_file = self.certs.ca_cert
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.enrollments_file = workdir / "enrollments.toml"
        self.faults_file = workdir / "dps-faults.json"
        self.log_file = workdir / "dps_emulator.log"
        self.set_enrollments(enrollments)
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> DpsStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 15.0) -> None:
        command = [
            sys.executable, "-m", "devstack.dps_emulator", "--listen", "127.0.0.1:0",
            "--cert", str(self.certs.server_cert), "--key", str(self.certs.server_key),
            "--enrollments", str(self.enrollments_file), "--faults", str(self.faults_file),
        ]
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = _READY.search(self.log())
            if found:
                self.port = int(found[1])
                return
            if self.process.poll() is not None:
                raise AssertionError(f"DPS emulator exited with status "
                                     f"{self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"DPS emulator not ready within {timeout_s:g} s:\n{self.log()}")

    def stop(self, timeout_s: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, timeout_s)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def requests(self) -> list[str]:
        """Return the emulator's log line of each register or poll request, in order."""
        return [line for line in self.log().splitlines() if " request kind=" in line]

    def set_faults(self, **faults: Any) -> None:
        """Replace the faults file in one rename; the emulator follows it at its next request."""
        _replace(self.faults_file, json.dumps(faults))

    def set_enrollments(self, text: str) -> None:
        _replace(self.enrollments_file, text)


def _replace(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
