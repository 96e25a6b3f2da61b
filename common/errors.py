"""The gateway's own exception tree.

Errors from pymodbus, paho, lmdb and zmq are translated into these where they enter, with
``raise ... from exc``, so that every message names the endpoint, address or file involved.
"""


class PlcBridgeError(Exception):
    """Base of every error that plcbridge raises on purpose."""


class ConfigError(PlcBridgeError):
    """Invalid or unreadable configuration: the message names the file, key and value."""


class CredentialError(PlcBridgeError):
    """A connection string, SAS token or certificate that cannot be used."""


class PlcError(PlcBridgeError):
    """A failed exchange with a PLC: the message names the endpoint, unit id and address."""


class StoreError(PlcBridgeError):
    """A failure of the LMDB store: the message names the path."""


class UplinkError(PlcBridgeError):
    """A failure to reach or publish to the MQTT broker: the message names the endpoint."""
