"""The uplink's wait for its connection string while DPS provisioning has not written it."""

from __future__ import annotations

import logging
import threading

from common.config import Config
from common.logs import fields


def wait_for_provisioning(config: Config, logger: logging.Logger,
                          stop: threading.Event) -> bool:
    """Return True when the uplink can load its credentials, False when it was stopped.

    With [provisioning] configured and no connection string file, the uplink idles until
    supervisord stops it, instead of exiting in a loop that supervisord would slow down
    with ever longer backoff. The credential watcher restarts it once the provisioning
    program has written the file. Without [provisioning] a missing file stays an error.
    """
    path = config.credentials.connection_string_file
    if config.provisioning is None or path is None or path.exists():
        return True
    logger.warning("waiting_for_provisioning %s; the buffer keeps the samples, and the "
                   "credential watcher restarts the uplink when the file is written",
                   fields(file=path))
    stop.wait()
    return False
