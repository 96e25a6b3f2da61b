"""The uplink's choice between the current credential files and the last good set.

The uplink starts with the current files. After their first accepted CONNACK it saves them
as the last good set (common/last_good_credentials.py). The hub may reject the current
files with CONNACK 4 or 5, or with a TLS failure over the server's or the client's
certificate. When a stored set then differs from them and is still valid, the uplink
connects with the stored copies at once, and stays on them until the process ends or the
hub rejects them too. The credential watcher restarts it when the operator writes new
files, and the new process tries the current files first again, so a restart while on the
fallback costs one rejected attempt and never loops.

With credentials.fallback_to_last_good = false, the uplink keeps retrying the current files
with its backoff. In both cases the rotation_rejected alert names the rejected files, and
it clears when the current files connect.

Everything here runs on the uplink's network thread.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from common.config import Config
from common.credential_files import (
    check_certificate_validity,
    check_sas_expiry,
    validate_credential_files,
)
from common.credentials import EXPIRED, NOT_YET_VALID
from common.errors import CredentialError
from common.last_good_credentials import (
    CredentialSnapshot,
    LastGoodError,
    LastGoodStore,
    StoredSet,
    changed_roles,
)
from common.logs import fields

if TYPE_CHECKING:
    from processes.uplink import Identity

# Builds the identity of a configuration; raises CredentialError when a file is unusable.
LoadIdentity = Callable[[Config], "Identity"]

# Publishes an event on the uplink's tap through the main thread: kind, then its values.
Report = Callable[..., None]

# A server that rejects a client certificate may just close the connection after the TLS
# handshake, as the hub emulator does, which looks like any connection lost before
# CONNACK. After a new client certificate or key, this many such closes in a row count as
# a rejection of the new certificate.
EARLY_CLOSES_AS_REJECTION = 3

# The settings whose change can make a server close the connection during TLS.
CLIENT_CERTIFICATE_ROLES = ("client_cert_file", "client_key_file", "client_key_passphrase_file")


@dataclasses.dataclass(frozen=True)
class Choice:
    """The credential set for the next connection attempt."""

    identity: Identity
    last_good: bool
    # Connect at once instead of after the backoff delay: true when going to the fallback.
    at_once: bool


class CredentialSets:
    """Tracks which set the uplink connects with, saves the set that connects, falls back."""

    def __init__(self, config: Config, logger: logging.Logger, load: LoadIdentity,
                 current: Identity, snapshot: CredentialSnapshot | None,
                 report: Report) -> None:
        self._config = config
        self._logger = logger
        self._load = load
        self._current = current
        self._snapshot = snapshot
        self._report = report
        self._store = LastGoodStore(config.gateway.state_dir)
        self.on_last_good = False
        self._reported = False  # the rejection of the current files was reported in this run
        self._early_closes = 0

    @property
    def enabled(self) -> bool:
        return self._config.credentials.fallback_to_last_good

    def on_accepted(self) -> None:
        """Save the current files as the last good set after their CONNACK."""
        self._reported = False
        self._early_closes = 0
        if self.on_last_good or self._snapshot is None:
            return
        try:
            saved = self._store.save(self._snapshot)
        except LastGoodError as exc:
            self._logger.warning(
                "last_good_not_saved %s",
                fields(error=exc, consequence="a rejected rotation cannot fall back to "
                       "these credentials; check gateway.state_dir"))
            return
        if saved:
            self._logger.info("last_good_saved %s", fields(folder=self._store.folder))
            self._report("last_good_saved", folder=str(self._store.folder))

    def after_failure(self, reason: str, now_s: float) -> Choice | None:
        """Choose the set for the next attempt after the hub rejected the active one.

        Return None to retry the same set with the backoff delay.
        """
        if self.on_last_good:
            # The hub now rejects the last good set too, so the current files, which are
            # what the operator wrote last, get the next attempt.
            self.on_last_good = False
            self._logger.error(
                "last_good_rejected %s",
                fields(reason=reason, consequence="the current credential files are tried "
                       "again with the backoff, alternating with the last good set"))
            self._report("last_good_rejected", reason=reason)
            return Choice(self._current, last_good=False, at_once=False)

        stored, unusable = self._usable_stored_set(now_s)
        if stored is None:
            self._report_rejected(reason, unusable, None)
            return None
        try:
            identity = self._load(dataclasses.replace(
                self._config, credentials=stored.settings(self._config.credentials)))
        except CredentialError as exc:
            self._report_rejected(reason, f"the last good set cannot be loaded: {exc}", None)
            return None

        self.on_last_good = True
        self._report_rejected(reason, "", stored)
        return Choice(identity, last_good=True, at_once=True)

    def after_early_close(self, reason: str, now_s: float) -> Choice | None:
        """Choose the set for the next attempt after the server closed before CONNACK.

        Only a run of such closes with a new client certificate counts as a rejection.
        """
        if self.on_last_good or not self._client_certificate_changed():
            self._early_closes = 0
            return None
        self._early_closes += 1
        if self._early_closes < EARLY_CLOSES_AS_REJECTION:
            return None
        self._early_closes = 0
        return self.after_failure(
            f"{reason}, {EARLY_CLOSES_AS_REJECTION} times in a row after a new client "
            "certificate, so the server is taken to reject it", now_s)

    def _client_certificate_changed(self) -> bool:
        if self._snapshot is None:
            return False
        try:
            stored = self._store.load()
        except LastGoodError:
            return False
        if stored is None:
            return False
        changed = changed_roles(self._snapshot.digests(), stored.digests())
        return any(role in CLIENT_CERTIFICATE_ROLES for role in changed)

    def _usable_stored_set(self, now_s: float) -> tuple[StoredSet | None, str]:
        """Return the stored set when it can replace the current files, or why it cannot."""
        if self._snapshot is None:
            return None, "the current files were not read whole at start"
        try:
            stored = self._store.load()
        except LastGoodError as exc:
            self._logger.warning(
                "last_good_unusable %s",
                fields(error=exc, consequence="the uplink retries the rejected credentials "
                       "with its backoff; the next set that connects is saved anew"))
            return None, f"the last good set is unusable: {exc}"
        if stored is None:
            return None, "no set has connected yet, so there is no last good set"
        if not changed_roles(self._snapshot.digests(), stored.digests()):
            return None, "the rejected files are the last good set"
        if not self.enabled:
            return None, "credentials.fallback_to_last_good is false"

        problem = self._expiry_problem(stored, now_s)
        if problem:
            return None, problem
        return stored, ""

    def _expiry_problem(self, stored: StoredSet, now_s: float) -> str:
        """Describe why the stored set is no longer valid, or return an empty string."""
        settings = stored.settings(self._config.credentials)
        try:
            loaded = validate_credential_files(settings)
        except CredentialError as exc:
            return f"the last good set is unusable: {exc}"
        sas = check_sas_expiry(loaded.connection, settings, self._config.uplink, now_s)
        if sas.state == EXPIRED:
            return f"the last good SAS token has expired: {sas.message}"
        if loaded.client_certificate is not None:
            validity = check_certificate_validity(loaded.client_certificate, settings, now_s)
            if validity.state in (EXPIRED, NOT_YET_VALID):
                return f"the last good client certificate is not valid: {validity.message}"
        return ""

    def _report_rejected(self, reason: str, unusable: str, stored: StoredSet | None) -> None:
        """Log and tap the rejection of the current files once per run of rejections."""
        files = self._rejected_files()
        if self._reported or not files:
            # Without a differing last good set this is no rotation, and the uplink's own
            # credentials_rejected report covers it.
            return
        self._reported = True
        listed = ",".join(files)
        values: dict[str, Any] = {"files": files, "reason": reason}
        if stored is not None:
            saved = datetime.fromtimestamp(stored.saved_ms / 1000, UTC)
            detail = (f"the hub rejected the new credentials in {listed} ({reason}); the "
                      f"uplink runs on the last good set saved {saved:%Y-%m-%dT%H:%M:%SZ} "
                      "until new files connect")
            values.update(fallback="last_good", saved_ms=stored.saved_ms)
        else:
            detail = (f"the hub rejected the new credentials in {listed} ({reason}); "
                      f"{unusable}, so the uplink retries them with its backoff and pages "
                      "wait in the buffer")
            values.update(fallback="off" if not self.enabled else "unusable")
        self._logger.error("rotation_rejected %s", fields(files=listed, detail=detail))
        self._report("rotation_rejected", detail=detail, **values)

    def _rejected_files(self) -> list[str]:
        """Return the current files that differ from the last good set, or [] without one."""
        if self._snapshot is None:
            return []
        try:
            stored = self._store.load()
        except LastGoodError:
            stored = None
        if stored is None:
            return []
        roles = changed_roles(self._snapshot.digests(), stored.digests())
        return [str(self._snapshot.path(role)) if role in self._snapshot.files
                else f"credentials.{role} (removed)" for role in roles]
