"""The MQTT topics and names of Azure IoT Hub Device Provisioning Service (DPS).

A device connects with client id = registration id and user name
`<id scope>/registrations/<registration id>/api-version=<version>`, subscribes to
`$dps/registrations/res/#`, sends a register request and then polls the operation until it
ends. Each request carries a request id ($rid) that its response repeats. Responses arrive
on `$dps/registrations/res/<HTTP status>/?$rid=<rid>[&retry-after=<seconds>]`.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

RESPONSE_FILTER = "$dps/registrations/res/#"
RESPONSE_PREFIX = "$dps/registrations/res/"
REGISTER_PREFIX = "$dps/registrations/PUT/iotdps-register/"
POLL_PREFIX = "$dps/registrations/GET/iotdps-get-operationstatus/"
# The api-version that the Azure IoT SDKs send over MQTT.
DEFAULT_API_VERSION = "2019-03-31"
# The wait before a poll or a retry when a response gives no retry-after, as the Azure IoT
# SDKs use it.
DEFAULT_RETRY_AFTER_S = 2.0


@dataclass(frozen=True)
class Response:
    status: int
    request_id: str
    # None when the topic has no retry-after parameter.
    retry_after_s: float | None


@dataclass(frozen=True)
class Request:
    kind: str  # "register" or "poll"
    request_id: str
    operation_id: str | None


def registration_resource(id_scope: str, registration_id: str) -> str:
    """Return the resource that a registration's SAS token is scoped to."""
    return f"{id_scope}/registrations/{registration_id}"


def registration_username(id_scope: str, registration_id: str, api_version: str) -> str:
    return f"{registration_resource(id_scope, registration_id)}/api-version={api_version}"


def register_topic(request_id: str) -> str:
    return f"{REGISTER_PREFIX}?$rid={request_id}"


def poll_topic(request_id: str, operation_id: str) -> str:
    operation = urllib.parse.quote(operation_id, safe="")
    return f"{POLL_PREFIX}?$rid={request_id}&operationId={operation}"


def response_topic(status: int, request_id: str, retry_after_s: float | None = None) -> str:
    topic = f"{RESPONSE_PREFIX}{status}/?$rid={request_id}"
    if retry_after_s is not None:
        topic += f"&retry-after={retry_after_s:g}"
    return topic


def parse_response_topic(topic: str) -> Response:
    """Decode a response topic; raise ValueError naming the topic when it is not one."""
    if not topic.startswith(RESPONSE_PREFIX):
        raise ValueError(f"topic {topic!r} is not under {RESPONSE_PREFIX}")
    status_text, _, query = topic[len(RESPONSE_PREFIX):].partition("/?")
    if not status_text.isdigit():
        raise ValueError(f"topic {topic!r} has no HTTP status after {RESPONSE_PREFIX}")
    parameters = urllib.parse.parse_qs(query)
    retry_after_s = None
    if "retry-after" in parameters:
        try:
            retry_after_s = float(parameters["retry-after"][0])
        except ValueError as exc:
            raise ValueError(f"topic {topic!r} has a retry-after that is not a number") from exc
        if not 0 <= retry_after_s <= 86_400:
            raise ValueError(f"topic {topic!r} has a retry-after outside 0 to 86400 s")
    return Response(int(status_text), parameters.get("$rid", [""])[0], retry_after_s)


def parse_request_topic(topic: str) -> Request | None:
    """Decode a register or poll topic; None for any other topic."""
    for prefix, kind in ((REGISTER_PREFIX, "register"), (POLL_PREFIX, "poll")):
        if topic.startswith(prefix + "?"):
            parameters = urllib.parse.parse_qs(topic[len(prefix) + 1:])
            operation = parameters.get("operationId", [None])[0]
            return Request(kind, parameters.get("$rid", [""])[0], operation)
    return None
