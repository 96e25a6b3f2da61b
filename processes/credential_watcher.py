"""The credential watcher: restarts the uplink when its credential files change.

Every credentials.check_interval_s the watcher stats each credential file and hashes the
content of those whose mtime, size or inode changed. It also re-hashes every file at least
every credentials.rehash_interval_s, which catches a rewrite that keeps all three. A new set
of content must stay the same for one more check before the watcher acts, so a rotation
written file by file is validated once, whole.

A valid new set restarts only the uplink program, through supervisord's XML-RPC socket. An
invalid set is logged once and the running uplink is left alone. When supervisord cannot be
reached, the restart is retried on every check until it succeeds.

Run it with `python -m processes.credential_watcher --config FILE`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from common import wire
from common.config import Config
from common.credential_files import (
    CredentialFileError,
    CredentialSet,
    SasExpiry,
    check_sas_expiry,
    validate_credential_files,
)
from common.errors import PlcBridgeError
from common.lifecycle import gateway_version, run_process
from common.logs import fields
from common.supervisor_rpc import RestartError, SupervisorClient, SupervisorUnavailableError
from common.tap import Tap

PROCESS = "credential_watcher"

# The loop wakes at least this often, so the once-a-second tap counters stay on time.
TICK_S = 0.25

# While supervisord stays unreachable, repeat the ERROR at most this often.
UNREACHABLE_LOG_INTERVAL_S = 60.0

# The content state of one file: its SHA-256, or why it could not be read.
Digests = tuple[str, ...]


@dataclass
class _FileState:
    signature: tuple[int, int, int] | None  # st_mtime_ns, st_size, st_ino, or None: no stat
    digest: str
    hashed_at_s: float  # time.monotonic() of the last hash


class FileHasher:
    """Stats the watched files and re-hashes those that changed or are due for a re-hash."""

    def __init__(self, paths: tuple[Path, ...], rehash_interval_s: float,
                 logger: logging.Logger) -> None:
        self.paths = paths
        self.rehash_interval_s = rehash_interval_s
        self.logger = logger
        now = time.monotonic()
        self._states = [_FileState(_stat_signature(path), _hash_file(path), now) for path in paths]

    def digests(self) -> Digests:
        return tuple(state.digest for state in self._states)

    def look(self) -> Digests:
        """Stat every file, re-hash where needed, and return the content state of each."""
        now = time.monotonic()
        for path, state in zip(self.paths, self._states, strict=True):
            signature = _stat_signature(path)
            stat_changed = signature != state.signature
            if not stat_changed and now - state.hashed_at_s < self.rehash_interval_s:
                continue

            digest = _hash_file(path)
            if stat_changed and digest == state.digest:
                self.logger.debug("file_touched content unchanged %s", fields(file=path))
            state.signature = signature
            state.digest = digest
            state.hashed_at_s = now
        return self.digests()


def _stat_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        result = os.stat(path)
    except OSError:
        return None
    return result.st_mtime_ns, result.st_size, result.st_ino


def _hash_file(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        # Validation reports the full reason, so this state only has to differ from any digest.
        return f"unreadable: {exc.strerror}"


class CredentialWatcher:
    """Compares the credential files with the set the uplink runs with, and restarts it."""

    def __init__(self, config: Config, logger: logging.Logger, tap: Tap,
                 supervisor: SupervisorClient) -> None:
        self.config = config
        self.logger = logger
        self.tap = tap
        self.supervisor = supervisor
        self.program = f"{config.supervisor.group}:{config.supervisor.uplink_program}"
        self.paths = config.credentials.watched_files()
        self.hasher = FileHasher(self.paths, config.credentials.rehash_interval_s, logger)

        # running: the content the uplink was last started with, the baseline at first.
        # previous: the content at the last check, so a new set acts only once it is stable.
        # rejected: the last invalid set, reported once and not again.
        # accepted: the last valid set, kept while its restart waits for supervisord.
        self.running = self.hasher.digests()
        self.previous = self.running
        self.rejected: Digests | None = None
        self.accepted: Digests | None = None
        self.loaded: CredentialSet | None = None
        self.sas_state: str | None = None
        self.unreachable_attempts = 0
        self.next_unreachable_log_s = 0.0

        tap.counters.update(checks=0, changes=0, restarts=0, invalid=0)

    def load_baseline(self) -> None:
        """Validate the files found at start as the baseline, without restarting anything."""
        self.logger.info(
            "watching %s", fields(files=",".join(str(path) for path in self.paths),
                                  uplink=self.program, socket=self.supervisor.socket_path)
        )
        if not self._validate():
            self.rejected = self.running

    def check(self) -> None:
        """Look at the files once and act on a new, stable set of content."""
        digests = self.hasher.look()
        self.tap.counters["checks"] += 1
        stable = digests == self.previous
        self.previous = digests
        self._recheck_sas_expiry()

        if digests == self.running:
            if self.accepted is not None:
                # The files went back to what the uplink runs with before its restart.
                self.accepted = None
                self._validate()
            return
        if not stable:
            self._report_change(digests)
            return
        if digests == self.rejected:
            return

        if digests != self.accepted:
            if not self._validate():
                self.rejected = digests
                return
            self.accepted = digests
        if self._restart_uplink():
            self.running = digests
            self.accepted = None

    def _report_change(self, digests: Digests) -> None:
        changed = [str(path) for path, old, new in zip(self.paths, self.running, digests,
                                                       strict=True) if old != new]
        self.tap.counters["changes"] += 1
        self.tap.publish("credentials_changed", files=changed)
        self.logger.info("credentials_changed %s", fields(files=",".join(changed)))

    def _validate(self) -> bool:
        """Load the whole set. Log it and its SAS expiry when valid, or the bad file when not."""
        try:
            loaded = validate_credential_files(self.config.credentials)
        except CredentialFileError as exc:
            self.tap.counters["invalid"] += 1
            self.tap.publish("credentials_invalid", file=str(exc.path), reason=exc.reason)
            self.logger.error(
                "credentials_invalid %s; the uplink is not restarted until the file is fixed",
                fields(file=exc.path, reason=exc.reason),
            )
            return False

        self.loaded = loaded
        self._log_loaded(loaded)
        self.sas_state = None
        self._recheck_sas_expiry()
        return True

    def _log_loaded(self, loaded: CredentialSet) -> None:
        details: dict[str, object] = {"ca_certificates": loaded.ca_certificate_count}
        if loaded.connection is not None:
            details.update(scheme=loaded.connection.scheme, host=loaded.connection.host_name,
                           device=loaded.connection.client_id)
        if loaded.client_certificate is not None:
            details.update(client_certificate=loaded.client_certificate.subject,
                           not_after=f"{loaded.client_certificate.not_after:%Y-%m-%dT%H:%M:%SZ}")
        self.logger.info("credentials_loaded %s", fields(**details))

        certificate = loaded.client_certificate
        if certificate is not None and certificate.not_after.timestamp() <= time.time():
            self.logger.warning(
                "client_certificate_expired %s; TLS connects will fail until it is renewed",
                fields(subject=certificate.subject,
                       not_after=f"{certificate.not_after:%Y-%m-%dT%H:%M:%SZ}"),
            )

    def _recheck_sas_expiry(self) -> None:
        """Log the SAS expiry check at a load and whenever its state changes afterwards."""
        if self.loaded is None:
            return
        expiry = check_sas_expiry(self.loaded.connection, self.config.credentials,
                                  self.config.uplink)
        if expiry.state == self.sas_state:
            return
        self.sas_state = expiry.state
        self._log_sas_expiry(expiry)

    def _log_sas_expiry(self, expiry: SasExpiry) -> None:
        now_s = int(time.time())
        self.tap.publish("sas_expiry", state=expiry.state, se=expiry.expiry_s, now=now_s)
        if expiry.state in ("valid", "not_applicable"):
            self.logger.info("sas_expiry %s", expiry.message)
        else:
            self.logger.warning(
                "sas_expiry %s; the hub rejects the uplink once the token has expired",
                expiry.message,
            )

    def _restart_uplink(self) -> bool:
        """Restart the uplink program and return False when the next check should try again."""
        try:
            result = self.supervisor.restart(self.program)
        except SupervisorUnavailableError as exc:
            self._report_unreachable(exc)
            return False
        except RestartError as exc:
            # A retry would repeat the same fault, and supervisord restarts a failed uplink on
            # its own, with the new files, so this set counts as applied.
            self.tap.publish("restart_failed", program=self.program, reason=str(exc))
            self.logger.error("restart_failed %s", fields(program=self.program, reason=exc))
            return True

        if self.unreachable_attempts:
            self.logger.info("supervisord_reachable %s",
                             fields(failed_attempts=self.unreachable_attempts))
            self.unreachable_attempts = 0
            self.next_unreachable_log_s = 0.0
        if result.action == "leave":
            self.logger.info(
                "uplink_not_restarted %s; it reads the new credentials when it is started",
                fields(program=self.program, state=result.state_before),
            )
            return True

        self.tap.counters["restarts"] += 1
        self.tap.publish("uplink_restarted", program=self.program, pid_before=result.pid_before,
                         pid_after=result.pid_after, state_before=result.state_before)
        self.logger.info("uplink_restarted %s", fields(
            program=self.program, state_before=result.state_before,
            pid_before=result.pid_before, pid_after=result.pid_after))
        return True

    def _report_unreachable(self, exc: SupervisorUnavailableError) -> None:
        self.unreachable_attempts += 1
        now = time.monotonic()
        if self.unreachable_attempts == 1:
            self.tap.publish("restart_failed", program=self.program, reason=str(exc))
        if now < self.next_unreachable_log_s:
            return
        self.next_unreachable_log_s = now + UNREACHABLE_LOG_INTERVAL_S
        self.logger.error(
            "restart_failed %s; the uplink keeps its old credentials, retrying every %g s",
            fields(program=self.program, attempts=self.unreachable_attempts, reason=exc),
            self.config.credentials.check_interval_s,
        )


def open_tap(context: zmq.Context[zmq.Socket[bytes]], config: Config) -> Tap:
    try:
        return Tap(context, config.gateway.runtime_dir, PROCESS)
    except zmq.ZMQError as exc:
        endpoint = wire.tap_endpoint(config.gateway.runtime_dir, PROCESS)
        raise PlcBridgeError(
            f"cannot bind the tap to {endpoint}: {exc}; check that gateway.runtime_dir exists"
        ) from exc


def watch(config: Config, logger: logging.Logger, stop: threading.Event) -> None:
    """Run the watcher until stop is set: check the files, publish counters, sleep."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        tap = open_tap(context, config)
        try:
            _run_loop(config, logger, stop, tap)
        finally:
            tap.close()
    finally:
        context.term()


def _run_loop(config: Config, logger: logging.Logger, stop: threading.Event, tap: Tap) -> None:
    watcher = CredentialWatcher(config, logger, tap, SupervisorClient(config.supervisor_socket))
    tap.publish("start", version=gateway_version(), files=[str(p) for p in watcher.paths])
    watcher.load_baseline()

    interval_s = config.credentials.check_interval_s
    next_check_s = time.monotonic() + interval_s
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_check_s:
            watcher.check()
            # Skip missed checks rather than run them back to back after a slow restart.
            next_check_s = max(next_check_s + interval_s, time.monotonic())
        tap.publish_counters_if_due()
        stop.wait(min(TICK_S, max(0.0, next_check_s - time.monotonic())))


def main() -> int:
    return run_process(PROCESS, watch)


if __name__ == "__main__":
    sys.exit(main())
