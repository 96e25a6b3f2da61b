"""The shared entry point of every gateway process: arguments, configuration, logging, signals.

A process body runs until its stop event is set. Signal handlers only set that event, and
the body's own loop does the shutdown work. A fatal error exits non-zero, so supervisord
records the failure and restarts the program. A configuration file that fails to load is
replaced by its last good copy when there is one (see common.last_good), so a restart after
a bad edit keeps the process running.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from common import __version__
from common.config import Config
from common.errors import ConfigError, PlcBridgeError
from common.last_good import last_good_path, load_config_or_last_good, save_last_good
from common.logs import fields, redact, setup_logging

Body = Callable[[Config, logging.Logger, threading.Event], None]

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def gateway_version() -> str:
    # Read from the package, not through importlib.metadata, which would add about 3 MiB of
    # resident memory to every gateway process (ru_maxrss, Python 3.11).
    return __version__


# prctl option that makes the kernel signal this process when its parent exits (Linux).
PR_SET_PDEATHSIG = 1

# Set by `plcbridge run` to its own pid, which supervisord keeps after execve.
SUPERVISORD_PID_VARIABLE = "PLCBRIDGE_SUPERVISORD_PID"


def _stop_with_parent(stop: threading.Event) -> None:
    """Ask the kernel for SIGTERM when supervisord dies, so no program outlives it.

    supervisord puts each program in a process group of its own, so a SIGKILL of
    supervisord alone would leave the four running, holding their locks against the next
    `plcbridge run`. The request covers only a parent that dies after it. A program can
    take seconds to import on a loaded machine, and supervisord may die before then, so
    the parent's pid is compared with supervisord's pid from the environment after the
    request. Started another way, the program compares it with the parent it had just
    before the request, which closes the shorter race only.
    """
    expected = os.environ.get(SUPERVISORD_PID_VARIABLE, "")
    parent = int(expected) if expected.isdigit() else os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: supervisord's own stop is the only way out
    if os.getppid() != parent:
        stop.set()


def run_process(process: str, body: Body, argv: Sequence[str] | None = None) -> int:
    """Load the configuration named on the command line and run body until a signal stops it."""
    parser = argparse.ArgumentParser(prog=f"plcbridge-{process}")
    parser.add_argument("--config", required=True, help="path of the gateway's TOML file")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    _stop_with_parent(stop)

    try:
        config, rejected = load_config_or_last_good(args.config)
    except ConfigError as exc:
        print(redact(f"plcbridge {process}: {exc}"), file=sys.stderr)
        return EXIT_CONFIG

    logger = setup_logging(process, config.gateway.log_level)
    if stop.is_set():
        logger.warning("parent_gone %s", fields(
            reason="supervisord exited before this process started",
            consequence="this process stops at once"))

    logger.info("start version=%s config=%s", gateway_version(), config.path)
    if rejected is None:
        _save_last_good(config, logger)
    else:
        logger.error(
            "config_rejected %s; this process runs on the last good configuration %s until "
            "the file is fixed and the process restarted",
            fields(error=rejected), last_good_path(config.path),
        )
    try:
        body(config, logger, stop)
    except PlcBridgeError as exc:
        logger.error("stopped on error: %s", exc)
        return EXIT_FAILURE
    logger.info("stop version=%s", gateway_version())
    return 0


def _save_last_good(config: Config, logger: logging.Logger) -> None:
    try:
        saved = save_last_good(config)
    except PlcBridgeError as exc:
        logger.warning(
            "last_good_not_saved %s; if the file is later saved with a mistake, a restarted "
            "process exits instead of running on this configuration",
            fields(reason=exc),
        )
        return
    if saved:
        logger.info("last_good_saved %s", fields(path=last_good_path(config.path)))
