"""`plcbridge confirm-identity`: accept the id of a swapped PLC so that the reader sends again.

The reader stops sending when the PLC's serial-number id differs from the stored one. This
command reads the id from the PLC, or takes --id, and stores it in
<gateway.state_dir>/plc-identity.json. A running reader resumes within a second.
"""

from __future__ import annotations

import argparse
import logging

from common.config import IdentitySettings, PlcDevice, load_config
from common.errors import ConfigError, PlcBridgeError

EXIT_OK = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", dest="plc_id", metavar="YYMMNNNN",
                        help="store this id instead of reading it from the PLC, for example "
                             "when the reader holds the PLC's only serial port")


def confirm_identity(args: argparse.Namespace) -> int:
    """Store the PLC's current id as the confirmed one and print the old and new ids."""
    from processes.plc_reader.identity import IdentityStore, check_composed_id

    config = load_config(args.config)
    settings = config.plc.identity
    if settings is None:
        raise ConfigError(f"{config.path}: no [plc.identity] table; the reader checks no "
                          "PLC identity, so there is nothing to confirm")

    if args.plc_id is not None:
        if not args.plc_id.isdigit() or len(args.plc_id) != 8:
            raise ConfigError(f"--id {args.plc_id!r}: expected 8 digits YYMMNNNN, e.g. 22091017")
        plc_id = check_composed_id(int(args.plc_id))
    else:
        plc_id = _read_plc_id(config.plc.devices, settings)

    store = IdentityStore(config.gateway.state_dir)
    previous = store.load()
    store.save(plc_id)
    print(f"stored PLC id {plc_id} in {store.path} (was {previous or 'none'}); a running "
          "reader resumes sending within a second")
    return EXIT_OK


def _read_plc_id(devices: tuple[PlcDevice, ...], settings: IdentitySettings) -> str:
    # Imported here so that other plcbridge commands do not load pymodbus.
    from processes.plc_reader.commission import read_once
    from processes.plc_reader.identity import id_from_values, identity_tags

    tags = identity_tags(settings)
    requests, results = read_once(devices, tags, logging.getLogger("plcbridge.identity"))
    bad = [result for result in results if result.quality != "good"]
    if bad or len(results) != len(tags):
        errors = "; ".join(request.error for request in requests if request.error)
        raise PlcBridgeError(
            f"reading the PLC's serial number failed: {errors or bad[0].reason}. Check the "
            "PLC, or give the id shown in the reader's identity_changed log line with --id"
        )
    values = {result.tag.name: int(result.value or 0) for result in results}
    return id_from_values(settings, values)
