"""`plcbridge provision`: register with Azure DPS once and write the connection string file."""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from common.config import load_config
from common.logs import fields

EXIT_OK = 0
EXIT_FAILURE = 1


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--force", action="store_true",
                         help="register again and replace an existing connection string file, "
                              "for example after the enrollment moved to another hub")


def provision(args: argparse.Namespace) -> int:
    """Register once; print the hub and device id, never the key."""
    # Imported here, so that the other commands do not load paho.
    from processes.provisioning import provision_once

    config = load_config(args.config)
    path = config.credentials.connection_string_file
    if config.provisioning is not None and path is not None and path.exists() and not args.force:
        print(f"plcbridge provision: {path} exists, so the gateway is provisioned; add "
              "--force to register again and replace it", file=sys.stderr)
        return EXIT_FAILURE

    logger = logging.getLogger("plcbridge.provision")
    logger.addHandler(logging.StreamHandler(sys.stderr))
    logger.setLevel(logging.INFO)
    provisioned = provision_once(config, logger, threading.Event())
    print(fields(registration_id=provisioned.registration_id, hub=provisioned.assigned_hub,
                 device_id=provisioned.device_id, file=provisioned.path))
    print("The credential watcher restarts the uplink with the new connection string within "
          f"{2 * config.credentials.check_interval_s:g} s when the gateway runs.",
          file=sys.stderr)
    return EXIT_OK
