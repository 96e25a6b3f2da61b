"""Checking and installing new credential files: `plcbridge rotate` and the cloud's
rotate_credentials command.

A candidate is checked together with the configured files that stay in place, so a new
client certificate is checked against the key on disk, and a new certificate and key
against each other. Each candidate is first written to a temporary file next to its target,
with the target's mode and owner. The whole set is validated with the temporary files in
place of their targets, and only a valid set is renamed over the targets. A rejected
candidate leaves every file as it was. The credential watcher then notices the new content
and restarts the uplink, as for any change.

Two rules guard a pushed set on top of the validation. A connection string may name only
hosts in credentials.allowed_hosts, by default the hosts of the connection string in place,
so a push cannot move the gateway to another hub. A CA bundle arriving from the cloud is
installed only when credentials.accept_pushed_ca_bundle is true, because a pushed root
could let another server pose as the hub. The command line may install one regardless: its
user can write the CA file anyway, and the command only adds the validation.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.atomic_file import sync_folder, write_temporary
from common.config import CredentialSettings
from common.credential_files import (
    CredentialSet,
    check_certificate_validity,
    validate_credential_files,
)
from common.credentials import (
    EXPIRED,
    ConnectionString,
    CredentialFileError,
    check_validity,
    read_connection_string,
    read_regular_file,
)
from common.errors import CredentialError

# Origins of a rotation.
FROM_CLI = "cli"
FROM_CLOUD = "cloud"


@dataclass(frozen=True)
class _Kind:
    setting: str  # the CredentialSettings field that names the target
    label: str  # what the file is, for messages
    new_file_mode: int  # mode of a target that does not exist yet


# In the order of installation: the connection string goes last, so that a string that
# switches to X.509 finds its certificate and key already in place.
KINDS: dict[str, _Kind] = {
    "ca_bundle": _Kind("ca_file", "CA bundle", 0o644),
    "client_key": _Kind("client_key_file", "client key", 0o600),
    "client_cert": _Kind("client_cert_file", "client certificate", 0o644),
    "connection_string": _Kind("connection_string_file", "connection string", 0o600),
}


@dataclass(frozen=True)
class Candidate:
    """New content for one credential file. source names where it came from, for messages:
    the operator's file, or the command argument."""

    kind: str
    source: str
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class InstallResult:
    """The files replaced, those whose content was already the same, and what the new set
    holds, without secrets."""

    changed: tuple[Path, ...]
    unchanged: tuple[Path, ...]
    details: dict[str, str]


class RotationRejectedError(CredentialError):
    """A candidate that was not installed. The message names its source and the reason."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}; the installed credential files are unchanged")
        self.source = source
        self.reason = reason


class InstallFailedError(CredentialError):
    """A valid set that could not be installed: a file could not be written or renamed.

    replaced lists the targets already renamed into place before the failure, usually none.
    """

    def __init__(self, source: str, reason: str, replaced: tuple[Path, ...] = ()) -> None:
        done = (f"; already replaced: {', '.join(map(str, replaced))}" if replaced
                else "; the installed credential files are unchanged")
        super().__init__(f"{source}: {reason}{done}")
        self.source = source
        self.reason = reason
        self.replaced = replaced


def install_credentials(
    settings: CredentialSettings, candidates: list[Candidate], origin: str,
    now_s: float | None = None,
) -> InstallResult:
    """Validate the candidates with the files in place, then install them atomically.

    Raises RotationRejectedError, with every file left as it was, when a candidate is
    refused or the resulting set would be invalid, and InstallFailedError when a file
    cannot be written or renamed.
    """
    targets = _targets(settings, candidates, origin)
    temporaries: dict[str, Path] = {}
    try:
        for candidate in candidates:
            temporaries[candidate.kind] = _write_candidate(candidate, targets[candidate.kind])

        loaded = _validate(settings, candidates, temporaries)
        by_kind = {candidate.kind: candidate for candidate in candidates}
        if "connection_string" in by_kind:
            _check_hosts(settings, loaded.connection, by_kind["connection_string"].source)
        _check_expiry(settings, loaded, by_kind, now_s)

        changed, unchanged = _rename_all(candidates, temporaries, targets)
    finally:
        for temporary in temporaries.values():
            with contextlib.suppress(OSError):
                temporary.unlink()
    return InstallResult(changed, unchanged, describe_set(loaded))


def describe_set(loaded: CredentialSet) -> dict[str, str]:
    """Return what a credential set holds, without a key, token or signature."""
    details: dict[str, str] = {"ca_certificates": str(loaded.ca_certificate_count)}
    if loaded.connection is not None:
        details.update(device=loaded.connection.client_id, host=loaded.connection.host_name,
                       scheme=loaded.connection.scheme)
        if loaded.connection.gateway_host_name:
            details["gateway_host"] = loaded.connection.gateway_host_name
    certificate = loaded.client_certificate
    if certificate is not None:
        details.update(client_certificate=certificate.subject,
                       not_after=f"{certificate.not_after:%Y-%m-%dT%H:%M:%SZ}")
    return details


def _targets(settings: CredentialSettings, candidates: list[Candidate],
             origin: str) -> dict[str, Path]:
    """Map each candidate to the configured file it replaces, refusing what may not go in."""
    targets: dict[str, Path] = {}
    for candidate in candidates:
        kind = KINDS[candidate.kind]
        if candidate.kind in targets:
            raise RotationRejectedError(candidate.source, f"a second {kind.label} in one rotation")
        configured: Path | None = getattr(settings, kind.setting)
        if configured is None:
            raise RotationRejectedError(
                candidate.source,
                f"credentials.{kind.setting} is not set, so this gateway has no {kind.label} "
                "to replace; set it in the configuration first",
            )
        if candidate.kind == "ca_bundle" and origin != FROM_CLI and not (
                settings.accept_pushed_ca_bundle):
            raise RotationRejectedError(
                candidate.source,
                "a CA bundle from the cloud is installed only when "
                "credentials.accept_pushed_ca_bundle is true; install it on the gateway with "
                "plcbridge rotate --ca-bundle-file",
            )
        # A target behind a symbolic link is replaced where the link points, keeping the link.
        targets[candidate.kind] = configured.resolve()
    return targets


def _write_candidate(candidate: Candidate, target: Path) -> Path:
    """Write the candidate next to its target, with the target's mode and owner."""
    try:
        current = os.stat(target)
    except FileNotFoundError:
        mode, owner = KINDS[candidate.kind].new_file_mode, None
    except OSError as exc:
        raise InstallFailedError(
            candidate.source, f"cannot read the mode and owner of {target}: {exc.strerror}"
        ) from exc
    else:
        mode, owner = stat.S_IMODE(current.st_mode), (current.st_uid, current.st_gid)
        if owner == (os.geteuid(), os.getegid()):
            owner = None

    try:
        return write_temporary(target, candidate.data, mode, owner)
    except PermissionError as exc:
        ids = "" if owner is None else f" (owner uid {owner[0]}, gid {owner[1]})"
        raise InstallFailedError(
            candidate.source,
            f"cannot write a file in {target.parent} with the mode and owner of {target}{ids}: "
            f"{exc.strerror}; run the command as the owner of the file or as root",
        ) from exc
    except OSError as exc:
        raise InstallFailedError(
            candidate.source, f"cannot write a file in {target.parent}: {exc.strerror}"
        ) from exc


def _validate(settings: CredentialSettings, candidates: list[Candidate],
              temporaries: dict[str, Path]) -> CredentialSet:
    """Validate the configured set with each candidate's temporary file in its place."""
    swapped: dict[str, Any] = {KINDS[kind].setting: path for kind, path in temporaries.items()}
    trial = replace(settings, **swapped)
    try:
        return validate_credential_files(trial)
    except CredentialFileError as exc:
        # Messages name the temporary files, which mean nothing to the reader, so name the
        # sources instead.
        names = {str(temporaries[c.kind]): c.source for c in candidates}
        reason = exc.reason
        for temporary, source in names.items():
            reason = reason.replace(temporary, source)
        culprit = names.get(str(exc.path))
        if culprit is None:
            # A file in place that does not fit the candidate, such as the key on disk.
            kinds = ", ".join(KINDS[c.kind].label for c in candidates)
            culprit = ", ".join(c.source for c in candidates)
            reason = f"the new {kinds} does not fit {exc.path}: {reason}"
        raise RotationRejectedError(culprit, reason) from exc


def _check_hosts(settings: CredentialSettings, connection: ConnectionString | None,
                 source: str) -> None:
    """Refuse a connection string that names a host outside the allowed ones."""
    if connection is None:
        return
    allowed, allowed_from = _allowed_hosts(settings, source)
    named = [connection.host_name]
    if connection.gateway_host_name:
        named.append(connection.gateway_host_name)
    for host in named:
        if host.lower() not in allowed:
            raise RotationRejectedError(
                source,
                f"host {host!r} is not allowed ({allowed_from}: {', '.join(sorted(allowed))}); "
                "add it to credentials.allowed_hosts to move the gateway to that host",
            )


def _allowed_hosts(settings: CredentialSettings, source: str) -> tuple[set[str], str]:
    if settings.allowed_hosts:
        return set(settings.allowed_hosts), "credentials.allowed_hosts"

    path = settings.connection_string_file
    assert path is not None  # a connection string candidate needs one, see _targets
    try:
        current = read_connection_string(path)
    except CredentialFileError as exc:
        raise RotationRejectedError(
            source,
            f"the installed connection string cannot be read ({exc.reason}), so no host is "
            "known to be allowed; list the hosts in credentials.allowed_hosts",
        ) from exc
    hosts = {current.host_name.lower()}
    if current.gateway_host_name:
        hosts.add(current.gateway_host_name.lower())
    return hosts, f"the hosts of the installed {path}"


def _check_expiry(settings: CredentialSettings, loaded: CredentialSet,
                  candidates: dict[str, Candidate], now_s: float | None) -> None:
    """Refuse a new SAS token or client certificate that has already expired."""
    connection = loaded.connection
    if "connection_string" in candidates and connection is not None and connection.token:
        now = time.time() if now_s is None else now_s
        token = check_validity("SAS token", connection.token.expiry_s, now, 0.0, 0.0)
        if token.state == EXPIRED:
            raise RotationRejectedError(candidates["connection_string"].source, token.message)

    certificate = loaded.client_certificate
    if certificate is not None and ("client_cert" in candidates or "client_key" in candidates):
        validity = check_certificate_validity(certificate, settings, now_s)
        if validity.state == EXPIRED:
            source = candidates.get("client_cert", candidates.get("client_key"))
            assert source is not None
            raise RotationRejectedError(source.source, validity.message)


def _rename_all(candidates: list[Candidate], temporaries: dict[str, Path],
                targets: dict[str, Path]) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """Rename each changed candidate over its target, in the order of KINDS."""
    changed: list[Path] = []
    unchanged: list[Path] = []
    by_kind = {candidate.kind: candidate for candidate in candidates}
    for kind in KINDS:
        candidate = by_kind.get(kind)
        if candidate is None:
            continue
        target = targets[kind]
        if _same_content(target, candidate.data):
            unchanged.append(target)
            continue
        try:
            os.replace(temporaries[kind], target)
        except OSError as exc:
            raise InstallFailedError(
                candidate.source, f"cannot replace {target}: {exc.strerror}", tuple(changed)
            ) from exc
        changed.append(target)

    for folder in {target.parent for target in changed}:
        try:
            sync_folder(folder)
        except OSError as exc:
            raise InstallFailedError(
                ", ".join(c.source for c in candidates),
                f"cannot fsync {folder}: {exc.strerror}; a power cut may undo the rename",
                tuple(changed),
            ) from exc
    return tuple(changed), tuple(unchanged)


def _same_content(target: Path, data: bytes) -> bool:
    try:
        return read_regular_file(target) == data
    except (OSError, ValueError):
        return False
