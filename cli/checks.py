"""`plcbridge check-config` and `check-credentials`: validate and summarize, printing no secret."""

from __future__ import annotations

import argparse
from collections import Counter

from common.config import Config, load_config
from common.credential_files import CredentialSet, check_sas_expiry, validate_credential_files

EXIT_OK = 0
EXIT_EXPIRED = 3


def check_config(args: argparse.Namespace) -> int:
    """Validate the configuration and its credential files and print a summary."""
    config = load_config(args.config)
    credentials = validate_credential_files(config.credentials)
    expiry = check_sas_expiry(credentials.connection, config.credentials, config.uplink)

    print(f"configuration {config.path} is valid")
    for line in _summary_lines(config, credentials):
        print(f"  {line}")
    print(f"  SAS expiry: {expiry.state}: {expiry.message}")
    return EXIT_OK


def check_credentials(args: argparse.Namespace) -> int:
    """Print the credential scheme and the SAS expiry state, and return 3 when it has expired."""
    config = load_config(args.config)
    credentials = validate_credential_files(config.credentials)
    expiry = check_sas_expiry(credentials.connection, config.credentials, config.uplink)

    print(f"scheme: {_scheme(config, credentials)}")
    print(f"SAS expiry: {expiry.state}")
    print(f"  {expiry.message}")
    if credentials.client_certificate is not None:
        certificate = credentials.client_certificate
        print(f"client certificate: {certificate.subject}, "
              f"valid until {certificate.not_after:%Y-%m-%dT%H:%M:%SZ}")
    return EXIT_EXPIRED if expiry.state == "expired" else EXIT_OK


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
    if credentials.connection is not None:
        return credentials.connection.scheme
    if credentials.client_certificate is not None:
        return "client certificate"
    if config.credentials.password_file is not None:
        username = config.uplink.broker.username if config.uplink.broker else ""
        return f"username {username!r} and password file {config.credentials.password_file}"
    return "none (server authentication only)"
