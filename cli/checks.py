"""`plcbridge check-config` and `check-credentials`: validate and summarize, printing no secret."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from common.clock import LOCAL_FLOOR_SOURCE, TimeFloor
from common.config import Config, load_config
from common.credential_files import (
    CredentialSet,
    check_certificate_validity,
    check_sas_expiry,
    validate_credential_files,
)
from common.credentials import EXPIRED, NOT_YET_VALID, redact_token
from common.dps_keys import decode_key, read_key_file

EXIT_OK = 0
EXIT_EXPIRED = 3


def check_config(args: argparse.Namespace) -> int:
    """Validate the configuration and its credential files and print a summary."""
    config = load_config(args.config)
    path = config.credentials.connection_string_file
    if config.provisioning is not None and path is not None and not path.exists():
        return _check_unprovisioned(config, path)
    credentials = validate_credential_files(config.credentials)
    expiry = check_sas_expiry(credentials.connection, config.credentials, config.uplink)

    print(f"configuration {config.path} is valid")
    for line in _summary_lines(config, credentials):
        print(f"  {line}")
    print(f"  SAS expiry: {expiry.state}: {expiry.message}")
    return EXIT_OK


def _check_unprovisioned(config: Config, path: Path) -> int:
    """Validate a first-boot configuration, whose connection string DPS has not written yet."""
    others = dataclasses.replace(config.credentials, connection_string_file=None)
    credentials = validate_credential_files(others)
    settings = config.provisioning
    assert settings is not None
    key_file = settings.group_key_file or settings.device_key_file
    if key_file is not None:
        decode_key(read_key_file(key_file), f"key in {key_file}")

    print(f"configuration {config.path} is valid")
    for line in _summary_lines(config, credentials):
        print(f"  {line}")
    print(f"  provisioning: DPS {settings.global_endpoint}:{settings.port}, id scope "
          f"{settings.id_scope}, registration id from {settings.registration_id_from}; "
          f"{path} does not exist yet and is written at the first boot")
    return EXIT_OK


def check_credentials(args: argparse.Namespace) -> int:
    """Validate every credential file and print what they hold, with secrets redacted.

    Returns 3 when a SAS token or the client certificate has expired or is not valid yet.
    It also returns 3 when the clock is behind the stored lower bound on the real time, if
    that bound came from the hub's Date header or the release time. A bound saved from the
    local clock at the last connection only gets a note, because that clock may have run
    ahead.
    """
    config = load_config(args.config)
    credentials = validate_credential_files(config.credentials)
    expiry = check_sas_expiry(credentials.connection, config.credentials, config.uplink)
    problems = []

    connection = credentials.connection
    if connection is not None:
        print(f"device id: {connection.device_id}")
        if connection.module_id:
            print(f"module id: {connection.module_id}")
        print(f"host: {connection.host_name}")
        if connection.gateway_host_name:
            print(f"gateway host: {connection.gateway_host_name}")
    print(f"scheme: {_scheme(config, credentials)}")
    if connection is not None and connection.token is not None:
        print(f"SAS token: {redact_token(connection.token.text)}")
    print(f"SAS expiry: {expiry.state}")
    print(f"  {expiry.message}")
    if expiry.state == "expired":
        problems.append("SAS token expired")

    certificate = credentials.client_certificate
    if certificate is not None:
        validity = check_certificate_validity(certificate, config.credentials)
        print(f"client certificate: {certificate.subject}: {validity.state}")
        print(f"  {validity.message}")
        if validity.state in (EXPIRED, NOT_YET_VALID):
            problems.append(f"client certificate {validity.state.replace('_', ' ')}")
    print(f"CA file: {config.credentials.ca_file} "
          f"(certificates: {credentials.ca_certificate_count})")

    clock = TimeFloor(config.gateway.state_dir, _quiet_logger()).check(time.time())
    print(f"clock: {'behind' if clock.behind else 'ok'}: {clock.describe()}")
    if clock.behind and clock.floor_source == LOCAL_FLOOR_SOURCE:
        # That floor came from this gateway's own clock, which may have run ahead then. The
        # uplink lowers it when the hub's Date header is earlier, so this is no proof yet.
        print("  clock behind the stored floor; the hub's time will confirm: the floor was "
              "saved from the local clock at the last connection")
    elif clock.behind:
        problems.append("clock behind")

    if problems:
        print(f"problems: {', '.join(problems)}")
        return EXIT_EXPIRED
    return EXIT_OK


def _quiet_logger() -> logging.Logger:
    # The command prints its findings; TimeFloor's warnings about its file go to stderr.
    logger = logging.getLogger("plcbridge.check_credentials")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler(sys.stderr))
        logger.propagate = False
    return logger


def _summary_lines(config: Config, credentials: CredentialSet) -> list[str]:
    plc = config.plc
    tags_per_group = Counter(tag.group for tag in plc.tags)
    groups = ", ".join(
        f"{group.name} ({group.poll_interval_ms} ms, {tags_per_group[group.name]} tags)"
        for group in plc.tag_groups
    )
    lines = [
        f"plc: {plc.host}:{plc.port} unit {plc.unit_id}",
        f"tags: {len(plc.tags)} in {len(plc.tag_groups)} groups: {groups}",
        f"uplink: {_uplink(config, credentials)}",
        f"credentials: {_scheme(config, credentials)}; CA file {config.credentials.ca_file} "
        f"(certificates: {credentials.ca_certificate_count})",
    ]
    if credentials.client_certificate is not None:
        certificate = credentials.client_certificate
        lines.append(f"client certificate: {certificate.subject}, "
                     f"valid until {certificate.not_after:%Y-%m-%dT%H:%M:%SZ}")
    gateway = config.gateway
    lines.append(f"folders: state {gateway.state_dir}, runtime {gateway.runtime_dir}, "
                 f"log {gateway.log_dir}")
    return lines


def _uplink(config: Config, credentials: CredentialSet) -> str:
    uplink = config.uplink
    broker = uplink.broker
    if broker is not None:
        tls = "TLS" if broker.tls else "no TLS"
        return (f"mqtt, {broker.host}:{uplink.port} ({tls}), client id {broker.client_id}, "
                f"topic {broker.topic_template}")
    connection = credentials.connection
    if connection is None:
        return f"azure, port {uplink.port}"
    return (f"azure, {connection.connect_host}:{uplink.port}, hub {connection.host_name}, "
            f"client id {connection.client_id}")


def _scheme(config: Config, credentials: CredentialSet) -> str:
    token_server = config.credentials.token_server
    if token_server is not None:
        return (f"SAS tokens from the token server {token_server.url} for device "
                f"{token_server.device_id} on {token_server.hub_host_name}")
    if credentials.connection is not None:
        return credentials.connection.scheme
    if credentials.client_certificate is not None:
        return "client certificate"
    if config.credentials.password_file is not None:
        username = config.uplink.broker.username if config.uplink.broker else ""
        return f"username {username!r} and password file {config.credentials.password_file}"
    return "none (server authentication only)"
