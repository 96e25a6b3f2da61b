"""The provisioning client: gets the gateway's IoT hub and device id from Azure DPS.

At a first boot the configuration has a [provisioning] section and the connection string
file does not exist yet. This program then registers with DPS, retrying with capped,
jittered backoff until it succeeds, and writes the connection string file atomically with
mode 0600. The credential watcher detects the new file and starts the uplink. Meanwhile the
reader and the buffer run, and the buffer keeps every sample for the uplink. A disabled or
failed registration, or attempts that keep failing, raise the provisioning alert.

When the file exists, or the configuration has no [provisioning], the program exits 0 at
once. `plcbridge provision --config FILE [--force]` runs one registration by hand.

Run it with `python -m processes.provisioning --config FILE`.
"""

from __future__ import annotations

import json
import logging
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.alerts import PROVISIONING, AlertBook
from common.atomic_file import write_atomically
from common.backoff import Backoff
from common.config import Config, ProvisioningSettings
from common.credentials import mint_sas_token
from common.dps_keys import (
    check_registration_id,
    decode_key,
    derive_device_key,
    read_key_file,
)
from common.dps_topics import registration_resource
from common.errors import CredentialError, PlcBridgeError
from common.lifecycle import run_process
from common.logs import fields
from processes.dps_client import DISABLED, FAILED, STOPPED, DpsError, Registration, register

PROCESS = "provisioning"
# The reader stores the PLC's serial-number id here (processes/plc_reader/identity.py).
PLC_IDENTITY_FILE = "plc-identity.json"
SYS_CLASS_NET = Path("/sys/class/net")
# Failed attempts in a row that raise the alert when DPS returns no final status, such as
# when it cannot be reached. Disabled and failed registrations raise it at once.
ALERT_AFTER_ATTEMPTS = 3


class NotReadyError(PlcBridgeError):
    """The registration id cannot be built yet, for example before the PLC's id is read."""


@dataclass(frozen=True)
class Provisioned:
    registration_id: str
    assigned_hub: str
    device_id: str
    path: Path
    requests: int


def registration_id(config: Config, settings: ProvisioningSettings) -> str:
    """Build the registration id by the configured rule; raise NotReadyError if not yet known.

    config: registration_id as written. plc_serial: registration_id_prefix followed by the
    PLC's YYMMNNNN id that the reader stored. mac: the prefix followed by the MAC address of
    mac_interface, or of the first interface in name order that has one, in lower-case hex
    pairs joined by '-'.
    """
    if settings.registration_id_from == "config":
        assert settings.registration_id is not None  # the config loader enforces it
        return settings.registration_id
    if settings.registration_id_from == "plc_serial":
        suffix = plc_serial(config)
        if suffix is None:
            raise NotReadyError(f"the PLC's serial-number id is not stored yet in "
                                f"{config.gateway.state_dir / PLC_IDENTITY_FILE}; the reader "
                                "stores it after its first read")
    else:
        suffix = mac_address(settings.mac_interface)
    return check_registration_id(settings.registration_id_prefix + suffix,
                                 f"registration id from {settings.registration_id_from}")


def plc_serial(config: Config) -> str | None:
    """Return the PLC id that the reader stored, or None when it has stored none."""
    path = config.gateway.state_dir / PLC_IDENTITY_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise NotReadyError(f"{path}: cannot read the stored PLC identity: {exc}") from exc
    plc_id = document.get("plc_id") if isinstance(document, dict) else None
    return plc_id if isinstance(plc_id, str) and plc_id else None


def mac_address(interface: str | None) -> str:
    names = [interface] if interface else sorted(
        path.name for path in SYS_CLASS_NET.iterdir() if path.name != "lo")
    for name in names:
        try:
            address = (SYS_CLASS_NET / name / "address").read_text().strip().lower()
        except OSError:
            continue
        if address and address.strip("0:"):
            return address.replace(":", "-")
    where = f"interface {interface}" if interface else f"any interface in {SYS_CLASS_NET}"
    raise NotReadyError(f"no MAC address found for {where}; set provisioning.mac_interface")


def device_key(settings: ProvisioningSettings, registration: str) -> str | None:
    """Return the base64 device key for symmetric-key attestation, None for X.509."""
    if settings.group_key_file is not None:
        group_key = decode_key(read_key_file(settings.group_key_file),
                               f"group key in {settings.group_key_file}")
        return derive_device_key(group_key, registration)
    if settings.device_key_file is not None:
        text = read_key_file(settings.device_key_file)
        decode_key(text, f"device key in {settings.device_key_file}")
        return text
    return None


def tls_context(config: Config) -> ssl.SSLContext:
    """Trust only credentials.ca_file, and present the client certificate when configured."""
    credentials = config.credentials
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(credentials.ca_file))
        if credentials.client_cert_file is not None:
            context.load_cert_chain(str(credentials.client_cert_file),
                                    str(credentials.client_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise CredentialError(f"cannot load the TLS files for DPS (credentials.ca_file "
                              f"{credentials.ca_file}): {exc}") from exc
    return context


def payload(config: Config, settings: ProvisioningSettings) -> Any:
    """Return the custom payload of the register request, or None to send null."""
    document: dict[str, Any] = json.loads(settings.payload_json or "{}")
    if settings.payload_plc_serial:
        document["plcSerialNumber"] = plc_serial(config)
    return document or None


def connection_string(hub: str, device: str, key: str | None) -> str:
    if key is None:
        return f"HostName={hub};DeviceId={device};x509=true"
    return f"HostName={hub};DeviceId={device};SharedAccessKey={key}"


def provision_once(config: Config, logger: logging.Logger,
                   stop: threading.Event) -> Provisioned:
    """Register once and write the connection string file; raise PlcBridgeError on failure."""
    settings = config.provisioning
    path = config.credentials.connection_string_file
    if settings is None or path is None:
        raise PlcBridgeError(f"{config.path}: no [provisioning] section; add one to use DPS")

    registration = registration_id(config, settings)
    key = device_key(settings, registration)
    password = None
    if key is not None:
        expiry_s = int(time.time()) + settings.sas_ttl_s
        password = mint_sas_token(registration_resource(settings.id_scope, registration),
                                  decode_key(key), expiry_s, policy="registration")
    request = Registration(
        id_scope=settings.id_scope, registration_id=registration,
        host=settings.global_endpoint, port=settings.port, api_version=settings.api_version,
        tls_context=tls_context(config), password=password, payload=payload(config, settings),
        timeout_s=settings.request_timeout_s)
    logger.info("provisioning %s", fields(registration_id=registration,
                                          dps=request.endpoint, id_scope=settings.id_scope,
                                          attestation=settings.attestation))
    assignment = register(request, stop, logger)

    text = connection_string(assignment.assigned_hub, assignment.device_id, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, (text + "\n").encode(), mode=0o600)
    except OSError as exc:
        raise PlcBridgeError(
            f"{path}: cannot write the connection string file: {exc.strerror or exc}; check "
            "credentials.connection_string_file"
        ) from exc
    logger.info("provisioned %s", fields(registration_id=registration,
                                         hub=assignment.assigned_hub,
                                         device_id=assignment.device_id, file=path,
                                         requests=assignment.requests))
    return Provisioned(registration, assignment.assigned_hub, assignment.device_id, path,
                       assignment.requests)


def provision_until_done(config: Config, logger: logging.Logger, stop: threading.Event,
                         alerts: AlertBook) -> Provisioned | None:
    """Retry provision_once with capped backoff until it succeeds; None when stopped."""
    settings = config.provisioning
    assert settings is not None
    backoff = Backoff(settings.retry_min_s, settings.retry_max_s)
    failures = 0
    while not stop.is_set():
        try:
            provisioned = provision_once(config, logger, stop)
        except PlcBridgeError as exc:
            if isinstance(exc, DpsError) and exc.outcome == STOPPED:
                return None
            failures += 1
            outcome = exc.outcome if isinstance(exc, DpsError) else type(exc).__name__
            if outcome in (DISABLED, FAILED) or failures >= ALERT_AFTER_ATTEMPTS:
                alerts.raise_alert(PROVISIONING, f"{outcome}: {exc}")
            delay_s = backoff.next_delay_s()
            logger.warning("provisioning_failed %s; the buffer keeps the samples, retrying "
                           "in %.1f s", fields(attempt=failures, outcome=outcome, error=exc),
                           delay_s)
            stop.wait(delay_s)
            continue
        alerts.clear(PROVISIONING)
        return provisioned
    return None


def body(config: Config, logger: logging.Logger, stop: threading.Event) -> None:
    """Provision at a first boot; return at once when there is nothing to do."""
    path = config.credentials.connection_string_file
    if config.provisioning is None or path is None:
        logger.info("provisioning_not_configured")
        return
    if path.exists():
        logger.info("already_provisioned %s", fields(file=path))
        return
    # `plcbridge run` creates the folder; a run by hand may come first.
    config.gateway.runtime_dir.mkdir(parents=True, exist_ok=True)
    # This program has no tap, so alert changes go only to the log and the alerts file.
    alerts = AlertBook(PROCESS, config.gateway.runtime_dir, logger, lambda *_a, **_k: None)
    provision_until_done(config, logger, stop, alerts)


def main() -> int:
    return run_process(PROCESS, body)


if __name__ == "__main__":
    sys.exit(main())
