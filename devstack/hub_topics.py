"""The topics that IoT Hub lets a device or a module publish and subscribe to over MQTT.

IoT Hub is not a general broker. A device publishes telemetry to its own events topic,
receives cloud-to-device messages on its own devicebound topic, and uses the `$iothub/`
topics for its twin and its direct methods. A module publishes to its module's events
topic and uses the same `$iothub/` topics; IoT Hub sends no cloud-to-device messages to
modules. Every allowed topic filter below ends in `#`, so a client may also subscribe to
any narrower filter under it.
"""

from __future__ import annotations

from devstack.hub_registry import Identity

# Twin GET, reported-properties PATCH and direct-method responses.
_IOTHUB_PUBLISH_PREFIXES = (
    "$iothub/twin/GET/",
    "$iothub/twin/PATCH/properties/reported/",
    "$iothub/methods/res/",
)
# Twin responses, desired-properties updates and direct-method requests.
_IOTHUB_SUBSCRIBE_PREFIXES = (
    "$iothub/twin/res/",
    "$iothub/twin/PATCH/properties/desired/",
    "$iothub/methods/POST/",
)


def events_prefix(identity: Identity) -> str:
    """Return the device-to-cloud topic prefix; the rest of the topic is the property bag."""
    base = f"devices/{identity.device_id}/"
    if identity.module_id is not None:
        base += f"modules/{identity.module_id}/"
    return f"{base}messages/events/"


def publish_allowed(identity: Identity, topic: str) -> bool:
    return topic.startswith((events_prefix(identity), *_IOTHUB_PUBLISH_PREFIXES))


def subscribe_allowed(identity: Identity, topic_filter: str) -> bool:
    prefixes: tuple[str, ...] = _IOTHUB_SUBSCRIBE_PREFIXES
    if identity.module_id is None:
        prefixes = (f"devices/{identity.device_id}/messages/devicebound/", *prefixes)
    return topic_filter.startswith(prefixes)
