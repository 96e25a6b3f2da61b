"""The on-site token server as a real process over real TLS, with the hub emulator.

A gateway proves its identity with a client certificate signed by the site CA, or by
answering a single-use challenge with its shared secret. Every issue and refusal must be in
the audit log, and no token or key anywhere in it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.config import TokenServerSettings
from common.errors import ConfigError
from common.token_client import TokenRefusedError, TokenServerClient, TokenServerError
from common.token_protocol import challenge_mac
from devstack.dev_certs import dev_cert_paths, make_client_cert
from tests.support.hub import HubStack, RawMqttClient, username
from tests.support.token_server import (
    ROOT,
    AllowedGateway,
    TokenServerProcess,
    new_secret,
    server_toml,
    write_expired_client_cert,
    write_private,
)
from tests.support.waiting import wait_until
from token_server import challenges
from token_server.audit import AuditLog
from token_server.bucket import RateLimiter
from token_server.challenges import ChallengeBook
from token_server.config import load_server_config

pytestmark = pytest.mark.integration

DEVICE_ID = "gw-01"
SERIAL = "SN-0001"
DEVICE_KEY = new_secret()
SECRET = new_secret()


@pytest.fixture
def servers(base: Path) -> Iterator[list[TokenServerProcess]]:
    started: list[TokenServerProcess] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


def start_server(base: Path, certs: Path, started: list[TokenServerProcess],
                 **options: Any) -> TokenServerProcess:
    gateways = options.pop("gateways", [AllowedGateway(SERIAL, DEVICE_ID, DEVICE_KEY, SECRET)])
    workdir = base / f"tokens{len(started)}"
    workdir.mkdir()
    server = TokenServerProcess(workdir, server_toml(workdir, certs, gateways, **options))
    started.append(server)
    server.start()
    return server


def client_for(server: TokenServerProcess, certs: Path, **auth: Any) -> TokenServerClient:
    settings = TokenServerSettings(
        url=server.url, host="localhost", port=server.port,
        ca_file=dev_cert_paths(certs).ca_cert, hub_host_name="localhost", device_id=DEVICE_ID,
        timeout_s=5.0, **auth)
    return TokenServerClient(settings)


def certificate_for(certs: Path, base: Path, common_name: str) -> dict[str, Path]:
    paths = dev_cert_paths(certs)
    cert, key = make_client_cert(base / "client-certs", paths.ca_cert, paths.ca_key, common_name)
    return {"client_cert_file": cert, "client_key_file": key}


def post(server: TokenServerProcess, certs: Path, path: str,
         body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Send one request without a client certificate; return status, JSON body, headers."""
    context = ssl.create_default_context(cafile=str(dev_cert_paths(certs).ca_cert))
    connection = http.client.HTTPSConnection("localhost", server.port, timeout=10,
                                             context=context)
    try:
        connection.request("POST", path, body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), dict(response.getheaders())
    finally:
        connection.close()


def post_raw(server: TokenServerProcess, certs: Path, path: str, body: bytes,
             content_length: str) -> tuple[int, dict[str, Any]]:
    """Send body with the given Content-Length header as is; return status and JSON body."""
    context = ssl.create_default_context(cafile=str(dev_cert_paths(certs).ca_cert))
    connection = http.client.HTTPSConnection("localhost", server.port, timeout=10,
                                             context=context)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", content_length.encode("latin-1"))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def assert_no_secret(server: TokenServerProcess, *secrets: str) -> None:
    audit_text = server.audit_file.read_text()
    log_text = server.log()
    for secret in secrets:
        assert secret not in audit_text
        assert secret not in log_text


def hub_accepts(hub: HubStack, token: str) -> int | None:
    with RawMqttClient(hub.mqtt_port, hub.ca_file) as client:
        return client.connect(DEVICE_ID, username(hub.hub_host, DEVICE_ID), token)


def test_token_server_certificate_token_accepted_by_hub(
    base: Path, certs: Path, servers: list[TokenServerProcess]
) -> None:
    server = start_server(base, certs, servers, ttl_s=600)
    client = client_for(server, certs, **certificate_for(certs, base, SERIAL))

    fetched = client.fetch()

    assert fetched.ttl_s == 600
    assert fetched.token.resource == f"localhost/devices/{DEVICE_ID}"
    with HubStack(certs, base / "hub", {DEVICE_ID: {"primary_key": DEVICE_KEY}}) as hub:
        assert hub_accepts(hub, fetched.token.text) == 0
    [record] = server.audit()
    assert record["outcome"] == "issued"
    assert record["serial"] == SERIAL
    assert record["device_id"] == DEVICE_ID
    assert record["method"] == "certificate"
    assert record["client"] == "127.0.0.1"
    assert record["expiry_s"] == fetched.token.expiry_s
    assert set(record) == {"time", "client", "serial", "device_id", "method", "outcome",
                           "reason", "expiry_s"}
    signature = fetched.token.text.split("sig=")[1].split("&")[0]
    assert_no_secret(server, signature, DEVICE_KEY)


def test_token_server_challenge_group_key_and_replay(
    base: Path, certs: Path, servers: list[TokenServerProcess]
) -> None:
    group_key = new_secret()
    server = start_server(base, certs, servers, client_certificates=False,
                          group_key=group_key,
                          gateways=[AllowedGateway(SERIAL, DEVICE_ID, secret=SECRET)])
    secret = base64.b64decode(SECRET)

    status, challenge, _ = post(server, certs, "/v1/challenge", {"serial": SERIAL})
    assert status == 200
    nonce = challenge["nonce"]
    answer = {"serial": SERIAL, "nonce": nonce, "mac": challenge_mac(secret, SERIAL, nonce)}
    status, reply, headers = post(server, certs, "/v1/token", answer)
    assert status == 200
    assert headers["Cache-Control"] == "no-store"

    # The device key derived from the group key as DPS does, computed here independently.
    derived = hmac.new(base64.b64decode(group_key), DEVICE_ID.encode(), hashlib.sha256).digest()
    devices = {DEVICE_ID: {"primary_key": base64.b64encode(derived).decode()}}
    with HubStack(certs, base / "hub", devices) as hub:
        assert hub_accepts(hub, reply["token"]) == 0

    replay_status, replay, _ = post(server, certs, "/v1/token", answer)
    assert replay_status == 401
    assert replay["error"] == "challenge_unknown_or_used"

    _, second, _ = post(server, certs, "/v1/challenge", {"serial": SERIAL})
    forged = {"serial": SERIAL, "nonce": second["nonce"],
              "mac": challenge_mac(b"x" * 32, SERIAL, second["nonce"])}
    forged_status, forged_reply, _ = post(server, certs, "/v1/token", forged)
    assert forged_status == 401
    assert forged_reply["error"] == "mac_invalid"

    outcomes = [(r["outcome"], r["reason"], r["method"]) for r in server.audit()]
    assert outcomes == [("issued", "ok", "challenge"),
                        ("refused", "challenge_unknown_or_used", "challenge"),
                        ("refused", "mac_invalid", "challenge")]
    assert_no_secret(server, SECRET, group_key, answer["mac"], reply["token"])


def test_token_server_client_challenge_flow(
    base: Path, certs: Path, servers: list[TokenServerProcess]
) -> None:
    server = start_server(base, certs, servers)
    secret_file = write_private(base / "gateway.secret", SECRET)
    client = client_for(server, certs, serial=SERIAL, secret_file=secret_file)

    first, second = client.fetch(), client.fetch()

    assert first.token.resource == second.token.resource == f"localhost/devices/{DEVICE_ID}"
    assert [r["method"] for r in server.audit()] == ["challenge", "challenge"]


def test_token_server_refuses_unknown_serial(
    base: Path, certs: Path, servers: list[TokenServerProcess]
) -> None:
    server = start_server(base, certs, servers)
    stranger = client_for(server, certs, **certificate_for(certs, base, "SN-9999"))

    with pytest.raises(TokenRefusedError, match="HTTP 403 unknown_serial"):
        stranger.fetch()
    status, reply, _ = post(server, certs, "/v1/challenge", {"serial": "SN-8888"})

    assert status == 403
    assert reply["error"] == "unknown_serial"
    refusals = [(r["outcome"], r["reason"], r["serial"], r["device_id"])
                for r in server.audit()]
    assert refusals == [("refused", "unknown_serial", "SN-9999", None),
                        ("refused", "unknown_serial", "SN-8888", None)]


def test_token_server_refuses_expired_certificate(
    base: Path, certs: Path, servers: list[TokenServerProcess]
) -> None:
    server = start_server(base, certs, servers)
    paths = dev_cert_paths(certs)
    cert, key = write_expired_client_cert(base / "expired", paths.ca_cert, paths.ca_key, SERIAL)
    client = client_for(server, certs, client_cert_file=cert, client_key_file=key)

    with pytest.raises(TokenServerError) as raised:
        client.fetch()

    assert server.url in str(raised.value)
    # The client sees the TLS alert before the server has written its record.
    [record] = wait_until(server.audit, 10, "the audit record of the refused certificate")
    assert record["outcome"] == "refused"
    assert record["method"] == "certificate"
    assert "certificate has expired" in record["reason"]


def test_token_server_rate_limit_429(
    base: Path, certs: Path, servers: list[TokenServerProcess]
) -> None:
    server = start_server(base, certs, servers, rate_limit={"burst": 3, "per_minute": 1})

    statuses = [post(server, certs, "/v1/challenge", {"serial": SERIAL}) for _ in range(4)]

    assert [status for status, _, _ in statuses] == [200, 200, 200, 429]
    assert statuses[3][1]["error"] == "rate_limited"
    # One request a minute refills the bucket, so the next one is free in up to 60 s.
    assert 1 <= int(statuses[3][2]["Retry-After"]) <= 60
    assert [r["reason"] for r in server.audit()] == ["rate_limited"]


# -- unsafe configurations ------------------------------------------------------------------


def config_file(base: Path, certs: Path, edit: str = "", **options: Any) -> Path:
    gateways = options.pop("gateways", [AllowedGateway(SERIAL, DEVICE_ID, DEVICE_KEY, SECRET)])
    text = server_toml(base, certs, gateways, **options)
    path = base / "token-server.toml"
    path.write_text(text + edit)
    return path


def test_token_server_config_valid(base: Path, certs: Path) -> None:
    config = load_server_config(config_file(base, certs))

    assert config.listen.client_ca_file == dev_cert_paths(certs).ca_cert
    assert [device.serial for device in config.devices] == [SERIAL]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("key_mode", r"SN-0001\.key: devices\[0\]\.key_file has mode 0640, so other users "
                     r"can access it; run `chmod 600"),
        ("no_tls", r"missing key listen\.cert_file; expected the server's PEM certificate; "
                   r"the token server serves HTTPS only"),
        ("no_devices", r"missing allow-list: no \[\[devices\]\] table"),
        ("wildcard", r"no client authentication configured while listening on every "
                     r"interface \('0\.0\.0\.0'\)"),
        ("unknown_key", r"unknown key tokens\.ttl; check the spelling"),
        ("both_keys", r"devices\[0\] \(serial 'SN-0001'\) sets key_file while "
                      r"tokens\.group_key_file is set"),
        ("short_ttl", r"invalid value for tokens\.ttl_s: 5; expected an integer from 10"),
        ("bad_device_id", r"invalid value for devices\[0\]\.device_id: 'gw#01'; expected an "
                          r"IoT Hub device id"),
        ("bad_hub_host", r"invalid value for tokens\.hub_host_name: 'evil\.com/x\?y='; "
                         r"expected a host name"),
    ],
)
def test_token_server_unsafe_config_rejected(
    base: Path, certs: Path, change: str, message: str
) -> None:
    no_auth = [AllowedGateway(SERIAL, DEVICE_ID, DEVICE_KEY)]
    if change == "key_mode":
        path = config_file(base, certs)
        (base / f"{SERIAL}.key").chmod(0o640)
    elif change == "no_tls":
        path = config_file(base, certs)
        text = "\n".join(line for line in path.read_text().splitlines()
                         if not line.startswith("cert_file"))
        path.write_text(text)
    elif change == "no_devices":
        path = config_file(base, certs, gateways=[])
    elif change == "wildcard":
        path = config_file(base, certs, client_certificates=False, gateways=no_auth)
        path.write_text(path.read_text().replace('host = "127.0.0.1"', 'host = "0.0.0.0"'))
    elif change == "unknown_key":
        path = config_file(base, certs)
        path.write_text(path.read_text().replace("ttl_s = 3600", "ttl_s = 3600\nttl = 5"))
    elif change == "both_keys":
        path = config_file(base, certs, group_key=new_secret())
    elif change == "bad_hub_host":
        path = config_file(base, certs, hub_host="evil.com/x?y=")
    elif change == "bad_device_id":
        path = config_file(base, certs, gateways=[AllowedGateway(SERIAL, "gw#01", DEVICE_KEY)])
    else:
        path = config_file(base, certs, ttl_s=5)

    with pytest.raises(ConfigError, match=message):
        load_server_config(path)


def test_token_server_audit_fifo_rejected(base: Path, certs: Path) -> None:
    path = config_file(base, certs)
    audit = base / "audit.jsonl"
    os.mkfifo(audit, 0o600)
    config = load_server_config(path)

    with pytest.raises(ConfigError, match=r"audit_log_file is not a regular file"):
        AuditLog(config.audit_log_file)


def test_token_server_command_exits_on_unsafe_config(base: Path, certs: Path) -> None:
    path = config_file(base, certs)
    (base / f"{SERIAL}.secret").chmod(0o604)

    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "token-server", "--config", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)

    assert result.returncode == 2
    assert "devices[0].secret_file has mode 0604" in result.stderr
    assert SECRET not in result.stderr + result.stdout


def test_token_server_wrong_device_token_rejected(
    base: Path, certs: Path, servers: list[TokenServerProcess]
) -> None:
    server = start_server(base, certs, servers,
                          gateways=[AllowedGateway(SERIAL, "gw-other", DEVICE_KEY, SECRET)])
    client = client_for(server, certs, **certificate_for(certs, base, SERIAL))

    with pytest.raises(TokenServerError, match="issued a token for sr='localhost/devices/"
                                               "gw-other', not for 'localhost/devices/gw-01'"):
        client.fetch()


# -- pure logic: challenges and token buckets ----------------------------------------------


def test_challenge_book_single_use() -> None:
    book = ChallengeBook(ttl_s=30.0, max_pending=10)
    nonce = book.issue(SERIAL, now=100.0)
    assert nonce is not None

    assert book.redeem(SERIAL, nonce, now=101.0) == challenges.ACCEPTED
    assert book.redeem(SERIAL, nonce, now=101.0) == challenges.UNKNOWN


def test_challenge_book_expiry_and_serial() -> None:
    book = ChallengeBook(ttl_s=30.0, max_pending=10)
    late = book.issue(SERIAL, now=100.0)
    other = book.issue("SN-0002", now=100.0)
    assert late is not None
    assert other is not None

    assert book.redeem(SERIAL, late, now=130.0) == challenges.EXPIRED
    assert book.redeem(SERIAL, other, now=101.0) == challenges.WRONG_SERIAL


def test_challenge_book_bounded_pending() -> None:
    book = ChallengeBook(ttl_s=30.0, max_pending=2)

    assert book.issue(SERIAL, now=0.0) is not None
    assert book.issue(SERIAL, now=0.0) is not None
    assert book.issue(SERIAL, now=1.0) is None
    # Expired nonces make room again.
    assert book.issue(SERIAL, now=31.0) is not None


def test_rate_limiter_burst_and_refill() -> None:
    limiter = RateLimiter(burst=2, per_minute=60.0)

    assert limiter.take("10.0.0.1", now=0.0) == 0.0
    assert limiter.take("10.0.0.1", now=0.0) == 0.0
    assert limiter.take("10.0.0.1", now=0.0) == pytest.approx(1.0)
    assert limiter.take("10.0.0.2", now=0.0) == 0.0
    assert limiter.take("10.0.0.1", now=1.0) == 0.0


def test_token_server_malformed_requests_answered(
    base: Path, certs: Path, servers: list[TokenServerProcess]
) -> None:
    server = start_server(base, certs, servers, client_certificates=False,
                          gateways=[AllowedGateway(SERIAL, DEVICE_ID, DEVICE_KEY, SECRET)])
    nested = b"[" * 4000

    cases = [(nested, str(len(nested))), (b"{}", "\u00b2"), (b"{}", "0" * 5000 + "2")]
    for body, length in cases:
        status, reply = post_raw(server, certs, "/v1/token", body, length)
        assert status == 400, length[:8]
        assert reply["error"] == "invalid_request"

    # A MAC with a lone surrogate escape is a wrong MAC, not a failed request.
    _, challenge, _ = post(server, certs, "/v1/challenge", {"serial": SERIAL})
    fields = {"serial": SERIAL, "nonce": challenge["nonce"], "mac": "MAC"}
    answer = json.dumps(fields).replace('"MAC"', '"\\ud800"').encode()
    status, reply = post_raw(server, certs, "/v1/token", answer, str(len(answer)))
    assert status == 401
    assert reply["error"] == "mac_invalid"
    assert "Traceback" not in server.log()
    reasons = [record["reason"] for record in server.audit()]
    assert reasons.count("invalid_request") == 3
    assert "mac_invalid" in reasons
