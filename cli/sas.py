"""`plcbridge sas`: print a SAS token minted from a device connection string."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common.credentials import (
    MAX_EPOCH_S,
    format_utc_seconds,
    mint_sas_token,
    read_connection_string,
)
from common.errors import CredentialError

DEFAULT_TTL_S = 3600
EXIT_OK = 0


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--connection-string-file", required=True, metavar="FILE", type=Path,
                         help="file with the device connection string, which must contain a "
                              "SharedAccessKey")
    expiry = command.add_mutually_exclusive_group()
    expiry.add_argument("--ttl", type=int, metavar="SECONDS",
                        help=f"lifetime of the token in seconds from now; default {DEFAULT_TTL_S}")
    expiry.add_argument("--expiry", type=int, metavar="EPOCH",
                        help="expiry of the token (se) in seconds since 1970-01-01 UTC")


def sas(args: argparse.Namespace) -> int:
    """Print a token on stdout, and its expiry on stderr so that a script can capture the
    token alone."""
    path: Path = args.connection_string_file
    connection = read_connection_string(path)
    if connection.shared_access_key is None:
        raise CredentialError(
            f"{path}: the connection string has no SharedAccessKey ({connection.scheme}); "
            "a SAS token can be minted only from a device or module key"
        )

    now_s = int(time.time())
    if args.expiry is not None:
        expiry_s = args.expiry
    else:
        ttl_s = DEFAULT_TTL_S if args.ttl is None else args.ttl
        if ttl_s < 1:
            raise CredentialError(f"invalid --ttl {ttl_s}: expected at least 1 second")
        expiry_s = now_s + ttl_s
    if expiry_s > MAX_EPOCH_S:
        option = "--expiry" if args.expiry is not None else "--ttl"
        raise CredentialError(
            f"invalid {option}: the expiry would be after {MAX_EPOCH_S} "
            f"({format_utc_seconds(MAX_EPOCH_S)}); give an earlier time"
        )
    if expiry_s <= now_s:
        raise CredentialError(
            f"invalid --expiry {expiry_s} ({format_utc_seconds(expiry_s)}): it is not after "
            f"now ({now_s}, {format_utc_seconds(now_s)}); give a later time"
        )

    print(mint_sas_token(connection.resource_uri, connection.shared_access_key, expiry_s))
    print(f"token for {connection.resource_uri}, se={expiry_s} "
          f"({format_utc_seconds(expiry_s)})", file=sys.stderr)
    return EXIT_OK
