"""load_config: every error names the file, the key and the value; paths are resolved."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.config import load_config
from common.errors import ConfigError

MINIMAL = """
[gateway]
runtime_dir = "run"

[plc]
host = "127.0.0.1"

[[plc.tag_groups]]
name = "fast"
poll_interval_ms = 100

[[plc.tags]]
name = "line1.counter"
group = "fast"
table = "holding_register"
address = 0
type = "uint32"

[uplink]
mode = "azure"

[credentials]
connection_string_file = "connection-string.txt"
ca_file = "ca.pem"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plcbridge.toml"
    path.write_text(text)
    return path


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def test_config_minimal_gets_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))

    assert config.plc.port == 502
    assert config.plc.tags[0].register_count == 2
    assert config.uplink.port == 8883
    assert config.uplink.broker is None
    assert config.credentials.check_interval_s == 1.0
    assert config.credentials.rehash_interval_s == 60.0
    assert config.supervisor.group == "plcbridge"
    assert config.supervisor.uplink_program == "uplink"
    assert config.gateway.log_level == "INFO"


def test_config_relative_paths_resolved_against_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()

    config = load_config(write(folder, MINIMAL))

    assert config.path == folder / "plcbridge.toml"
    assert config.credentials.ca_file == folder / "ca.pem"
    assert config.credentials.connection_string_file == folder / "connection-string.txt"
    assert config.gateway.runtime_dir == folder / "run"
    assert config.gateway.state_dir == folder / "var" / "state"
    assert config.supervisor_socket == folder / "run" / "supervisord.sock"


def test_config_absolute_and_parent_paths(tmp_path: Path) -> None:
    text = replace_once(MINIMAL, 'ca_file = "ca.pem"', 'ca_file = "/etc/ssl/ca.pem"')
    text = replace_once(text, '"connection-string.txt"', '"../secrets/cs.txt"')

    config = load_config(write(tmp_path, text))

    assert config.credentials.ca_file == Path("/etc/ssl/ca.pem")
    assert config.credentials.connection_string_file == tmp_path.parent / "secrets" / "cs.txt"


def test_config_watched_files_in_fixed_order(tmp_path: Path) -> None:
    text = MINIMAL + 'client_cert_file = "c.pem"\nclient_key_file = "k.pem"\n'
    text += 'password_file = "p.txt"\n'

    config = load_config(write(tmp_path, text))

    names = [path.name for path in config.credentials.watched_files()]
    assert names == ["connection-string.txt", "ca.pem", "c.pem", "k.pem", "p.txt"]


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.plc.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "colour = 'red'\n", "unknown key credentials.colour"),
        (MINIMAL + "[extra]\n", "unknown key extra"),
        (replace_once(MINIMAL, 'host = "127.0.0.1"', 'host = "127.0.0.1"\nhots = "x"'),
         "unknown key plc.hots"),
        (replace_once(MINIMAL, 'type = "uint32"', 'type = "uint32"\nscaling = 2'),
         "unknown key plc.tags[0].scaling"),
    ],
)
def test_config_unknown_key_named(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)

    message = config_error(path)

    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "docs/configuration.md" in message


@pytest.mark.parametrize(
    ("addition", "expected"),
    [
        ("check_interval_s = 'fast'", "credentials.check_interval_s: 'fast'; expected a number"),
        ("check_interval_s = true", "credentials.check_interval_s: True; expected a number"),
        ("sas_warning_days = [1]", "credentials.sas_warning_days: [1]; expected a number"),
        ("password_file = 5", "credentials.password_file: 5; expected a non-empty string"),
        ("password_file = ''", "credentials.password_file: ''; expected a non-empty string"),
    ],
)
def test_config_wrong_type_named(tmp_path: Path, addition: str, expected: str) -> None:
    path = write(tmp_path, MINIMAL + addition + "\n")

    message = config_error(path)

    assert message.startswith(f"{path}: invalid value for ")
    assert expected in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('host = "127.0.0.1"', 'host = "127.0.0.1"\nport = 70000',
         "plc.port: 70000; expected an integer from 1 to 65535"),
        ('host = "127.0.0.1"', 'host = "127.0.0.1"\nport = 502.0',
         "plc.port: 502.0; expected an integer from 1 to 65535"),
        ('mode = "azure"', 'mode = "amqp"', "uplink.mode: 'amqp'; expected one of azure, mqtt"),
        ('type = "uint32"', 'type = "uint32"\nword_order = "middle"',
         "plc.tags[0].word_order: 'middle'; expected one of big, little"),
        ('ca_file = "ca.pem"', 'ca_file = "ca.pem"\ncheck_interval_s = 0.0',
         "credentials.check_interval_s: 0.0; expected a number from 0.05 to 3600"),
        ('ca_file = "ca.pem"', 'ca_file = "ca.pem"\nsas_warning_days = nan',
         "credentials.sas_warning_days: nan"),
        ('runtime_dir = "run"', 'runtime_dir = "run"\nlog_level = "info"',
         "gateway.log_level: 'info'; expected one of DEBUG, INFO, WARNING, ERROR"),
        ('address = 0', 'address = 65535',
         "plc.tags[0].address: 65535; expected an address whose last register is 65535"),
        ('table = "holding_register"\naddress = 0\ntype = "uint32"',
         'table = "coil"\naddress = 0\ntype = "uint32"',
         "plc.tags[0].type: 'uint32'; expected bool, because a coil holds one bit"),
        ('host = "127.0.0.1"', 'host = "127.0.0.1"\nreconnect_min_s = 5.0\nreconnect_max_s = 1.0',
         "plc.reconnect_max_s: 1.0; expected a value not below plc.reconnect_min_s"),
    ],
)
def test_config_bad_value_named(tmp_path: Path, old: str, new: str, expected: str) -> None:
    path = write(tmp_path, replace_once(MINIMAL, old, new))

    message = config_error(path)

    assert message.startswith(f"{path}: invalid value for ")
    assert expected in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('host = "127.0.0.1"', "", "missing key plc.host"),
        ('ca_file = "ca.pem"', "", "missing key credentials.ca_file"),
        ('connection_string_file = "connection-string.txt"', "",
         "missing key credentials.connection_string_file; azure mode needs"),
        ("[uplink]\nmode = \"azure\"", "", "missing table [uplink]"),
        ('group = "fast"', 'group = "slow"',
         "plc.tags[0].group: 'slow'; expected one of the tag group names fast"),
    ],
)
def test_config_missing_or_dangling_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    path = write(tmp_path, replace_once(MINIMAL, old, new))

    assert expected in config_error(path)


def test_config_duplicate_tag_rejected(tmp_path: Path) -> None:
    tag = MINIMAL[MINIMAL.index("[[plc.tags]]"):MINIMAL.index("[uplink]")]
    path = write(tmp_path, replace_once(MINIMAL, tag, tag + tag))

    assert "duplicate tag name 'line1.counter'" in config_error(path)


def test_config_cert_without_key_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + 'client_cert_file = "c.pem"\n')

    assert "client_cert_file and credentials.client_key_file must be set together" in (
        config_error(path)
    )


def test_config_long_runtime_dir_rejected(tmp_path: Path) -> None:
    long_dir = "/tmp/" + "r" * 90
    text = replace_once(MINIMAL, 'runtime_dir = "run"', f'runtime_dir = "{long_dir}"')
    path = write(tmp_path, text)

    assert f"gateway.runtime_dir: '{long_dir}'; expected a path of at most 80" in config_error(path)


def test_config_mqtt_mode_reads_broker(tmp_path: Path) -> None:
    text = replace_once(MINIMAL, 'mode = "azure"', 'mode = "mqtt"\n[uplink.broker]\n'
                        'host = "broker.local"\nclient_id = "gw1"\n')
    text = replace_once(text, 'connection_string_file = "connection-string.txt"\n', "")

    config = load_config(write(tmp_path, text))

    assert config.uplink.broker is not None
    assert config.uplink.broker.host == "broker.local"
    assert config.uplink.broker.topic_template == "plcbridge/{client_id}/pages"
    assert config.credentials.connection_string_file is None


def test_config_bad_topic_placeholder_rejected(tmp_path: Path) -> None:
    text = replace_once(MINIMAL, 'mode = "azure"', 'mode = "mqtt"\n[uplink.broker]\n'
                        'host = "b"\nclient_id = "gw1"\ntopic_template = "t/{device}"\n')
    path = write(tmp_path, text)

    assert "uplink.broker.topic_template: 't/{device}'" in config_error(path)


def test_config_broker_in_azure_mode_rejected(tmp_path: Path) -> None:
    text = replace_once(MINIMAL, 'mode = "azure"', 'mode = "azure"\n[uplink.broker]\nhost = "b"\n')
    path = write(tmp_path, text)

    assert "uplink.broker" in config_error(path)
    assert "no [uplink.broker] table in azure mode" in config_error(path)


def test_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    assert config_error(path) == f"{path}: configuration file not found"


def test_config_folder_instead_of_file(tmp_path: Path) -> None:
    assert config_error(tmp_path) == f"{tmp_path}: is a folder; expected a TOML file"


def test_config_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "port = \n")

    assert config_error(path).startswith(f"{path}: not valid TOML: ")


def test_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "plcbridge.toml"
    path.write_bytes(MINIMAL.encode() + b"# 20 \xb0C\n")

    message = config_error(path)

    assert message.startswith(f"{path}: not UTF-8 text at byte ")
    assert "save the file as UTF-8" in message
