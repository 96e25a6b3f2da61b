"""The credential watcher: restarts the uplink when its credential files change.

Every credentials.check_interval_s the watcher stats each credential file and hashes the
content of those whose mtime, ctime, size or inode changed, or that changed within a second
of their last hash. It also re-hashes every file at least every
credentials.rehash_interval_s. A new set of content must stay the same for
credentials.settle_s before the watcher acts, so a rotation written file by file is
validated once, whole. A set that fails validation within INVALID_GRACE_S of its last
change is validated again at the next check before it is reported.

A valid new set restarts only the uplink program, through supervisord's XML-RPC socket. An
invalid set is logged once and the running uplink is left alone. A restart waits while
supervisord starts or stops the uplink, or while the uplink's tap shows a connect without
CONNACK (processes/uplink_link_state.py), for at most one connect attempt's time. When
supervisord cannot be reached, the restart is retried on every check until it succeeds.

After each restart the watcher stores the SHA-256 of every file in
<state_dir>/credentials-applied.json, so that a restarted watcher can tell which set the
uplink was started with. At start, files that differ from that record are a change like
any other, unless the uplink provably read them: see CredentialWatcher._find_running_set.

Run it with `python -m processes.credential_watcher --config FILE`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import zmq

from common.atomic_file import write_atomically
from common.config import Config
from common.credential_files import (
    CredentialFileError,
    CredentialSet,
    SasExpiry,
    check_certificate_validity,
    check_readable,
    check_sas_expiry,
    validate_credential_files,
)
from common.credentials import EXPIRED, NOT_YET_VALID, read_regular_file
from common.lifecycle import gateway_version, run_process
from common.logs import fields
from common.rotation_outcomes import take_outcomes
from common.supervisor_rpc import RestartError, SupervisorClient, SupervisorUnavailableError
from common.tap import Tap
from processes.uplink_link_state import UplinkLinkState

PROCESS = "credential_watcher"

# The loop wakes at least this often, so the once-a-second tap counters stay on time.
TICK_S = 0.25

# A set that fails validation this soon after its last change may be a file written in
# several steps and caught between two of them. It is validated again at each check and
# reported only once it has stayed the same this long.
INVALID_GRACE_S = 2.0

# supervisord states in which a start or stop of the uplink is under way. A restart waits
# for them to end, so that two restarts never overlap.
BUSY_STATES = ("STARTING", "STOPPING")

# A connecting uplink gives up after connect_timeout_s for TCP and TLS, and as long again
# for the CONNACK. A restart waits that long, plus this margin, before it goes ahead.
DEFER_MARGIN_S = 2.0

# While supervisord stays unreachable, repeat the ERROR at most this often.
UNREACHABLE_LOG_INTERVAL_S = 60.0

# The content state of one file: its SHA-256, or why it could not be read.
Digests = tuple[str, ...]

# The stat fields that show a change: st_mtime_ns, st_ctime_ns, st_size and st_ino.
# The ctime catches a file renamed into place with its old mtime, its old size and a
# recycled inode number, because the kernel sets it at the rename and no tool can set it.
Signature = tuple[int, int, int, int]

# A file whose ctime is at most this long before its last hash, or later, is hashed again
# at every check. The kernel stamps ctime and mtime from a clock tick that can lag
# time.time() by some milliseconds, so a same-size rewrite in the tick of the hash may
# leave every stat field as it was. A wall clock set back by N seconds keeps the files
# written in those N seconds in this state until the clock has caught up, which costs a
# hash of each at every check meanwhile.
RACY_WINDOW_NS = 1_000_000_000

# The state of a file that could not be read starts with this, so it differs from any digest.
UNREADABLE = "unreadable: "

APPLIED_RECORD_FILE = "credentials-applied.json"
APPLIED_RECORD_VERSION = 1
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

# Content states that stand in for a file's recorded digest when the record has none for it.
NOT_RECORDED = "not in the applied record"
UNREADABLE_WHEN_RECORDED = "unreadable when the applied record was written"

# supervisord reports a program's start in whole seconds, rounded down, and the kernel stamps a
# file's ctime from a clock that can lag time.time() by a tick. A file changed less than this
# before the uplink's reported start may have been read in its old form, so it does not count
# as read.
START_MARGIN_S = 1.0


@dataclass
class _FileState:
    signature: Signature | None  # None: the file could not be stat'ed
    digest: str
    hashed_at_s: float  # time.monotonic() of the last hash
    hashed_at_ns: int  # time.time_ns() just before the last hash

    def changed_near_hash(self) -> bool:
        """Return True when the file changed so close to its last hash that a write in the
        same clock tick could have kept every stat field."""
        return (self.signature is not None
                and self.signature[1] >= self.hashed_at_ns - RACY_WINDOW_NS)


class FileHasher:
    """Stats the watched files and re-hashes those that changed or are due for a re-hash."""

    def __init__(self, paths: tuple[Path, ...], rehash_interval_s: float,
                 logger: logging.Logger) -> None:
        self.paths = paths
        self.rehash_interval_s = rehash_interval_s
        self.logger = logger
        now = time.monotonic()
        self._states = []
        for path in paths:
            signature, hashed_at_ns = _stat_signature(path), time.time_ns()
            self._states.append(_FileState(signature, _hash_file(path), now, hashed_at_ns))

    def digests(self) -> Digests:
        return tuple(state.digest for state in self._states)

    def look(self) -> Digests:
        """Stat every file, re-hash where needed, and return the content state of each.

        A file is hashed again when a stat field changed, when it changed within
        RACY_WINDOW_NS of its last hash, or every rehash_interval_s.
        """
        now = time.monotonic()
        for path, state in zip(self.paths, self._states, strict=True):
            signature = _stat_signature(path)
            stat_changed = signature != state.signature
            due = now - state.hashed_at_s >= self.rehash_interval_s
            if not (stat_changed or due or state.changed_near_hash()):
                continue

            hashed_at_ns = time.time_ns()
            digest = _hash_file(path)
            if stat_changed and digest == state.digest:
                self.logger.debug("file_touched content unchanged %s", fields(file=path))
            state.signature = signature
            state.digest = digest
            state.hashed_at_s = now
            state.hashed_at_ns = hashed_at_ns
        return self.digests()


def _stat_signature(path: Path) -> Signature | None:
    try:
        result = os.stat(path)
    except OSError:
        return None
    return result.st_mtime_ns, result.st_ctime_ns, result.st_size, result.st_ino


def _hash_file(path: Path) -> str:
    try:
        digest = hashlib.sha256(read_regular_file(path)).hexdigest()
    except OSError as exc:
        # Validation reports the full reason, so this state only has to differ from any digest.
        return f"{UNREADABLE}{exc.strerror}"
    except ValueError as exc:
        # A FIFO, a device or an oversized file: validation names it.
        return f"{UNREADABLE}{exc}"

    # A root watcher reads a file whose mode denies its owner, and validation rejects it.
    # The state records the denial, so that a chmod alone, which leaves the content as it
    # was, is a change that the watcher validates again.
    try:
        check_readable(path)
    except CredentialFileError:
        return f"{UNREADABLE}no read permission by mode or owner, content {digest}"
    return digest


def _last_change_s(paths: tuple[Path, ...]) -> float | None:
    """Return the newest ctime of the files and their last path components, or None if unknown.

    On Linux's common filesystems the ctime moves on every write, rename and chmod, and unlike
    the mtime no copy tool can set it back. A file whose ctime is older than a moment therefore
    had the same content at that moment.
    """
    newest = 0.0
    for path in paths:
        try:
            # lstat covers a symbolic link re-pointed at a file that is older than the link.
            newest = max(newest, os.stat(path).st_ctime, os.lstat(path).st_ctime)
        except OSError:
            return None
    return newest


def _format_time(timestamp_s: float) -> str:
    return f"{datetime.fromtimestamp(timestamp_s, UTC):%Y-%m-%dT%H:%M:%SZ}"


class AppliedRecord:
    """The record of the credential set the uplink was last started with.

    <state_dir>/credentials-applied.json maps each file's path to its SHA-256, or to null for a
    file that could not be read, and never contains file content. It is replaced atomically
    with mode 0600. A record that cannot be read or parsed is logged and treated as missing.
    """

    def __init__(self, state_dir: Path, logger: logging.Logger) -> None:
        self.path = state_dir / APPLIED_RECORD_FILE
        self.logger = logger

    def read(self) -> dict[str, str | None] | None:
        """Return the recorded digest of each path, or None when there is no usable record."""
        try:
            return _parse_record(read_regular_file(self.path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            reason = exc.strerror or str(exc)
        except ValueError as exc:
            reason = f"invalid content: {exc}"

        self.logger.warning(
            "applied_record_invalid %s; ignoring it, so the current files count as the set "
            "the uplink runs with, and a rotation made while the watcher was down reaches the "
            "uplink only at its next restart",
            fields(file=self.path, reason=reason),
        )
        return None

    def write(self, paths: tuple[Path, ...], digests: Digests) -> None:
        """Store digests as the set the uplink runs with. A failure is logged, not raised."""
        files = {str(path): _recorded_digest(digest)
                 for path, digest in zip(paths, digests, strict=True)}
        document = {"version": APPLIED_RECORD_VERSION, "files": files}
        data = (json.dumps(document, indent=2) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, data)
        except OSError as exc:
            self.logger.warning(
                "applied_record_write_failed %s; until it is written, a watcher restart may "
                "restart the uplink needlessly or miss a rotation; check gateway.state_dir",
                fields(file=self.path, reason=exc.strerror or exc),
            )
            return
        self.logger.debug("applied_record_written %s", fields(file=self.path))


def _recorded_digest(digest: str) -> str | None:
    return None if digest.startswith(UNREADABLE) else digest


def _parse_record(data: bytes) -> dict[str, str | None]:
    """Parse the record's JSON and raise ValueError, naming what is wrong, on any other shape."""
    # json.loads raises JSONDecodeError and UnicodeDecodeError, both ValueErrors.
    document = json.loads(data)
    if not isinstance(document, dict) or document.get("version") != APPLIED_RECORD_VERSION:
        raise ValueError(f"expected a JSON object with version {APPLIED_RECORD_VERSION}")

    files = document.get("files")
    if not isinstance(files, dict):
        raise ValueError("expected a files object")
    for path, digest in files.items():
        if digest is not None and not (isinstance(digest, str) and SHA256_HEX.fullmatch(digest)):
            raise ValueError(f"the digest of {path} is neither a SHA-256 hex string nor null")
    return files


def _running_from_record(record: dict[str, str | None], paths: tuple[Path, ...],
                         current: Digests) -> Digests:
    """Rebuild the content state of the recorded set, in the order of paths.

    A file whose recorded digest matches keeps its current state, so equal sets compare equal.
    Paths in the record that the configuration no longer names are ignored, because a new list
    of files reaches the uplink only with a new configuration, which needs its own restart.
    """
    running = []
    for path, digest in zip(paths, current, strict=True):
        recorded = record.get(str(path), NOT_RECORDED)
        if recorded == _recorded_digest(digest):
            running.append(digest)
        else:
            running.append(recorded or UNREADABLE_WHEN_RECORDED)
    return tuple(running)


@dataclass(frozen=True)
class _Rejection:
    """The reason a set of credential files may not replace the one the uplink runs with."""

    file: Path  # the file named on the tap
    reason: str  # the reason on the tap
    details: str  # the key=value fields of the log line, naming the file or files
    consequence: str  # what the watcher does about it, for the log line


class CredentialWatcher:
    """Compares the credential files with the set the uplink runs with, and restarts it."""

    def __init__(self, config: Config, logger: logging.Logger, tap: Tap,
                 supervisor: SupervisorClient, link: UplinkLinkState | None = None) -> None:
        self.config = config
        self.logger = logger
        self.tap = tap
        self.supervisor = supervisor
        self.link = link
        self.program = f"{config.supervisor.group}:{config.supervisor.uplink_program}"
        self.paths = config.credentials.watched_files()
        self.hasher = FileHasher(self.paths, config.credentials.rehash_interval_s, logger)
        self.record = AppliedRecord(config.gateway.state_dir, logger)

        # running: the content the uplink was last started with; load_baseline sets it.
        # previous: the content at the last check, and changed_s when it first looked so.
        #   A new set acts only once it has stayed the same for credentials.settle_s.
        # rejected: the last invalid set, reported once and not again.
        # accepted: the last valid set, kept while its restart waits for supervisord.
        # deferred_s: when the pending restart was first deferred, or None.
        self.running = self.hasher.digests()
        self.previous = self.running
        self.changed_s = time.monotonic()
        self.deferred_s: float | None = None
        self.rejected: Digests | None = None
        self.accepted: Digests | None = None
        self.loaded: CredentialSet | None = None
        self.sas_state: str | None = None
        self.unreachable_attempts = 0
        self.next_unreachable_log_s = 0.0

        tap.counters.update(checks=0, changes=0, restarts=0, invalid=0, deferred=0)

    def load_baseline(self) -> None:
        """Find the set the uplink runs with, validate the files, and act on a missed change."""
        self.logger.info(
            "watching %s", fields(files=",".join(str(path) for path in self.paths),
                                  uplink=self.program, socket=self.supervisor.socket_path)
        )
        current = self.hasher.digests()
        self.running = self._find_running_set(current)
        if current == self.running:
            if not self._validate(for_restart=False):
                self.rejected = current
            return

        # The files changed while no watcher ran. A set whose last change is settle_s old is
        # as stable as one that checks saw unchanged that long, so it is acted on now. A
        # newer one waits for the checks, which find it settled or report the next change.
        self._report_change(current)
        changed_s = _last_change_s(self.paths)
        settled = (changed_s is not None
                   and time.time() - changed_s >= self.config.credentials.settle_s)
        if not settled:
            return
        self.changed_s -= INVALID_GRACE_S  # as old as a set of unknown age can be
        if not self._validate(for_restart=True):
            self.rejected = current
            return
        self.accepted = current
        self._apply(current)

    def _find_running_set(self, current: Digests) -> Digests:
        """Return the content state of the set the uplink runs with, from the applied record.

        Without a record (first start, or one that cannot be read) the current files are that
        set, and a new record stores them. A record that matches them changes nothing. With
        one that differs, the uplink runs with the current files only when it provably read
        them, because it is RUNNING or STARTING and started after their last change. That
        spares a restart after a gateway start with files rotated while it was down. An uplink
        start after the record was written is no proof, because a rotation may have followed
        that start. In every other case the uplink is restarted, which costs one reconnect.
        The record written after that restart matches the files, so the next watcher start
        restarts nothing unless the record could not be written.
        """
        record = self.record.read()
        if record is None:
            self.logger.info("applied_record_created %s; the uplink is taken to run with the "
                             "current files", fields(file=self.record.path))
            self.record.write(self.paths, current)
            return current

        running = _running_from_record(record, self.paths, current)
        if running == current:
            self.logger.info("applied_record_matches %s", fields(file=self.record.path))
            return current
        if self._uplink_read_current_files():
            self.record.write(self.paths, current)
            return current
        return running

    def _uplink_read_current_files(self) -> bool:
        """Return True when supervisord reports the uplink started after the files last changed."""
        try:
            info = self.supervisor.process_info(self.program)
        except (SupervisorUnavailableError, RestartError) as exc:
            self.logger.info("uplink_start_unknown %s; the files are applied as a change",
                             fields(program=self.program, reason=exc))
            return False

        state = info["statename"]
        started_s: int = info["start"]
        changed_s = _last_change_s(self.paths)
        details = fields(program=self.program, state=state, uplink_started=_format_time(started_s),
                         files_changed="unknown" if changed_s is None else _format_time(changed_s))
        # A STARTING uplink has been spawned and reads the files after its start, as a RUNNING
        # one did. At a gateway start the watcher usually finds the uplink still STARTING.
        # A start later than supervisord's own clock means the clock was set back since, and
        # then the two times cannot be compared.
        read_them = (state in ("RUNNING", "STARTING") and changed_s is not None
                     and changed_s + START_MARGIN_S < started_s <= info["now"])
        if read_them:
            self.logger.info("uplink_runs_current_files %s; the files differ from the applied "
                             "record but changed before the uplink started, so it is not "
                             "restarted", details)
        else:
            self.logger.info("uplink_runs_recorded_files %s; the uplink is not running or did not "
                             "start clearly after the files last changed, so they are applied "
                             "as a change", details)
        return read_them

    def check(self) -> None:
        """Look at the files once and act on a new set of content once it has settled."""
        self._publish_rotations()
        digests = self.hasher.look()
        self.tap.counters["checks"] += 1
        now = time.monotonic()
        changed_now = digests != self.previous
        if changed_now:
            self.changed_s = now
        self.previous = digests
        if self.link is not None:
            self.link.poll()
        self._recheck_sas_expiry()

        if digests == self.running:
            self.deferred_s = None
            if self.accepted is not None:
                # The files went back to what the uplink runs with before its restart.
                self.accepted = None
                self._validate(for_restart=False)
            return
        if changed_now:
            self._report_change(digests)
        if now - self.changed_s < self.config.credentials.settle_s:
            return
        if digests == self.rejected:
            return

        if digests != self.accepted:
            # A file written in several steps can fail to parse between them. Such a set is
            # validated again at each check, and reported only once it has stayed the same
            # for INVALID_GRACE_S.
            quiet = now - self.changed_s < INVALID_GRACE_S
            if not self._validate(for_restart=True, quiet=quiet):
                if not quiet:
                    self.rejected = digests
                return
            self.accepted = digests
        self._apply(digests)

    def _publish_rotations(self) -> None:
        """Publish the outcomes that `plcbridge rotate` and the uplink's rotate_credentials
        command left in the state folder, so they appear on this tap next to the restart."""
        for outcome in take_outcomes(self.config.gateway.state_dir):
            self.tap.publish("rotation", **outcome)
            self.logger.info("rotation %s", fields(
                source=outcome.get("source"), status=outcome.get("status"),
                files=",".join(map(str, outcome.get("files") or ())),
                reason=outcome.get("reason") or None))

    def _apply(self, digests: Digests) -> None:
        """Restart the uplink with a validated set and record the set once it is applied."""
        if self._restart_deferred():
            return
        if self._restart_uplink():
            self.running = digests
            self.accepted = None
            self.record.write(self.paths, digests)

    def _restart_deferred(self) -> bool:
        """Return True while the uplink is connecting or another restart of it is under way.

        A restart then would kill a connect before its CONNACK, or race supervisord's own
        stop or start. The wait is bounded: after max_defer_s the restart goes ahead, because
        the new credentials may be what the stuck connect needs.
        """
        reason = self._busy_reason()
        now = time.monotonic()
        if reason is None:
            if self.deferred_s is not None:
                self.logger.info("uplink_restart_resumed %s", fields(
                    program=self.program, waited_s=f"{now - self.deferred_s:.2f}"))
            self.deferred_s = None
            return False

        max_defer_s = 2 * self.config.uplink.connect_timeout_s + DEFER_MARGIN_S
        if self.deferred_s is None:
            self.deferred_s = now
            self.tap.counters["deferred"] += 1
            self.tap.publish("uplink_restart_deferred", program=self.program, reason=reason)
            self.logger.info("uplink_restart_deferred %s; the restart waits, at most %g s",
                             fields(program=self.program, reason=reason), max_defer_s)
            return True
        if now - self.deferred_s < max_defer_s:
            return True

        self.logger.warning(
            "uplink_restart_forced %s; the uplink is restarted anyway, because the new "
            "credentials may be what it needs to connect",
            fields(program=self.program, reason=reason, waited_s=f"{now - self.deferred_s:.2f}"),
        )
        self.deferred_s = None
        return False

    def _busy_reason(self) -> str | None:
        """Return why the uplink should not be restarted now, or None when it may be."""
        try:
            info = self.supervisor.process_info(self.program)
        except (SupervisorUnavailableError, RestartError):
            return None  # the restart itself reports it and retries
        state = info["statename"]
        if state in BUSY_STATES:
            return f"supervisord reports it {state}, so a start or stop is under way"

        # A connecting state left by an uplink that died without its stop event is stale,
        # and supervisord then reports the program as anything but RUNNING.
        connecting_s = self.link.connecting_for_s() if self.link is not None else None
        if connecting_s is not None and state == "RUNNING":
            return f"it is connecting and has had no CONNACK for {connecting_s:.2f} s"
        return None

    def _report_change(self, digests: Digests) -> None:
        changed = [str(path) for path, old, new in zip(self.paths, self.running, digests,
                                                       strict=True) if old != new]
        self.tap.counters["changes"] += 1
        self.tap.publish("credentials_changed", files=changed)
        self.logger.info("credentials_changed %s", fields(files=",".join(changed)))

    def _validate(self, for_restart: bool, quiet: bool = False) -> bool:
        """Load and check the whole set. Log it when valid, or its first problem when not.

        for_restart adds the checks that compare the set with the running one, which matter
        only when the set would replace it. quiet logs a problem at DEBUG only, for a set
        that may still be half written.
        """
        loaded, rejection = self._check_set(for_restart)
        if rejection is not None:
            if not self._waiting_for_provisioning(rejection.file):
                self._report_rejection(rejection, quiet)
            return False
        assert loaded is not None

        self.loaded = loaded
        self._log_loaded(loaded)
        self.sas_state = None
        self._recheck_sas_expiry()
        return True

    def _waiting_for_provisioning(self, file: Path) -> bool:
        """Log a first boot's missing connection string at INFO, as the expected state."""
        path = self.config.credentials.connection_string_file
        if self.config.provisioning is None or file != path or path.exists():
            return False
        self.tap.publish("waiting_for_provisioning", file=str(path))
        self.logger.info("waiting_for_provisioning %s; the uplink is restarted when the "
                         "provisioning program has written the file", fields(file=path))
        return True

    def _check_set(self, for_restart: bool) -> tuple[CredentialSet | None, _Rejection | None]:
        """Return the loaded set, or the first reason why it may not replace the running one."""
        try:
            for path in self.paths:
                check_readable(path)
            loaded = validate_credential_files(self.config.credentials)
        except CredentialFileError as exc:
            return None, _Rejection(
                exc.path, exc.reason, fields(file=exc.path, reason=exc.reason),
                "the uplink is not restarted until the file is fixed",
            )

        if loaded.ca_root_count == 0:
            path = self.config.credentials.ca_file
            reason = (f"CA file contains {loaded.ca_certificate_count} certificate(s) but no "
                      "root CA, a self-signed certificate with basicConstraints CA:TRUE, so "
                      "TLS verification has no chain end; add the root CA of the broker's chain")
            return None, _Rejection(path, reason, fields(file=path, reason=reason),
                                    "the uplink is not restarted until the file is fixed")

        if for_restart:
            rejection = (self._expired_token_rejection(loaded)
                         or self._certificate_period_rejection(loaded))
            if rejection is not None:
                return None, rejection
        return loaded, None

    def _report_rejection(self, rejection: _Rejection, quiet: bool) -> None:
        if quiet:
            self.logger.debug("credentials_incomplete %s; checked again at the next check",
                              rejection.details)
            return
        self.tap.counters["invalid"] += 1
        self.tap.publish("credentials_invalid", file=str(rejection.file), reason=rejection.reason)
        self.logger.error("credentials_invalid %s; %s", rejection.details, rejection.consequence)

    def _expired_token_rejection(self, loaded: CredentialSet) -> _Rejection | None:
        """Reject a new SAS token that has already expired while the running one has not.

        Restarting onto it would take a working uplink down. A wrong clock cannot be distinguished
        from an expired token here, but it makes both tokens look expired, and then the new
        set is accepted as before.
        """
        if self.loaded is None:
            return None
        settings = (self.config.credentials, self.config.uplink)
        new = check_sas_expiry(loaded.connection, *settings)
        running = check_sas_expiry(self.loaded.connection, *settings)
        if new.state != "expired" or running.state == "expired":
            return None

        path = self.config.credentials.connection_string_file
        assert path is not None  # a SAS token comes from the connection string
        return _Rejection(
            path, "SAS token expired", fields(file=path, reason=new.message),
            "the new SAS token has expired while the running one is valid, so the uplink "
            "keeps the running credentials until a valid token is written",
        )

    def _certificate_period_rejection(self, loaded: CredentialSet) -> _Rejection | None:
        """Reject a new client certificate whose validity period does not contain now.

        When the running certificate is outside its period too, the clock is the likelier
        fault, and the new set is accepted, by the same rule as for SAS tokens.
        """
        new_certificate = loaded.client_certificate
        if new_certificate is None:
            return None
        settings = self.config.credentials
        new = check_certificate_validity(new_certificate, settings)
        if new.state not in (EXPIRED, NOT_YET_VALID):
            return None

        running_certificate = self.loaded.client_certificate if self.loaded else None
        running = ""
        if running_certificate is not None:
            running_state = check_certificate_validity(running_certificate, settings).state
            if running_state in (EXPIRED, NOT_YET_VALID):
                return None
            running = " while the running one is valid"
        problem = "has expired" if new.state == EXPIRED else "is not valid yet"
        files = f"{settings.client_cert_file},{settings.client_key_file}"
        assert settings.client_cert_file is not None
        return _Rejection(
            settings.client_cert_file, f"client certificate {new.state.replace('_', ' ')}",
            fields(files=files, reason=new.message),
            f"the new client certificate {problem}{running}, so the uplink keeps the "
            "running credentials until a valid certificate and key are written",
        )

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
        if certificate is None or certificate.not_before is None:
            return
        if time.time() < certificate.not_before.timestamp():
            self.logger.warning(
                "client_certificate_not_yet_valid %s; the hub rejects it until then, unless "
                "this gateway's clock is behind",
                fields(subject=certificate.subject,
                       not_before=f"{certificate.not_before:%Y-%m-%dT%H:%M:%SZ}"),
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

        if self.link is not None:
            self.link.expect_new_uplink()
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


def watch(config: Config, logger: logging.Logger, stop: threading.Event) -> None:
    """Run the watcher until stop is set: check the files, publish counters, sleep."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        tap = Tap(context, config.gateway.runtime_dir, PROCESS)
        link = UplinkLinkState(context, config.gateway.runtime_dir, logger)
        try:
            _run_loop(config, logger, stop, tap, link)
        finally:
            link.close()
            tap.close()
    finally:
        context.term()


def _run_loop(config: Config, logger: logging.Logger, stop: threading.Event, tap: Tap,
              link: UplinkLinkState) -> None:
    supervisor = SupervisorClient(config.supervisor_socket)
    watcher = CredentialWatcher(config, logger, tap, supervisor, link)
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
