"""[credentials.token_server]: parsed into TokenServerSettings, with each misuse rejected."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from common.config import Config, load_config
from common.credential_files import validate_credential_files
from common.credentials import CredentialFileError
from common.errors import ConfigError
from devstack.dev_certs import ensure_dev_certs
from devstack.gateway_toml import gateway_toml, simulator_tags, toml_table
from tests.support.token_server import write_private

CERTIFICATE = {"client_cert_file": "gw.pem", "client_key_file": "gw.key"}
CHALLENGE = {"serial": "GW-SN-0042", "secret_file": "token.secret"}


def config_text(token_server: dict[str, object] | None, mode: str = "azure",
                connection_string: bool = False) -> str:
    credentials: dict[str, object] = {"ca_file": "ca.pem"}
    if connection_string:
        credentials["connection_string_file"] = "connection-string.txt"
    text = gateway_toml(
        gateway={"runtime_dir": "run"},
        tags=simulator_tags("line1.counter"),
        uplink={"mode": mode},
        broker={"host": "b", "client_id": "c"} if mode == "mqtt" else None,
        credentials=credentials,
    )
    if token_server is None:
        return text
    settings = {"url": "https://tokens.plant.local:8443", "ca_file": "site-ca.pem",
                "hub_host_name": "hub.azure-devices.net", "device_id": "gw-01",
                **token_server}
    return text + "\n" + toml_table("credentials.token_server", settings)


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "plcbridge.toml"
    path.write_text(text)
    return load_config(path)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    return str(caught.value)


def test_token_config_certificate_parsed(tmp_path: Path) -> None:
    config = load(tmp_path, config_text(CERTIFICATE))
    settings = config.credentials.token_server

    assert settings is not None
    assert (settings.host, settings.port) == ("tokens.plant.local", 8443)
    assert settings.client_cert_file == tmp_path / "gw.pem"
    assert settings.secret_file is None
    assert settings.timeout_s == 10.0
    assert tmp_path / "site-ca.pem" in config.credentials.watched_files()
    assert tmp_path / "gw.key" in config.credentials.watched_files()


def test_token_config_challenge_default_port(tmp_path: Path) -> None:
    text = config_text({**CHALLENGE, "url": "https://tokens.plant.local"})
    settings = load(tmp_path, text).credentials.token_server

    assert settings is not None
    assert settings.port == 443
    assert settings.serial == "GW-SN-0042"
    assert settings.secret_file == tmp_path / "token.secret"


@pytest.mark.parametrize(
    ("token_server", "options", "message"),
    [
        ({**CERTIFICATE, **CHALLENGE}, {}, "set either client_cert_file and client_key_file "
         "(client certificate) or serial and secret_file (challenge), not both"),
        ({}, {}, "found neither"),
        ({"client_cert_file": "gw.pem"}, {}, "client_cert_file and client_key_file must be set "
         "together"),
        ({"serial": "GW-SN-0042"}, {}, "serial and secret_file must be set together"),
        ({**CERTIFICATE, "url": "http://tokens.plant.local"}, {},
         "invalid value for credentials.token_server.url: 'http://tokens.plant.local'; "
         "expected an https:// URL"),
        ({**CERTIFICATE, "url": "https://tokens.plant.local/v1"}, {}, "expected an https:// URL"),
        ({**CERTIFICATE, "urls": "x"}, {}, "unknown key credentials.token_server.urls"),
        ({**CERTIFICATE, "device_id": "gw/01"}, {},
         "invalid value for credentials.token_server.device_id: 'gw/01'; expected an IoT Hub "
         "device id"),
        (CERTIFICATE, {"connection_string": True},
         "credentials.connection_string_file and [credentials.token_server] are both set"),
        (CERTIFICATE, {"mode": "mqtt"}, '[credentials.token_server] needs uplink.mode = "azure"'),
    ],
)
def test_token_config_misuse_rejected(
    tmp_path: Path, token_server: dict[str, object], options: dict[str, Any], message: str
) -> None:
    text = config_text(token_server, **options)

    assert message in error(tmp_path, text)


def test_token_config_azure_needs_some_source(tmp_path: Path) -> None:
    message = error(tmp_path, config_text(None))

    assert "missing key credentials.connection_string_file" in message
    assert "or a [credentials.token_server] table" in message


def test_token_config_short_secret_invalid(tmp_path: Path) -> None:
    config = load(tmp_path, config_text(CHALLENGE))
    write_private(tmp_path / "token.secret", base64.b64encode(b"too short").decode())
    ensure_dev_certs(tmp_path / "certs")
    (tmp_path / "site-ca.pem").write_bytes((tmp_path / "certs" / "ca.pem").read_bytes())
    (tmp_path / "ca.pem").write_bytes((tmp_path / "certs" / "ca.pem").read_bytes())

    with pytest.raises(CredentialFileError) as caught:
        validate_credential_files(config.credentials)

    assert caught.value.path == tmp_path / "token.secret"
    assert "challenge secret is 9 bytes long; expected at least 32 bytes" in caught.value.reason
