"""Device keys and challenge secrets, read once at start and held only in memory."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from common.credentials import CredentialError, mint_sas_token
from common.errors import ConfigError
from common.token_protocol import read_base64_secret
from token_server.config import AllowedDevice, ServerConfig

# Azure IoT Hub accepts symmetric keys of 16 to 64 bytes.
MIN_DEVICE_KEY_BYTES = 16


def derive_device_key(group_key: bytes, registration_id: str) -> bytes:
    """Derive a device key from a group enrollment key, as Azure DPS does.

    The device key is HMAC-SHA256 of the UTF-8 registration id, keyed with the group key.
    """
    return hmac.new(group_key, registration_id.encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class Issued:
    token: str = field(repr=False)
    expiry_s: int


class KeyStore:
    """Signs tokens for the devices on the allow-list; a key never leaves this object."""

    def __init__(self, config: ServerConfig) -> None:
        self._hub = config.tokens.hub_host_name
        self._ttl_s = config.tokens.ttl_s
        self._keys: dict[str, bytes] = {}
        self._secrets: dict[str, bytes] = {}
        try:
            group_key = None
            if config.tokens.group_key_file is not None:
                group_key = read_base64_secret(config.tokens.group_key_file, "group key",
                                               MIN_DEVICE_KEY_BYTES)
            for device in config.devices:
                self._keys[device.serial] = self._device_key(device, group_key)
                if device.secret_file is not None:
                    self._secrets[device.serial] = read_base64_secret(
                        device.secret_file, "challenge secret")
        except CredentialError as exc:
            raise ConfigError(str(exc)) from exc

    @staticmethod
    def _device_key(device: AllowedDevice, group_key: bytes | None) -> bytes:
        if group_key is not None:
            # The registration id is the device id, as in a DPS group enrollment that
            # registers each device under its own id.
            return derive_device_key(group_key, device.device_id)
        assert device.key_file is not None  # the configuration check enforces it
        return read_base64_secret(device.key_file, "device key", MIN_DEVICE_KEY_BYTES)

    def secret(self, serial: str) -> bytes | None:
        return self._secrets.get(serial)

    def issue(self, device: AllowedDevice, now_s: float) -> Issued:
        expiry_s = int(now_s) + self._ttl_s
        resource = f"{self._hub}/devices/{device.device_id}"
        return Issued(mint_sas_token(resource, self._keys[device.serial], expiry_s), expiry_s)
