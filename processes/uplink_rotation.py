"""The rotate_credentials command: new credentials pushed from the cloud.

The command carries one or more of connection_string, client_cert_pem, client_key_pem and
ca_bundle_pem. They go through the same checks and atomic install as `plcbridge rotate`
(common/credential_install.py), with the rules for a push: a connection string may name only
allowed hosts, and a CA bundle needs credentials.accept_pushed_ca_bundle.

Installing changed files makes the credential watcher restart this uplink, so the result
cannot simply be published afterwards. It is stored first in <state_dir>/command-results/,
and the uplink that starts after the install publishes it once it has connected. A result
that reaches the cloud therefore also shows that the new set connects. The running uplink
publishes the result at once for a rejected push and for one that changes no file.

The pushed values are secrets: nothing here logs, stores or returns them. Results and
outcome records carry the files, the source and the reason only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.atomic_file import write_atomically
from common.config import Config
from common.credential_install import (
    FROM_CLOUD,
    Candidate,
    InstallFailedError,
    RotationRejectedError,
    install_credentials,
)
from common.credentials import MAX_CREDENTIAL_FILE_BYTES, read_regular_file
from common.logs import fields
from common.rotation_outcomes import record_outcome
from processes.uplink_commands import Command, CommandResult

COMMAND = "rotate_credentials"

# Each argument and the kind of credential file it replaces.
ARGUMENTS = {
    "connection_string": "connection_string",
    "client_cert_pem": "client_cert",
    "client_key_pem": "client_key",
    "ca_bundle_pem": "ca_bundle",
}

PENDING_FOLDER = "command-results"

STATUS_OK = "ok"
STATUS_REJECTED = "rejected"
STATUS_FAILED = "failed"
REASON_INVALID_ARGUMENT = "invalid argument"
REASON_CREDENTIALS_REJECTED = "credentials rejected"
REASON_INSTALL_FAILED = "install failed"

# The wall-clock time this process started. A stored result is published only by an uplink
# that started after the install, because only that one has read the new files.
PROCESS_START_S = time.time()


@dataclass(frozen=True)
class RotationResult:
    """The result of one rotate_credentials command, without any pushed value.

    deferred is True when the result was stored for the uplink that starts with the new
    files, so the running uplink must not publish it.
    """

    status: str
    reason: str | None
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)
    deferred: bool = False


def rotate_credentials(config: Config, request_id: str, arguments: Mapping[str, Any],
                       logger: logging.Logger) -> RotationResult:
    """Validate and install the pushed credentials, and store or return the result."""
    try:
        candidates = _candidates(arguments)
    except ValueError as exc:
        return _finish(config, request_id, logger, RotationResult(
            STATUS_REJECTED, REASON_INVALID_ARGUMENT, str(exc)))

    # The result is stored before any file is replaced, so that a restart right after the
    # install cannot lose it.
    pending = PendingResults(config.gateway.state_dir)
    body: dict[str, Any] = {
        "request_id": request_id, "command": COMMAND, "status": STATUS_OK, "reason": None,
        "message": "installed; this result is sent by the uplink that connected with the "
                   "new credentials",
    }
    try:
        stored = pending.save(request_id, body)
    except OSError as exc:
        return _finish(config, request_id, logger, RotationResult(
            STATUS_FAILED, REASON_INSTALL_FAILED,
            f"cannot store the result in {pending.folder}: {exc.strerror or exc}; nothing "
            "was installed"))

    try:
        installed = install_credentials(config.credentials, candidates, FROM_CLOUD)
    except RotationRejectedError as exc:
        pending.remove(stored)
        return _finish(config, request_id, logger, RotationResult(
            STATUS_REJECTED, REASON_CREDENTIALS_REJECTED, str(exc)))
    except InstallFailedError as exc:
        if not exc.replaced:
            pending.remove(stored)
            return _finish(config, request_id, logger, RotationResult(
                STATUS_FAILED, REASON_INSTALL_FAILED, str(exc)))
        # Some files were replaced, so the watcher restarts this uplink: the stored result
        # stays, marked failed, for the next one.
        body.update(status=STATUS_FAILED, reason=REASON_INSTALL_FAILED, message=str(exc),
                    files=[str(path) for path in exc.replaced])
        pending.rewrite(stored, body, logger)
        return _finish(config, request_id, logger, RotationResult(
            STATUS_FAILED, REASON_INSTALL_FAILED, str(exc),
            {"files": [str(path) for path in exc.replaced]}, deferred=True))

    details = {"files": [str(path) for path in installed.changed],
               "credentials": installed.details}
    if not installed.changed:
        pending.remove(stored)
        return _finish(config, request_id, logger, RotationResult(
            STATUS_OK, None, "the pushed credentials are already installed; nothing changed",
            details))
    body.update(details)
    pending.rewrite(stored, body, logger)
    return _finish(config, request_id, logger, RotationResult(
        STATUS_OK, None, "installed; the credential watcher restarts the uplink with them",
        details, deferred=True))


class RotationCommand:
    """The dispatcher's handler of rotate_credentials, and the results stored for this uplink.

    A stored result stays on disk until the broker has acknowledged it, so an uplink that
    stops before the PUBACK leaves it for the next one, and it may arrive twice.
    """

    def __init__(self, config: Config, logger: logging.Logger,
                 started_s: float = PROCESS_START_S) -> None:
        self._config = config
        self._logger = logger
        self._started_s = started_s
        self._pending = PendingResults(config.gateway.state_dir)
        self._handed: dict[str, Path] = {}  # request_id: stored file, until its PUBACK

    def handle(self, command: Command) -> CommandResult | None:
        """Run the command; return its result, or None when the next uplink sends it."""
        result = rotate_credentials(self._config, command.request_id, command.arguments,
                                    self._logger)
        if result.deferred:
            return None
        return CommandResult(command.request_id, command.name, result.status, result.reason,
                             result.message, result.details)

    def stored_results(self, on_last_good: bool = False) -> list[CommandResult]:
        """Return the results stored before this uplink started that it has not returned yet,
        for the dispatcher to report.

        on_last_good means this uplink connected with the last good credential set because
        the hub rejected the installed files, so a stored ok becomes failed.
        """
        results = []
        handed = set(self._handed.values())
        for path, body in self._pending.ready(self._started_s):
            if path in handed:
                continue
            document = json.loads(body)
            request_id = str(document.get("request_id"))
            self._handed[request_id] = path
            details = {key: value for key, value in document.items()
                       if key not in ("request_id", "command", "status", "reason", "message")}
            status = str(document.get("status"))
            reason = document.get("reason")
            message = str(document.get("message", ""))
            if on_last_good and status == STATUS_OK:
                status, reason = STATUS_FAILED, REASON_CREDENTIALS_REJECTED
                message = ("the files were installed, but the hub rejected them, so the "
                           "gateway connected with its last good credentials")
            results.append(CommandResult(request_id, COMMAND, status, reason, message, details))
        return results

    def acknowledged(self, payload: bytes) -> None:
        """Delete the stored copy of a result once the broker has acknowledged it."""
        try:
            request_id = json.loads(payload).get("request_id")
        except (ValueError, AttributeError):
            return
        path = self._handed.pop(str(request_id), None)
        if path is not None:
            self._pending.remove(path)


def _candidates(arguments: Mapping[str, Any]) -> list[Candidate]:
    """Turn the command's arguments into candidates; raise ValueError naming a bad one."""
    unknown = sorted(set(arguments) - set(ARGUMENTS))
    if unknown:
        raise ValueError(f"unknown argument {unknown[0][:64]!r}; expected one or more of "
                         f"{', '.join(ARGUMENTS)}")
    candidates = []
    for name, kind in ARGUMENTS.items():
        if name not in arguments:
            continue
        value = arguments[name]
        # The value is never quoted: it is a key, a token or a certificate.
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string")
        try:
            data = (value.strip() + "\n").encode()
        except UnicodeEncodeError:
            # The codec's message gives a position inside the secret, so it is not passed on.
            raise ValueError(f"{name} is not valid text: it contains a lone surrogate "
                             "escape, which UTF-8 cannot encode") from None
        if len(data) > MAX_CREDENTIAL_FILE_BYTES:
            raise ValueError(f"{name} is larger than {MAX_CREDENTIAL_FILE_BYTES // 1024} KiB")
        candidates.append(Candidate(kind, f"{COMMAND} argument {name}", data))
    if not candidates:
        raise ValueError(f"expected one or more of {', '.join(ARGUMENTS)}")
    return candidates


def _finish(config: Config, request_id: str, logger: logging.Logger,
            result: RotationResult) -> RotationResult:
    """Log the result and leave its outcome for the credential watcher's tap."""
    files = list(result.details.get("files", ()))
    level = logging.INFO if result.status == STATUS_OK else logging.WARNING
    logger.log(level, "credentials_pushed %s", fields(
        request_id=request_id, status=result.status, reason=result.reason,
        files=",".join(files), message=result.message))
    try:
        record_outcome(config.gateway.state_dir, {
            "source": FROM_CLOUD, "request_id": request_id, "status": result.status,
            "files": files, "reason": result.message if result.status != STATUS_OK else ""})
    except OSError as exc:
        logger.warning("rotation_outcome_not_recorded %s", fields(
            folder=config.gateway.state_dir, error=exc.strerror or exc,
            consequence="the credential watcher's tap shows no rotation event for it"))
    return result


class PendingResults:
    """Command results stored for the next uplink, one JSON file each, mode 0600."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / PENDING_FOLDER

    def save(self, request_id: str, body: dict[str, Any]) -> Path:
        """Store a result body; raise OSError when it cannot be written."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{time.time_ns():020d}-{request_id}.json"
        self._write(path, {"stored_s": time.time(), "body": body})
        return path

    def rewrite(self, path: Path, body: dict[str, Any], logger: logging.Logger) -> None:
        """Replace a stored result body. On failure the stored one stays, which is sent
        instead, so the failure is only logged."""
        try:
            self._write(path, {"stored_s": time.time(), "body": body})
        except OSError as exc:
            logger.warning("command_result_not_updated %s", fields(
                file=path, error=exc.strerror or exc,
                consequence="the cloud gets the result as it was first stored"))

    def remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def ready(self, started_s: float = PROCESS_START_S) -> list[tuple[Path, bytes]]:
        """Return the stored results that an uplink started at started_s may publish.

        Only results stored before that start qualify: a later one belongs to files that
        this uplink has not read. An unreadable file is left for the operator, not sent.
        """
        ready = []
        for path in self._files():
            try:
                document = json.loads(read_regular_file(path))
                stored_s = float(document["stored_s"])
                body = document["body"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not isinstance(body, dict):
                continue
            if stored_s < started_s:
                ready.append((path, json.dumps(body, separators=(",", ":")).encode()))
        return ready

    def _files(self) -> list[Path]:
        try:
            names = sorted(name for name in os.listdir(self.folder) if name.endswith(".json"))
        except OSError:
            return []
        return [self.folder / name for name in names]

    @staticmethod
    def _write(path: Path, document: dict[str, Any]) -> None:
        write_atomically(path, (json.dumps(document) + "\n").encode())
