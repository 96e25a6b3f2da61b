"""The last good credential set: copies of the credential files that last connected.

After the uplink's first accepted CONNACK with a set of credential files, it copies every
file of that set (connection string or password file, client certificate, key, passphrase
file and CA bundle) into <state_dir>/credentials-last-good/. When the hub later rejects a
rotated set, the uplink can connect with these copies instead (processes/uplink_fallback.py).

The folder contains one subfolder per saved set, named after the set's digest, and
manifest.json, which names the current subfolder and records each file's source path and
SHA-256. A save writes and fsyncs a new subfolder first, and only then replaces the
manifest with common.atomic_file, so a crash at any moment leaves the manifest naming one
complete set. A load checks every copy against the manifest's digest, so a copy changed or
lost afterwards makes the store unusable instead of mixing two sets. Copies are mode 0600
and the folders 0700, because they contain device keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic_file import write_atomically
from common.config import CredentialSettings
from common.credentials import read_regular_file

STORE_FOLDER = "credentials-last-good"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
SET_PREFIX = "set-"

# Each credential setting and the name of its copy in a stored set, in a fixed order.
ROLES = (
    ("connection_string_file", "connection-string"),
    ("password_file", "password"),
    ("ca_file", "ca.pem"),
    ("client_cert_file", "client-cert.pem"),
    ("client_key_file", "client-key.pem"),
    ("client_key_passphrase_file", "client-key-passphrase"),
)
COPY_NAMES = dict(ROLES)


class LastGoodError(Exception):
    """The store cannot be read or written; the message names the file and the reason."""


@dataclass(frozen=True)
class CredentialSnapshot:
    """The content of every configured credential file, read at one moment.

    files maps a setting name, such as "ca_file", to the file's path and bytes.
    """

    files: dict[str, tuple[Path, bytes]] = field(repr=False)

    def digests(self) -> dict[str, str]:
        return {role: hashlib.sha256(data).hexdigest()
                for role, (_path, data) in self.files.items()}

    def path(self, role: str) -> Path:
        return self.files[role][0]


def read_snapshot(settings: CredentialSettings) -> CredentialSnapshot:
    """Read every credential file that settings name; raise OSError or ValueError naming one."""
    files = {}
    for role, _copy in ROLES:
        path = getattr(settings, role)
        if path is not None:
            files[role] = (path, read_regular_file(path))
    return CredentialSnapshot(files)


@dataclass(frozen=True)
class StoredFile:
    source: Path
    sha256: str
    copy: Path


@dataclass(frozen=True)
class StoredSet:
    """A complete, verified last good set: where each copy is and where it came from."""

    folder: Path
    saved_ms: int
    files: dict[str, StoredFile]

    def digests(self) -> dict[str, str]:
        return {role: stored.sha256 for role, stored in self.files.items()}

    def settings(self, base: CredentialSettings) -> CredentialSettings:
        """Return base with every stored file's path replaced by its copy."""
        copies = {role: stored.copy for role, stored in self.files.items()}
        return dataclasses.replace(base, **copies)  # type: ignore[arg-type]


def changed_roles(current: dict[str, str], stored: dict[str, str]) -> list[str]:
    """Return the settings whose file differs between two sets, or is in only one of them."""
    return [role for role, _copy in ROLES if current.get(role) != stored.get(role)]


class LastGoodStore:
    """The folder of the last good credential set under the gateway's state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / STORE_FOLDER
        self.manifest = self.folder / MANIFEST_FILE

    def load(self) -> StoredSet | None:
        """Return the stored set, None when none was saved; raise LastGoodError when damaged."""
        try:
            data = read_regular_file(self.manifest)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LastGoodError(f"{self.manifest}: cannot be read: {_reason(exc)}") from exc
        stored = self._parse(data)

        # A copy that no longer matches its digest would make the set a mix of two sets.
        for stored_file in stored.files.values():
            try:
                digest = hashlib.sha256(read_regular_file(stored_file.copy)).hexdigest()
            except (OSError, ValueError) as exc:
                raise LastGoodError(
                    f"{stored_file.copy}: copy of {stored_file.source} cannot be read: "
                    f"{_reason(exc)}") from exc
            if digest != stored_file.sha256:
                raise LastGoodError(
                    f"{stored_file.copy}: copy of {stored_file.source} does not match the "
                    f"SHA-256 recorded in {self.manifest}")
        return stored

    def save(self, snapshot: CredentialSnapshot) -> bool:
        """Store snapshot as the last good set, unless it is stored already.

        Return whether a new set was written. Raise LastGoodError naming the folder when
        the write fails; the previous set then stays in place.
        """
        digests = snapshot.digests()
        with contextlib.suppress(LastGoodError):
            current = self.load()
            if current is not None and current.digests() == digests:
                return False

        name = SET_PREFIX + _set_digest(digests)[:16]
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.folder, 0o700)
            self._write_set(name, snapshot)
            write_atomically(self.manifest, self._manifest_bytes(name, snapshot, digests))
        except OSError as exc:
            raise LastGoodError(
                f"{self.folder}: cannot save the last good credentials: {_reason(exc)}"
            ) from exc
        self._remove_other_sets(name)
        return True

    def _write_set(self, name: str, snapshot: CredentialSnapshot) -> None:
        """Write the copies into a temporary folder, fsync them, and rename it to name."""
        target = self.folder / name
        temporary = self.folder / f".{name}.{os.getpid()}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        os.mkdir(temporary, 0o700)
        for role, (_path, data) in snapshot.files.items():
            # Each copy is fsynced, and so is the folder's entry for it.
            write_atomically(temporary / COPY_NAMES[role], data, mode=0o600)

        # A folder of this name is left by a save that crashed before its manifest, or is
        # the set of an earlier save with the same content. Either way it is rewritten.
        shutil.rmtree(target, ignore_errors=True)
        os.rename(temporary, target)
        _fsync_folder(self.folder)

    def _manifest_bytes(self, name: str, snapshot: CredentialSnapshot,
                        digests: dict[str, str]) -> bytes:
        files = {role: {"source": str(snapshot.path(role)), "sha256": digests[role],
                        "copy": COPY_NAMES[role]}
                 for role in snapshot.files}
        document = {"version": MANIFEST_VERSION, "set": name,
                    "saved_ms": int(time.time() * 1000), "files": files}
        return (json.dumps(document, indent=2) + "\n").encode()

    def _parse(self, data: bytes) -> StoredSet:
        try:
            document = json.loads(data)
            if not isinstance(document, dict) or document.get("version") != MANIFEST_VERSION:
                raise ValueError(f"expected a JSON object with version {MANIFEST_VERSION}")
            name = document["set"]
            if not isinstance(name, str) or not name.startswith(SET_PREFIX) or "/" in name:
                raise ValueError(f"invalid set name {name!r}")
            folder = self.folder / name
            files = {}
            for role, item in document["files"].items():
                if role not in COPY_NAMES:
                    raise ValueError(f"unknown credential setting {role!r}")
                files[role] = StoredFile(Path(item["source"]), str(item["sha256"]),
                                         folder / COPY_NAMES[role])
            return StoredSet(folder, int(document["saved_ms"]), files)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LastGoodError(f"{self.manifest}: invalid content: {exc}") from exc

    def _remove_other_sets(self, keep: str) -> None:
        """Delete the sets and temporary folders that the manifest no longer names."""
        for entry in self.folder.iterdir():
            if entry.name == keep or entry.name == MANIFEST_FILE or not entry.is_dir():
                continue
            if entry.name.startswith((SET_PREFIX, f".{SET_PREFIX}")):
                shutil.rmtree(entry, ignore_errors=True)


def _set_digest(digests: dict[str, str]) -> str:
    lines = "".join(f"{role}={digests[role]}\n" for role, _copy in ROLES if role in digests)
    return hashlib.sha256(lines.encode()).hexdigest()


def _fsync_folder(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
