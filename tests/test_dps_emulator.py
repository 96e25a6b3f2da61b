"""The DPS emulator's enrollments, fault modes and CONNECT checks."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.credentials import mint_sas_token
from common.dps_keys import derive_device_key
from common.dps_topics import registration_resource, registration_username
from devstack.dps_enrollments import EnrollmentError, parse_enrollments
from devstack.dps_faults import parse_dps_faults
from tests.support.dps import ID_SCOPE, DpsStack, enrollments_toml
from tests.support.hub import RawMqttClient

INDIVIDUAL_KEY = base64.b64encode(b"individual-enrollment-key-32-byt").decode()
GROUP_KEY = base64.b64encode(b"group-enrollment-key-of-32-bytes").decode()
ENROLLMENTS = enrollments_toml(
    individual={"Meter-7": {"primary_key": INDIVIDUAL_KEY, "assigned_hub": "hub-a",
                            "device_id": "meter-seven"}},
    groups={"line": {"primary_key": GROUP_KEY, "assigned_hub": "hub-b"}},
)


def test_enrollments_parse_individual_and_group() -> None:
    enrollments = parse_enrollments(ENROLLMENTS.encode())
    individual = enrollments.individual_for("METER-7")
    assert individual is not None
    assert individual.device_id == "meter-seven"
    assert enrollments.id_scope == ID_SCOPE
    assert [group.name for group in enrollments.groups] == ["line"]
    derived = enrollments.groups[0].device_keys("gw-9")
    assert derived[0][1] == base64.b64decode(
        derive_device_key(base64.b64decode(GROUP_KEY), "gw-9"))


@pytest.mark.parametrize(("text", "expected"), [
    ('id_scope = "s"\n[individual."a b"]\nprimary_key = "eA=="\nassigned_hub = "h"\n',
     "invalid registration id"),
    ('id_scope = "s"\n[groups.g]\nprimary_key = "not base64!"\nassigned_hub = "h"\n',
     "groups.g.primary_key: not base64"),
    ('id_scope = "s"\n[groups.g]\nprimary_key = "eA=="\n', "assigned_hub"),
    ('id_scope = "s"\n[groups.g]\nassigned_hub = "h"\n', "exactly one of"),
    ('[groups.g]\nprimary_key = "eA=="\nassigned_hub = "h"\n', "invalid id_scope"),
    ('id_scope = "s"\nhubs = 1\n', "unknown top-level key 'hubs'"),
])
def test_enrollments_invalid(text: str, expected: str) -> None:
    with pytest.raises(EnrollmentError) as caught:
        parse_enrollments(text.encode())
    assert expected in str(caught.value)
    assert "not base64!" not in str(caught.value)


@pytest.mark.parametrize(("text", "expected"), [
    ('{"throttle_requests": -1}', "invalid throttle_requests"),
    ('{"disabled": 1}', "invalid disabled"),
    ('{"retry_after_s": "soon"}', "invalid retry_after_s"),
    ('{"slow": true}', "unknown key 'slow'"),
])
def test_dps_faults_invalid(text: str, expected: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_dps_faults(text.encode())
    assert expected in str(caught.value)


@pytest.fixture
def dps(base: Path, certs: Path) -> Iterator[DpsStack]:
    with DpsStack(certs, base / "dps", ENROLLMENTS) as stack:
        yield stack


def connect_code(dps: DpsStack, registration_id: str, key: str,
                 scope: str = ID_SCOPE) -> int | None:
    token = mint_sas_token(registration_resource(scope, registration_id),
                           base64.b64decode(key), int(time.time()) + 600, "registration")
    with RawMqttClient(dps.port, dps.ca_file) as client:
        return client.connect(registration_id,
                              registration_username(scope, registration_id, "2019-03-31"), token)


def test_dps_connect_individual_key_accepted(dps: DpsStack) -> None:
    assert connect_code(dps, "meter-7", INDIVIDUAL_KEY) == 0


def test_dps_connect_derived_key_accepted(dps: DpsStack) -> None:
    derived = derive_device_key(base64.b64decode(GROUP_KEY), "gw-9")
    assert connect_code(dps, "gw-9", derived) == 0


def test_dps_connect_group_key_itself_rejected(dps: DpsStack) -> None:
    assert connect_code(dps, "gw-9", GROUP_KEY) == 5
    assert "signature matches no key" in dps.log()


def test_dps_connect_wrong_scope_rejected(dps: DpsStack) -> None:
    assert connect_code(dps, "meter-7", INDIVIDUAL_KEY, scope="0ne0OTHER") == 5
    assert "does not match" in dps.log()
