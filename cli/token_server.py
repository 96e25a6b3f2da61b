"""`plcbridge token-server --config FILE`: run the on-site SAS token server."""

from __future__ import annotations

import argparse

from token_server import service


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="the token server's TOML configuration file "
                             "(docs/token-server.md)")


def token_server(args: argparse.Namespace) -> int:
    return service.run(args.config)
