"""load_config: every error names the file, the key and the value; paths are resolved."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from common.config import load_config
from common.errors import ConfigError
from devstack.gateway_toml import gateway_toml, simulator_tags

MINIMAL = gateway_toml(
    gateway={"runtime_dir": "run"},
    tags=simulator_tags("line1.counter"),
    uplink={"mode": "azure"},
    credentials={"connection_string_file": "connection-string.txt", "ca_file": "ca.pem"},
)


COIL_TAG = """
[[plc.tags]]
name = "line1.running"
group = "fast"
table = "coil"
address = 0
"""


def mqtt_config(client_id: str, topic_template: str) -> str:
    """Return MINIMAL in mqtt mode; both values are TOML basic strings, escapes included."""
    text = replace_once(MINIMAL, 'mode = "azure"', 'mode = "mqtt"\n[uplink.broker]\n'
                        f'host = "b"\nclient_id = "{client_id}"\n'
                        f'topic_template = "{topic_template}"\n')
    return replace_once(text, 'connection_string_file = "connection-string.txt"\n', "")


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
    assert config.credentials.check_interval_s == 0.1
    assert config.credentials.settle_s == 0.2
    assert config.credentials.rehash_interval_s == 60.0
    assert config.credentials.fallback_to_last_good is True
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


def test_config_fallback_switch_off(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + "fallback_to_last_good = false\n"))

    assert config.credentials.fallback_to_last_good is False


@pytest.mark.parametrize(
    ("addition", "expected"),
    [
        ("check_interval_s = 'fast'", "credentials.check_interval_s: 'fast'; expected a number"),
        ("check_interval_s = true", "credentials.check_interval_s: True; expected a number"),
        ("sas_warning_days = [1]", "credentials.sas_warning_days: [1]; expected a number"),
        ("password_file = 5", "credentials.password_file: 5; expected a non-empty string"),
        ("password_file = ''", "credentials.password_file: ''; expected a non-empty string"),
        ("fallback_to_last_good = 'no'",
         "credentials.fallback_to_last_good: 'no'; expected true or false"),
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
         "plc.tags[0].type: 'uint32'; expected bool, because a coil contains one bit"),
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
    # 80 bytes plus "/tap-credential_watcher.sock" is 108, one above the Unix limit of 107.
    long_dir = "/tmp/" + "r" * 75
    text = replace_once(MINIMAL, 'runtime_dir = "run"', f'runtime_dir = "{long_dir}"')
    path = write(tmp_path, text)

    message = config_error(path)

    assert f"gateway.runtime_dir: '{long_dir}'; expected a path of at most 79 bytes" in message
    assert "its longest socket, tap-credential_watcher.sock, fits in the 107-byte limit" in (
        message
    )


def test_config_runtime_dir_of_max_length_accepted(tmp_path: Path) -> None:
    # tests/test_tap.py binds a real tap in a folder of this length.
    longest_dir = "/tmp/" + "r" * 74
    text = replace_once(MINIMAL, 'runtime_dir = "run"', f'runtime_dir = "{longest_dir}"')

    config = load_config(write(tmp_path, text))

    assert str(config.gateway.runtime_dir) == longest_dir


def test_config_runtime_dir_limit_counts_bytes(tmp_path: Path) -> None:
    # 40 two-byte characters: 80 bytes in UTF-8, though only 45 characters.
    long_dir = "/tmp/" + "\u00e9" * 40
    text = replace_once(MINIMAL, 'runtime_dir = "run"', f'runtime_dir = "{long_dir}"')

    assert "expected a path of at most 79 bytes" in config_error(write(tmp_path, text))


def test_config_register_tag_wider_than_read_rejected(tmp_path: Path) -> None:
    text = replace_once(MINIMAL, 'host = "127.0.0.1"',
                        'host = "127.0.0.1"\nmax_registers_per_read = 1')
    path = write(tmp_path, text)

    message = config_error(path)

    assert "invalid value for plc.max_registers_per_read: 1; expected at least 2" in message
    assert "plc.tags[0] 'line1.counter' of type uint32 needs 2 registers" in message


def test_config_register_tag_fitting_read_accepted(tmp_path: Path) -> None:
    text = replace_once(MINIMAL, 'host = "127.0.0.1"',
                        'host = "127.0.0.1"\nmax_registers_per_read = 2')
    text += COIL_TAG

    config = load_config(write(tmp_path, text))

    assert config.plc.max_registers_per_read == 2


def test_config_bit_tag_fits_one_register_read(tmp_path: Path) -> None:
    text = replace_once(MINIMAL, 'host = "127.0.0.1"',
                        'host = "127.0.0.1"\nmax_registers_per_read = 1')
    text = replace_once(text, 'type = "uint32"', 'type = "uint16"') + COIL_TAG

    config = load_config(write(tmp_path, text))

    assert [tag.table for tag in config.plc.tags] == ["holding_register", "coil"]


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
    path = write(tmp_path, mqtt_config("gw1", "t/{device}"))

    assert "uplink.broker.topic_template: 't/{device}'" in config_error(path)


@pytest.mark.parametrize(
    ("template", "found"),
    [
        ("a/{client_id.real}", "found {client_id.real}"),
        ("a/{client_id.upper}", "found {client_id.upper}"),
        ("a/{page_seq[0]}", "found {page_seq[0]}"),
        ("a/{page_seq:>99999999999}", "found {page_seq:>99999999999}"),
        ("a/{client_id!r}", "found {client_id!r}"),
        ("a/{page_seq:}/{}", "found {}"),
        ("a/{0}", "found {0}"),
        ("a/{client_id", "expected '}' before end of string"),
        ("a/}", "Single '}' encountered"),
    ],
)
def test_config_topic_template_field_rejected(tmp_path: Path, template: str, found: str) -> None:
    path = write(tmp_path, mqtt_config("gw1", template))

    message = config_error(path)

    assert message.startswith(f"{path}: invalid value for uplink.broker.topic_template: ")
    assert repr(template) in message
    assert "only placeholders are the bare {client_id} and {page_seq}" in message
    assert found in message


@pytest.mark.parametrize(
    ("template", "found"),
    [
        ("plcbridge/#/{page_seq}", "it contains '#'"),
        ("plcbridge/+/{client_id}", "it contains '+'"),
        ("plcbridge/\\u0000/{client_id}", "it contains '\\x00'"),
        ("t/{client_id}/" + "x" * 65_535, "it is 65541 bytes in UTF-8, above the MQTT limit"),
        ("t/" + "\u00e9" * 32_760 + "/{page_seq}", "it is 65543 bytes in UTF-8"),
    ],
)
def test_config_topic_template_invalid_topic(tmp_path: Path, template: str, found: str) -> None:
    path = write(tmp_path, mqtt_config("gw1", template))

    message = config_error(path)

    assert "invalid value for uplink.broker.topic_template: " in message
    assert "expected a valid MQTT topic name when filled in with client_id 'gw1' and page_seq " \
        "18446744073709551615, but " in message
    assert found in message
    assert len(message) < 1000


@pytest.mark.parametrize(
    ("client_id", "found"),
    [("line+1", "'+'"), ("line#1", "'#'"), ("a+b#c", "'+' and '#'"), ("gw\\u0000", "'\\x00'")],
)
def test_config_client_id_wildcard_rejected(tmp_path: Path, client_id: str, found: str) -> None:
    path = write(tmp_path, mqtt_config(client_id, "plcbridge/pages"))

    message = config_error(path)

    assert "invalid value for uplink.broker.client_id: " in message
    assert f"expected a client id that can be part of an MQTT topic, but it contains {found}" in (
        message
    )


def test_config_topic_of_max_length_accepted(tmp_path: Path) -> None:
    # 2 bytes of "t/", 20 digits of the largest page_seq, and the rest up to 65535.
    template = "t/{page_seq}" + "x" * (65_535 - 22)

    config = load_config(write(tmp_path, mqtt_config("gw1", template)))

    assert config.uplink.broker is not None
    assert config.uplink.broker.topic_template == template


def test_config_topic_template_literal_braces(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, mqtt_config("gw1", "a/{{x}}/{client_id}/{page_seq}")))

    assert config.uplink.broker is not None
    assert config.uplink.broker.topic_template == "a/{{x}}/{client_id}/{page_seq}"


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


def test_config_byte_order_mark_accepted(tmp_path: Path) -> None:
    path = tmp_path / "plcbridge.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())

    config = load_config(path)

    assert config.plc.host == "127.0.0.1"
    assert config.source_text == MINIMAL


def test_config_not_utf8_after_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "plcbridge.toml"
    path.write_bytes(b"\xef\xbb\xbf# \xb0C\n")

    assert config_error(path) == (
        f"{path}: not UTF-8 text at byte 5; save the file as UTF-8"
    )


def test_config_symlink_loop(tmp_path: Path) -> None:
    loop = tmp_path / "loop.toml"
    (tmp_path / "other.toml").symlink_to(loop)
    loop.symlink_to(tmp_path / "other.toml")

    assert config_error(loop) == (
        f"{loop}: cannot read the configuration file: Too many levels of symbolic links; "
        "check the path given with --config"
    )


def test_config_name_too_long(tmp_path: Path) -> None:
    path = tmp_path / ("c" * 300 + ".toml")

    assert config_error(path).endswith(
        ": cannot read the configuration file: File name too long; "
        "check the path given with --config"
    )


def test_config_unreadable_device_file() -> None:
    # Reading /proc/self/mem at offset 0 fails with EIO: the address is not mapped.
    message = config_error(Path("/proc/self/mem"))

    assert message.endswith(": cannot read the configuration file: Input/output error; "
                            "check the path given with --config")


def test_config_endless_device_file() -> None:
    message = config_error(Path("/dev/zero"))

    assert message == "/dev/zero: larger than 16777216 bytes; expected a TOML configuration file"


def test_config_path_key_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "ca-a.pem").symlink_to(tmp_path / "ca-b.pem")
    (tmp_path / "ca-b.pem").symlink_to(tmp_path / "ca-a.pem")
    path = write(tmp_path, replace_once(MINIMAL, '"ca.pem"', '"ca-a.pem"'))

    message = config_error(path)

    assert message.startswith(f"{path}: invalid value for credentials.ca_file: 'ca-a.pem'; ")
    assert "expected a path that can be resolved" in message


def test_config_deep_nesting_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "x = " + "[" * 2000 + "]" * 2000 + "\n")

    assert config_error(path) == (
        f"{path}: not valid TOML: arrays or inline tables nested too deeply"
    )


def test_config_long_value_shortened_in_message(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "password_file = " + "[" * 400 + "]" * 400 + "\n")

    message = config_error(path)

    assert "invalid value for credentials.password_file: [[[[" in message
    assert "... (800 characters); expected a non-empty string" in message


def test_config_text_parsed_as_if_at_path(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "plcbridge.toml"  # never written: the text replaces its content
    text = replace_once(MINIMAL, 'host = "127.0.0.1"', 'host = "10.0.0.9"')

    config = load_config(path, text=text)

    assert config.path == path
    assert config.plc.host == "10.0.0.9"
    assert config.credentials.ca_file == folder / "ca.pem"
    assert config.source_text == text


def test_config_text_errors_name_path(tmp_path: Path) -> None:
    path = tmp_path / "plcbridge.toml"

    with pytest.raises(ConfigError) as caught:
        load_config(path, text=MINIMAL + "colour = 'red'\n")

    assert str(caught.value).startswith(f"{path}: unknown key credentials.colour")
    assert not os.path.exists(path)


def command_config(extra: str) -> str:
    """Return the mqtt-mode configuration with more [uplink.broker] keys."""
    text = mqtt_config("gw1", "p/{client_id}")
    return replace_once(text, 'topic_template = "p/{client_id}"\n',
                        f'topic_template = "p/{{client_id}}"\n{extra}\n')


def test_config_command_and_event_topics(tmp_path: Path) -> None:
    path = write(tmp_path, command_config(
        'command_topic = "cmd/{client_id}/#"\nevent_topic = "ev/{client_id}/{kind}"'))

    broker = load_config(path).uplink.broker

    assert broker is not None
    assert broker.command_topic == "cmd/{client_id}/#"
    assert broker.event_topic == "ev/{client_id}/{kind}"


def test_config_command_topics_default_none(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, command_config("")))

    assert config.uplink.broker is not None
    assert config.uplink.broker.command_topic is None
    assert config.uplink.broker.event_topic is None
    assert config.uplink.write_timeout_s == 10.0


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('command_topic = "cmd"', "uplink.broker.event_topic: None; expected a topic when "
         "command_topic is set"),
        ('command_topic = "cmd/#/x"\nevent_topic = "ev"', "# must be a whole level, and the "
         "last one"),
        ('command_topic = "cmd/a+"\nevent_topic = "ev"', "+ must be a whole level"),
        ('command_topic = "cmd/{kind}"\nevent_topic = "ev"', "found {kind}"),
        ('command_topic = ""\nevent_topic = "ev"', "expected a non-empty string"),
        ('event_topic = "ev/+/{kind}"', "it contains '+'"),
        ('event_topic = "ev/{page_seq}"', "only placeholders are the bare {client_id} and "
         "{kind}"),
        ('event_topic = "ev/{kind!r}"', "found {kind!r}"),
        ('command_topic = "ev/#"\nevent_topic = "ev/{client_id}/{kind}"',
         "does not match the uplink's own topic 'ev/gw1/alert'"),
        ('command_topic = "p/+"\nevent_topic = "ev/{kind}"',
         "does not match the uplink's own topic 'p/gw1'"),
        ('command_topic = "#"\nevent_topic = "ev/{kind}"', "does not match the uplink's own"),
    ],
)
def test_config_command_topic_invalid(tmp_path: Path, extra: str, expected: str) -> None:
    assert expected in config_error(write(tmp_path, command_config(extra)))
