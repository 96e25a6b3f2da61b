"""Connection strings and SAS tokens: parsing, minting, expiry, and errors that hide secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from common.credentials import (
    MAX_EPOCH_S,
    check_validity,
    describe_expiry,
    format_utc_seconds,
    mint_sas_token,
    parse_connection_string,
    parse_sas_token,
    read_connection_string,
    redact_token,
)
from common.errors import CredentialError

# Base64 of 32 bytes chosen so the text contains '+', '/' and '=' padding.
KEY_BYTES = bytes(range(250, 256)) + b"plcbridge-credentials-test"
KEY_TEXT = base64.b64encode(KEY_BYTES).decode()
HUB = "hub-1.azure-devices.net"


def test_key_text_has_special_characters() -> None:
    assert "+" in KEY_TEXT or "/" in KEY_TEXT
    assert KEY_TEXT.endswith("=")


def test_parse_connection_string_device_key() -> None:
    parsed = parse_connection_string(f"HostName={HUB};DeviceId=gw-1;SharedAccessKey={KEY_TEXT}")

    assert parsed.host_name == HUB
    assert parsed.device_id == "gw-1"
    assert parsed.module_id is None
    assert parsed.shared_access_key == KEY_BYTES
    assert parsed.scheme == "device key"
    assert parsed.client_id == "gw-1"
    assert parsed.resource_uri == f"{HUB}/devices/gw-1"
    assert parsed.connect_host == HUB


def test_parse_connection_string_module_and_gateway() -> None:
    parsed = parse_connection_string(
        f"HostName={HUB};DeviceId=gw-1;ModuleId=uplink;SharedAccessKey={KEY_TEXT};"
        "GatewayHostName=edge.plant.local"
    )

    assert parsed.client_id == "gw-1/uplink"
    assert parsed.resource_uri == f"{HUB}/devices/gw-1/modules/uplink"
    assert parsed.connect_host == "edge.plant.local"
    assert parsed.host_name == HUB


def test_parse_connection_string_token() -> None:
    token = f"SharedAccessSignature se=1800000000&sr={HUB}%2Fdevices%2Fgw-1&sig=abc%2Bdef%3D"
    parsed = parse_connection_string(
        f"HostName={HUB};DeviceId=gw-1;SharedAccessSignature={token}"
    )

    assert parsed.scheme == "SAS token"
    assert parsed.token is not None
    assert parsed.token.text == token
    assert parsed.token.expiry_s == 1800000000
    assert parsed.token.resource == f"{HUB}/devices/gw-1"
    assert parsed.token.policy is None


def test_parse_connection_string_x509() -> None:
    parsed = parse_connection_string(f"HostName={HUB};DeviceId=gw-1;x509=true")

    assert parsed.scheme == "x509"
    assert parsed.shared_access_key is None
    assert parsed.token is None


def test_connection_string_repr_hides_key() -> None:
    parsed = parse_connection_string(f"HostName={HUB};DeviceId=gw-1;SharedAccessKey={KEY_TEXT}")

    assert KEY_TEXT not in repr(parsed)
    assert repr(KEY_BYTES) not in repr(parsed)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"DeviceId=gw;SharedAccessKey={KEY_TEXT}", "missing key 'HostName'"),
        (f"HostName={HUB};SharedAccessKey={KEY_TEXT}", "missing key 'DeviceId'"),
        (f"HostName={HUB};HostName=x;DeviceId=gw;x509=true", "duplicate key 'HostName'"),
        (f"HostName={HUB};DeviceId=gw;Colour=blue;x509=true", "unknown key 'Colour'"),
        (f"hostname={HUB};DeviceId=gw;x509=true", "unknown key 'hostname'"),
        (f"HostName={HUB};DeviceId=gw", "found none"),
        (f"HostName={HUB};DeviceId=gw;SharedAccessKey={KEY_TEXT};x509=true",
         "found SharedAccessKey, x509"),
        (f"HostName={HUB};DeviceId=gw;SharedAccessKey={KEY_TEXT};"
         "SharedAccessSignature=SharedAccessSignature sr=a&sig=b&se=1",
         "found SharedAccessKey, SharedAccessSignature"),
        (f"HostName={HUB};DeviceId=gw;x509=false", "invalid value for x509"),
        (f"HostName={HUB};DeviceId=;x509=true", "invalid part 'DeviceId'"),
        (f"HostName={HUB};DeviceId=gw;SharedAccessKey=not*base64", "not base64"),
    ],
    ids=["no-host", "no-device", "duplicate", "unknown", "wrong-case", "no-scheme",
         "key-and-x509", "key-and-token", "x509-false", "empty-value", "bad-base64"],
)
def test_parse_connection_string_rejects(text: str, expected: str) -> None:
    with pytest.raises(CredentialError, match="connection string: ") as caught:
        parse_connection_string(text)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        # The key pasted without its name: the first '=' of the padding splits it.
        f"HostName={HUB};DeviceId=gw;{KEY_TEXT}",
        # The key pasted without its name and without padding.
        f"HostName={HUB};DeviceId=gw;{KEY_TEXT.rstrip('=')}",
        # A wrong separator glues the key to another part.
        f"HostName={HUB};DeviceId=gw,SharedAccessKey={KEY_TEXT}",
    ],
    ids=["bare-key", "bare-key-unpadded", "comma"],
)
def test_parse_connection_string_error_hides_key(text: str) -> None:
    with pytest.raises(CredentialError) as caught:
        parse_connection_string(text)
    message = str(caught.value)
    assert KEY_TEXT.rstrip("=")[:12] not in message
    assert "not shown" in message or "expected exactly one" in message


def test_parse_connection_string_keeps_value_after_first_equals() -> None:
    parsed = parse_connection_string(f"HostName={HUB};DeviceId=a=b;x509=true")

    assert parsed.device_id == "a=b"


def test_read_connection_string_file(tmp_path: Path) -> None:
    path = tmp_path / "connection-string.txt"
    path.write_bytes(
        b"\xef\xbb\xbf" + f"HostName={HUB};DeviceId=gw-1;SharedAccessKey={KEY_TEXT}\r\n".encode()
    )

    parsed = read_connection_string(path)

    assert parsed.host_name == HUB
    assert parsed.shared_access_key == KEY_BYTES


def test_read_connection_string_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.txt"
    with pytest.raises(CredentialError, match="connection-string file not found"):
        read_connection_string(path)


@pytest.mark.parametrize(
    "content",
    ["", "\n\n", f"HostName={HUB};DeviceId=a;x509=true\nHostName={HUB};DeviceId=b;x509=true\n"],
    ids=["empty", "blank-lines", "two-lines"],
)
def test_read_connection_string_needs_one_line(tmp_path: Path, content: str) -> None:
    path = tmp_path / "connection-string.txt"
    path.write_text(content)
    with pytest.raises(CredentialError, match="expected one line"):
        read_connection_string(path)


def test_read_connection_string_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "connection-string.txt"
    path.write_bytes(b"HostName=\xff\xfe;DeviceId=gw;x509=true\n")
    with pytest.raises(CredentialError, match="cannot read connection-string file"):
        read_connection_string(path)


def test_parse_sas_token_any_field_order_with_policy() -> None:
    token = parse_sas_token(
        "SharedAccessSignature skn=device&se=1900000000&sig=c2ln&sr=hub%2Fdevices%2Fd"
    )

    assert token.expiry_s == 1900000000
    assert token.policy == "device"
    assert token.resource == "hub/devices/d"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sr=a&sig=b&se=1", "does not start with 'SharedAccessSignature'"),
        ("SharedAccessSignature sr=a&sig=b", "missing field 'se'"),
        ("SharedAccessSignature sr=a&se=1", "missing field 'sig'"),
        ("SharedAccessSignature sig=b&se=1", "missing field 'sr'"),
        ("SharedAccessSignature sr=a&sig=&se=1", "missing field 'sig'"),
        ("SharedAccessSignature sr=a&sig=b&se=1&se=2", "duplicate SAS token field 'se'"),
        ("SharedAccessSignature sr=a&sig=b&se=1&sk=c", "invalid SAS token field number 4"),
        ("SharedAccessSignature sr=a&sig=b&se=soon", "invalid SAS token expiry se (value of 4"),
        ("SharedAccessSignature sr=a&sig=b&se=+5", "invalid SAS token expiry"),
        ("SharedAccessSignature sr=a&sig=b&se=1_000", "invalid SAS token expiry"),
    ],
    ids=["prefix", "no-se", "no-sig", "no-sr", "empty-sig", "duplicate", "unknown",
         "word-expiry", "signed-expiry", "underscore-expiry"],
)
def test_parse_sas_token_rejects(text: str, expected: str) -> None:
    with pytest.raises(CredentialError) as caught:
        parse_sas_token(text)
    assert expected in str(caught.value)


def test_parse_sas_token_error_hides_signature_fragment() -> None:
    # An unencoded '&' inside a signature splits it, and the tail looks like a field name.
    fragment = "Q2hhbmdlTWVQbGVhc2VJdElzQVNlY3JldA"
    with pytest.raises(CredentialError) as caught:
        parse_sas_token(f"SharedAccessSignature sr=a&sig=abc&{fragment}=&se=1")
    assert fragment not in str(caught.value)


def test_mint_sas_token_matches_signing_rule() -> None:
    resource = f"{HUB}/devices/gw 1"
    token = mint_sas_token(resource, KEY_BYTES, 1800000000)

    # The signed string is the URL-encoded resource (upper-case escapes, '/' encoded too),
    # a newline and the expiry; the signature is the URL-encoded base64 HMAC-SHA256.
    encoded = "hub-1.azure-devices.net%2Fdevices%2Fgw%201"
    digest = hmac.new(KEY_BYTES, f"{encoded}\n1800000000".encode(), hashlib.sha256).digest()
    signature = urllib.parse.quote(base64.b64encode(digest).decode(), safe="")
    assert token == f"SharedAccessSignature sr={encoded}&sig={signature}&se=1800000000"


def test_mint_sas_token_round_trip_with_policy() -> None:
    text = mint_sas_token(f"{HUB}/devices/gw-1", KEY_BYTES, 1800000000, policy="device")

    token = parse_sas_token(text)

    assert token.resource == f"{HUB}/devices/gw-1"
    assert token.expiry_s == 1800000000
    assert token.policy == "device"
    assert token.text == text
    assert text not in repr(token)


def test_describe_expiry_healthy() -> None:
    healthy, sentence = describe_expiry(1_800_000_000, 86400, now_s=1_700_000_000)

    assert healthy
    assert sentence.startswith("SAS token valid until 2027-01-15T08:00:00Z")


def test_describe_expiry_soon() -> None:
    healthy, sentence = describe_expiry(1_700_003_600, 86400, now_s=1_700_000_000)

    assert not healthy
    assert "1.0 h left" in sentence


def test_describe_expiry_expired() -> None:
    healthy, sentence = describe_expiry(1_700_000_000, 0, now_s=1_700_000_001)

    assert not healthy
    assert "expired or the clock is wrong" in sentence
    assert "now=1700000001" in sentence


# A 16-byte key whose base64 text has '+', '/' and '==' padding, and signatures of it that
# `openssl dgst -sha256 -mac HMAC -macopt hexkey:fbefff706c636272696467652d6b6579 -binary`
# (OpenSSL 3.0) computed over "<encoded resource>\n1800000000", then base64-encoded and
# URL-encoded by hand.
OPENSSL_KEY_TEXT = "++//cGxjYnJpZGdlLWtleQ=="
OPENSSL_DEVICE_SIG = "reXYZa2z4H9CTGQiY9QxhmlZLSUocIo6sJ%2BnOxkqWcY%3D"
OPENSSL_MODULE_SIG = "nnMVgcNCzn6FaxF7QWwwFWKVQwv6iJYusIpSa84JwE8%3D"


def test_mint_sas_token_matches_openssl_vector_device() -> None:
    parsed = parse_connection_string(
        f"HostName={HUB};DeviceId=gw-1;SharedAccessKey={OPENSSL_KEY_TEXT}"
    )
    assert parsed.shared_access_key is not None

    token = mint_sas_token(parsed.resource_uri, parsed.shared_access_key, 1800000000)

    assert token == (
        f"SharedAccessSignature sr=hub-1.azure-devices.net%2Fdevices%2Fgw-1"
        f"&sig={OPENSSL_DEVICE_SIG}&se=1800000000"
    )


def test_mint_sas_token_matches_openssl_vector_module() -> None:
    parsed = parse_connection_string(
        f"HostName={HUB};DeviceId=gw-1;ModuleId=uplink;SharedAccessKey={OPENSSL_KEY_TEXT};"
        "GatewayHostName=edge.plant.local"
    )
    assert parsed.shared_access_key is not None

    token = mint_sas_token(parsed.resource_uri, parsed.shared_access_key, 1800000000)

    # The gateway is where TLS goes; the token is still signed for the hub's name.
    assert token == (
        "SharedAccessSignature sr=hub-1.azure-devices.net%2Fdevices%2Fgw-1%2Fmodules%2Fuplink"
        f"&sig={OPENSSL_MODULE_SIG}&se=1800000000"
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("expiry_s", [1, 1800000000, 4102444800])
def test_mint_sas_token_matches_openssl_run(expiry_s: int) -> None:
    key = base64.b64decode(KEY_TEXT)
    resource = f"{HUB}/devices/gw 1/modules/m+1"
    encoded = "hub-1.azure-devices.net%2Fdevices%2Fgw%201%2Fmodules%2Fm%2B1"

    result = subprocess.run(
        ["openssl", "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{key.hex()}",
         "-binary"],
        input=f"{encoded}\n{expiry_s}".encode(), capture_output=True, check=True,
    )
    signature = base64.b64encode(result.stdout).decode()
    signature = signature.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")

    token = mint_sas_token(resource, key, expiry_s)

    assert token == f"SharedAccessSignature sr={encoded}&sig={signature}&se={expiry_s}"


def test_connection_string_key_kept_byte_exact() -> None:
    parsed = parse_connection_string(
        f"HostName={HUB};DeviceId=gw-1;SharedAccessKey={OPENSSL_KEY_TEXT}"
    )

    assert parsed.shared_access_key == bytes.fromhex("fbefff706c636272696467652d6b6579")


@pytest.mark.parametrize(
    ("now_s", "state", "level"),
    [
        (1_700_000_000 - 8 * 86400, "valid", logging.INFO),
        (1_700_000_000 - 86400, "warning", logging.WARNING),
        (1_700_000_000 + 60, "expired", logging.WARNING),
        (1_700_000_000 + 301, "expired", logging.ERROR),
    ],
    ids=["valid", "within-warning", "expired-within-margin", "expired-past-margin"],
)
def test_check_validity_states(now_s: int, state: str, level: int) -> None:
    result = check_validity("SAS token", 1_700_000_000, now_s, 7 * 86400, 300)

    assert result.state == state
    assert result.level == level
    assert "se=1700000000 (2023-11-14T22:13:20Z)" in result.message
    assert f"now={now_s} (" in result.message


def test_check_validity_not_yet_valid_distinct() -> None:
    result = check_validity("client certificate", 1_800_000_000, 1_600_000_000, 0, 0,
                            not_before_s=1_700_000_000, field_name="notAfter")

    assert result.state == "not_yet_valid"
    assert result.level == logging.ERROR
    assert "not valid yet" in result.message
    assert "notBefore=1700000000 (2023-11-14T22:13:20Z)" in result.message
    assert "expired" not in result.message


def test_redact_token_hides_signature() -> None:
    token = mint_sas_token(f"{HUB}/devices/gw-1", KEY_BYTES, 1800000000)
    signature = token.split("sig=")[1].split("&")[0]

    redacted = redact_token(token)

    assert signature not in redacted
    assert "sig=<redacted>&se=1800000000" in redacted


@pytest.mark.parametrize("se", [str(MAX_EPOCH_S + 1), "99999999999999", "9" * 40, "9" * 5000])
def test_parse_sas_token_se_out_of_range(se: str) -> None:
    with pytest.raises(CredentialError) as caught:
        parse_sas_token(f"SharedAccessSignature sr=a&sig=b&se={se}", "cs.txt")

    message = str(caught.value)
    assert message.startswith("cs.txt: ")
    assert "se out of range" in message
    assert f"({len(se)} digits)" in message
    assert se not in message


def test_parse_sas_token_se_max_accepted() -> None:
    token = parse_sas_token(f"SharedAccessSignature sr=a&sig=b&se={MAX_EPOCH_S}")

    assert token.expiry_s == MAX_EPOCH_S
    assert format_utc_seconds(token.expiry_s) == "9999-12-31T23:59:59Z"


def test_format_utc_seconds_out_of_range() -> None:
    assert format_utc_seconds(1e300) == "out-of-range"
    assert format_utc_seconds(float("inf")) == "out-of-range"


@pytest.mark.parametrize(
    "token",
    [
        "SharedAccessSignature sr=a&sig=b&SIGSECRETxyz=1&se=1",
        "SharedAccessSignature sr=a&sig=b&se=SIGSECRETxyz",
        "SharedAccessSignature sr=a&se=b&sig=1&SIGSECRETxyz",
    ],
    ids=["field-name", "se-value", "bare-field"],
)
def test_parse_sas_token_error_hides_field_and_se(token: str) -> None:
    with pytest.raises(CredentialError) as caught:
        parse_sas_token(token)

    assert "SIGSECRET" not in str(caught.value)
    assert "not shown" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (f"HostName={HUB}; DeviceId=gw-1;SharedAccessKey={KEY_TEXT}", "DeviceId"),
        (f"HostName={HUB};DeviceId =gw-1;SharedAccessKey={KEY_TEXT}", "DeviceId"),
        (f"HostName={HUB} ;DeviceId=gw-1;SharedAccessKey={KEY_TEXT}", "HostName"),
        (f"HostName={HUB};DeviceId= gw-1;SharedAccessKey={KEY_TEXT}", "DeviceId"),
        (f"HostName={HUB};DeviceId=gw-1;SharedAccessKey= {KEY_TEXT}", "SharedAccessKey"),
    ],
    ids=["space-before-key", "space-after-key", "space-after-host", "space-before-value",
         "space-before-key-value"],
)
def test_parse_connection_string_whitespace_named(text: str, key: str) -> None:
    with pytest.raises(CredentialError) as caught:
        parse_connection_string(text)

    message = str(caught.value)
    assert f"key {key!r}" in message
    assert "whitespace" in message
    assert KEY_TEXT not in message


@pytest.mark.parametrize(
    "device_id", ["gw#1", "gw+1", "gw/1", "gw 1", "gw<1", "x" * 129, "gw\u00e9"]
)
def test_parse_connection_string_invalid_device_id(device_id: str) -> None:
    with pytest.raises(CredentialError) as caught:
        parse_connection_string(f"HostName={HUB};DeviceId={device_id};SharedAccessKey={KEY_TEXT}")

    assert "invalid DeviceId" in str(caught.value)


def test_parse_connection_string_invalid_module_id() -> None:
    with pytest.raises(CredentialError) as caught:
        parse_connection_string(
            f"HostName={HUB};DeviceId=gw-1;ModuleId=m#1;SharedAccessKey={KEY_TEXT}"
        )

    assert "invalid ModuleId" in str(caught.value)


def test_parse_connection_string_allowed_id_characters() -> None:
    device_id = "gw-1.a%b_c*d?e!f(g)h,i:j=k@l$m'n"

    parsed = parse_connection_string(f"HostName={HUB};DeviceId={device_id};x509=true")

    assert parsed.device_id == device_id


def _token_for(resource: str, policy: str | None = None) -> str:
    return mint_sas_token(resource, KEY_BYTES, 4102444800, policy)


@pytest.mark.parametrize(
    ("identity", "resource", "policy"),
    [
        ("DeviceId=gw-1", "other.azure-devices.net/devices/gw-99", None),
        ("DeviceId=gw-1", f"{HUB}/devices/gw-2", None),
        ("DeviceId=gw-1;ModuleId=m", f"{HUB}/devices/gw-1", None),
        ("DeviceId=gw-1", f"{HUB}/devices/gw-1/modules/m", None),
        ("DeviceId=gw-1", f"{HUB}/devices/GW-1", None),
        ("DeviceId=gw-1", f"{HUB}/devices/gw", "device"),
    ],
    ids=["other-hub", "other-device", "module-with-device-sr", "device-with-module-sr",
         "device-case", "policy-partial-segment"],
)
def test_parse_connection_string_token_resource_mismatch(
    identity: str, resource: str, policy: str | None
) -> None:
    token = _token_for(resource, policy)

    with pytest.raises(CredentialError) as caught:
        parse_connection_string(f"HostName={HUB};{identity};SharedAccessSignature={token}",
                                "cs.txt")

    message = str(caught.value)
    assert message.startswith("cs.txt: SharedAccessSignature is signed for sr=")
    assert "the hub rejects it" in message
    assert "sig=" not in message


@pytest.mark.parametrize(
    ("identity", "resource", "policy"),
    [
        ("DeviceId=gw-1", f"{HUB}/devices/gw-1", None),
        ("DeviceId=gw-1", f"{HUB.upper()}/devices/gw-1", None),
        ("DeviceId=gw-1;ModuleId=m", f"{HUB}/devices/gw-1/modules/m", None),
        ("DeviceId=gw-1", HUB, None),
        ("DeviceId=gw-1;ModuleId=m", f"{HUB}/devices/gw-1", "device"),
        ("DeviceId=gw-1", f"{HUB}/devices", "device"),
    ],
    ids=["device", "host-case", "module", "hub", "policy-device-prefix", "policy-devices"],
)
def test_parse_connection_string_token_resource_accepted(
    identity: str, resource: str, policy: str | None
) -> None:
    token = _token_for(resource, policy)

    parsed = parse_connection_string(f"HostName={HUB};{identity};SharedAccessSignature={token}")

    assert parsed.token is not None


def test_read_connection_string_huge_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cs.txt"
    path.write_text(f"HostName={HUB};DeviceId=gw-1;SharedAccessKey={KEY_TEXT}\n" + "\n" * 600_000)

    with pytest.raises(CredentialError) as caught:
        read_connection_string(path)

    assert str(caught.value) == (
        f"{path}: connection-string file is larger than 512 KiB; expected a regular file of "
        "at most 512 KiB"
    )
