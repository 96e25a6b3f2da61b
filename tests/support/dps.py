"""The DPS emulator for tests: started on a free loopback port with its own files."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.dps_keys import derive_device_key
from devstack.dev_certs import dev_cert_paths
from tests.gateway_files import stop_process
from tests.support.gateway import ROOT, gateway_config
from tests.support.waiting import wait_for_ready_line

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

    def __init__(self, certs_dir: Path, workdir: Path, enrollments: str,
                 client_ca_file: Path | None = None) -> None:
        self.certs = dev_cert_paths(certs_dir)
        self.ca_file = self.certs.ca_cert
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.enrollments_file = workdir / "enrollments.toml"
        self.faults_file = workdir / "dps-faults.json"
        self.log_file = workdir / "dps_emulator.log"
        self.client_ca_file = client_ca_file
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
        if self.client_ca_file is not None:
            command += ["--client-ca", str(self.client_ca_file)]
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        found = wait_for_ready_line(self.process, self.log, _READY, timeout_s, "DPS emulator")
        self.port = int(found[1])

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


# A gateway that joins a group enrollment, and the configuration that makes it do so.
GROUP_KEY = base64.b64encode(b"plcbridge-dps-test-group-key-of-48-bytes-length!").decode()
REGISTRATION_ID = "gw-line-7"
DEVICE_KEY = derive_device_key(base64.b64decode(GROUP_KEY), REGISTRATION_ID)


def provisioning_toml(base: Path, dps_port: int, **extra: Any) -> str:
    keys = {
        "id_scope": ID_SCOPE, "global_endpoint": "localhost", "port": dps_port,
        "group_key_file": str(base / "group.key"), "registration_id": REGISTRATION_ID,
        "retry_min_s": 0.5, "retry_max_s": 2.0, "request_timeout_s": 10.0, **extra,
    }
    lines = [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n[provisioning]\n" + "\n".join(lines) + '\npayload = { site = "plant-7" }\n'


def write_config(base: Path, certs: Path, dps_port: int, plc_port: int = 1,
                 hub_port: int = 1) -> Path:
    """Write the group key and a configuration that provisions through DPS at dps_port."""
    (base / "group.key").write_text(GROUP_KEY + "\n")
    config = base / "plcbridge.toml"
    config.write_text(gateway_config(base, plc_port, hub_port, certs / "ca.pem")
                      + provisioning_toml(base, dps_port))
    return config


def group_enrollment(hub_host: str) -> str:
    return enrollments_toml(groups={"line": {"primary_key": GROUP_KEY,
                                             "assigned_hub": hub_host}})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def statuses(dps: DpsStack) -> list[str]:
    return [part.split("=", 1)[1] for line in dps.requests() for part in line.split()
            if part.startswith("status=")]


def open_alerts(base: Path) -> list[dict[str, Any]]:
    try:
        document = json.loads((base / "run" / "alerts-provisioning.json").read_text())
    except (OSError, ValueError):
        return []
    return list(document.get("open", []))
