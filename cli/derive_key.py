"""`plcbridge derive-key`: print a device's key for a DPS symmetric-key group enrollment."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.dps_keys import decode_key, derive_device_key, read_key_file

EXIT_OK = 0


def add_arguments(command: argparse.ArgumentParser) -> None:
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument("--group-key", metavar="KEY",
                        help="the enrollment group's primary or secondary key (base64); "
                             "prefer --group-key-file, which keeps it out of shell history")
    source.add_argument("--group-key-file", type=Path, metavar="FILE",
                        help="file whose first line is the group key (base64)")
    command.add_argument("--registration-id", required=True, metavar="ID",
                         help="the device's DPS registration id: at most 128 letters, digits "
                              "and - . _ :")


def derive_key(args: argparse.Namespace) -> int:
    """Print the derived device key on stdout, and nothing else, so a script can capture it."""
    if args.group_key_file is not None:
        text = read_key_file(args.group_key_file)
        source = f"group key in {args.group_key_file}"
    else:
        text = args.group_key
        source = "--group-key"
    group_key = decode_key(text, source)
    print(derive_device_key(group_key, args.registration_id))
    return EXIT_OK
