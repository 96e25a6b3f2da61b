"""The provisioning client against the DPS emulator over TLS: `plcbridge provision`, its
retries, and the provisioning program's alert and backoff."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import load_config
from common.errors import ConfigError
from devstack.dev_certs import make_client_cert
from processes.provisioning import NotReadyError, registration_id
from tests.support.dps import (
    DEVICE_KEY,
    GROUP_KEY,
    ID_SCOPE,
    REGISTRATION_ID,
    DpsStack,
    enrollments_toml,
    group_enrollment,
    open_alerts,
    run_cli,
    statuses,
    write_config,
)
from tests.support.gateway import ROOT, gateway_config
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def dps(base: Path, certs: Path) -> Iterator[DpsStack]:
    with DpsStack(certs, base / "dps", group_enrollment("localhost")) as stack:
        yield stack


def test_provision_throttled_twice_then_assigned(base: Path, certs: Path,
                                                 dps: DpsStack) -> None:
    dps.set_faults(throttle_requests=2, assigning_polls=1, retry_after_s=0.2)
    config = write_config(base, certs, dps.port)

    result = run_cli("provision", "--config", str(config))

    assert result.returncode == 0, result.stderr
    assert statuses(dps) == ["429", "429", "202", "202", "200"]
    connection = base / "connection-string.txt"
    assert connection.read_text() == (
        f"HostName=localhost;DeviceId={REGISTRATION_ID};SharedAccessKey={DEVICE_KEY}\n")
    assert stat.S_IMODE(connection.stat().st_mode) == 0o600
    assert f"hub=localhost device_id={REGISTRATION_ID}" in result.stdout
    assert DEVICE_KEY not in result.stdout + result.stderr
    assert GROUP_KEY not in result.stdout + result.stderr
    assert 'payload="{\\"site\\": \\"plant-7\\"}"' in dps.log()


def test_provision_existing_file_needs_force(base: Path, certs: Path, dps: DpsStack) -> None:
    config = write_config(base, certs, dps.port)
    (base / "connection-string.txt").write_text("HostName=old;DeviceId=d;SharedAccessKey=eA==\n")

    result = run_cli("provision", "--config", str(config))

    assert result.returncode == 1
    assert "--force" in result.stderr
    assert dps.requests() == []


def test_provision_wrong_group_key_rejected(base: Path, certs: Path, dps: DpsStack) -> None:
    config = write_config(base, certs, dps.port)
    (base / "group.key").write_text(base64.b64encode(b"another-group-key").decode() + "\n")

    result = run_cli("provision", "--config", str(config))

    assert result.returncode == 1
    assert "rejected the connection" in result.stderr
    assert "signature matches no key" in dps.log()
    assert not (base / "connection-string.txt").exists()


def test_provisioning_disabled_alert_without_busy_loop(base: Path, certs: Path,
                                                      dps: DpsStack) -> None:
    dps.set_faults(disabled=True)
    config = write_config(base, certs, dps.port)
    log_file = base / "provisioning.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "processes.provisioning", "--config", str(config)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: open_alerts(base), 20, "the provisioning alert")
        alert = open_alerts(base)[0]
        assert alert["name"] == "provisioning"
        assert "disabled" in alert["detail"]

        # Backoff from 0.5 s doubling to 2 s allows about 6 attempts of 2 requests in 8 s.
        # A retry without backoff would send hundreds.
        before = len(dps.requests())
        time.sleep(8)
        sent = len(dps.requests()) - before
        assert 2 <= sent <= 20
        assert process.poll() is None
        assert not (base / "connection-string.txt").exists()
        assert "provisioning_failed" in log_file.read_text()
    finally:
        process.terminate()
        process.wait(timeout=15)
    assert process.returncode == 0




@pytest.mark.parametrize(("text", "expected"), [
    ('registration_id = "gw 7"', "provisioning.registration_id: 'gw 7'"),
    ('registration_id = "gw-7"\ndevice_key_file = "k"', "exactly one of"),
    ('registration_id_from = "plc_serial"', "needs [plc.identity]"),
    ('registration_id_from = "nfc"', "provisioning.registration_id_from"),
    ('registration_id = "gw-7"\nretry_min_s = 10.0\nretry_max_s = 1.0', "retry_max_s"),
    ('registration_id = "gw-7"\nurl = "x"', "unknown key provisioning.url"),
])
def test_provisioning_config_invalid(base: Path, certs: Path, text: str,
                                     expected: str) -> None:
    config = base / "plcbridge.toml"
    config.write_text(write_config(base, certs, 1).read_text().replace(
        f'registration_id = "{REGISTRATION_ID}"', text).replace(
        'retry_min_s = 0.5\nretry_max_s = 2.0\n', ""))
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert expected in str(caught.value)


def test_provisioning_config_payload(base: Path, certs: Path) -> None:
    config = load_config(write_config(base, certs, 1))
    assert config.provisioning is not None
    assert config.provisioning.payload_json == '{"site": "plant-7"}'
    assert config.provisioning.registration_id == REGISTRATION_ID


def test_check_config_before_first_boot(base: Path, certs: Path) -> None:
    config = write_config(base, certs, 8883)

    result = run_cli("check-config", "--config", str(config))

    assert result.returncode == 0, result.stderr
    assert "does not exist yet and is written at the first boot" in result.stdout
    assert GROUP_KEY not in result.stdout


def test_check_config_bad_group_key_file(base: Path, certs: Path) -> None:
    config = write_config(base, certs, 8883)
    (base / "group.key").write_text("not*base64\n")

    result = run_cli("check-config", "--config", str(config))

    assert result.returncode == 2
    assert "not base64" in result.stderr


def test_registration_id_from_plc_serial(base: Path, certs: Path) -> None:
    config = load_config(write_config(base, certs, 1))
    settings = dataclasses.replace(config.provisioning, registration_id=None,
                                   registration_id_from="plc_serial",
                                   registration_id_prefix="plant7-")
    with pytest.raises(NotReadyError):
        registration_id(config, settings)

    (base / "state").mkdir(exist_ok=True)
    (base / "state" / "plc-identity.json").write_text('{"plc_id": "22091017"}\n')
    assert registration_id(config, settings) == "plant7-22091017"


def test_registration_id_from_mac(base: Path, certs: Path) -> None:
    interfaces = [path for path in Path("/sys/class/net").iterdir()
                  if path.name != "lo" and (path / "address").read_text().strip("0:\n")]
    if not interfaces:
        pytest.skip("no network interface with a MAC address")
    interface = sorted(interfaces)[0]
    config = load_config(write_config(base, certs, 1))
    settings = dataclasses.replace(config.provisioning, registration_id=None,
                                   registration_id_from="mac", mac_interface=interface.name)

    expected = (interface / "address").read_text().strip().lower().replace(":", "-")
    assert registration_id(config, settings) == expected


def test_provision_x509_thumbprint(base: Path, certs: Path) -> None:
    cert, key = make_client_cert(base / "device", certs / "ca.pem", certs / "ca.key", "meter-7")
    thumbprint = hashlib.sha1(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
    enrollments = enrollments_toml(individual={"meter-7": {
        "primary_thumbprint": thumbprint, "assigned_hub": "localhost", "device_id": "m7"}})
    with DpsStack(certs, base / "dps", enrollments, client_ca_file=certs / "ca.pem") as dps:
        config = base / "plcbridge.toml"
        config.write_text(
            gateway_config(base, 1, 1, certs / "ca.pem")
            + f'client_cert_file = "{cert}"\nclient_key_file = "{key}"\n'
            + f'\n[provisioning]\nid_scope = "{ID_SCOPE}"\nglobal_endpoint = "localhost"\n'
            + f'port = {dps.port}\nattestation = "x509"\nregistration_id = "meter-7"\n')

        result = run_cli("provision", "--config", str(config))

        assert result.returncode == 0, result.stderr
        assert "x509 thumbprint" in dps.log()
    assert (base / "connection-string.txt").read_text() == (
        "HostName=localhost;DeviceId=m7;x509=true\n")
