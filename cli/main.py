"""The `plcbridge` operator command: start the gateway, watch it, check its configuration."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli import buffer as buffer_command
from cli import checks, launch
from cli import derive_key as derive_key_command
from cli import identity as identity_command
from cli import provision as provision_command
from cli import read as read_command
from cli import rotate as rotate_command
from cli import sas as sas_command
from cli import status as status_command
from cli import tap as tap_command
from cli import token_server as token_server_command
from common import wire
from common.errors import ConfigError, CredentialError, PlcBridgeError
from common.logs import redact

EXIT_FAILURE = 1
EXIT_INVALID = 2

EXIT_CODES = """\
exit codes:
  0  success, and tap stopped with Ctrl-C
  1  failure: a tool or folder is missing, supervisord is already running (run),
     provision: DPS did not assign the gateway, or it is provisioned and --force is missing,
     or `tap --count N` got fewer than N messages, or buffer: the buffer is not running
  2  invalid configuration or credential file, or invalid command-line arguments;
     rotate: the new file was refused and nothing was installed
  3  check-credentials: a SAS token or certificate has expired or is not valid
     yet, or the clock is behind the gateway's lower bound on the real time
  4  ctl: supervisord is not running; status: the gateway is not running
  status exits 1 when an alert is open or the uplink does not report its health.
  read exits 1 when any tag read as bad.
  run and ctl otherwise exit with supervisord's or supervisorctl's own code.
  ctl, tap and buffer use the last good copy of an invalid configuration file, when there
  is one.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plcbridge",
        description="Modbus PLC to MQTT edge gateway: operator commands.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _add_command(commands, "run", launch.run,
                       "start supervisord in the foreground with the gateway's four processes")
    _add_supervisord_conf(run)

    tap = _add_command(commands, "tap", tap_command.tap,
                       "print the events and counters that the processes publish")
    tap.add_argument("processes", nargs="*", metavar="PROCESS", type=_process_name,
                     help=f"processes to follow, from {', '.join(wire.PROCESS_NAMES)}; "
                          "default: all")
    tap.add_argument("--json", action="store_true", help="print each message as raw JSON")
    tap.add_argument("--data", action="store_true",
                     help="also print a copy of the data passing through: the reader's "
                          "samples, the pages the buffer hands out and the uplink's pages")
    tap.add_argument("--count", type=_positive_int, metavar="N",
                     help="exit after N messages; exit 1 if --timeout-s ends first")
    tap.add_argument("--timeout-s", type=_positive_float, metavar="S",
                     help="exit after S seconds; default: run until Ctrl-C")

    status = _add_command(commands, "buffer", buffer_command.buffer,
                          "show the pages, bytes and sample times that the buffer contains, its "
                          "drops by reason, and its commit and drain rates")
    status.add_argument("--json", action="store_true", help="print one JSON object")

    health = _add_command(commands, "status", status_command.status,
                          "show every program, the PLC link, the buffer, the uplink, the "
                          "credentials and the open alerts; exit 1 with an open alert")
    health.add_argument("--json", action="store_true", help="print one JSON object")

    _add_command(commands, "check-config", checks.check_config,
                 "validate the configuration and the credential files, print a summary")
    _add_command(commands, "check-credentials", checks.check_credentials,
                 "validate every credential file and print the device, host, scheme and "
                 "expiry, with secrets redacted")

    rotate = _add_command(commands, "rotate", rotate_command.rotate,
                          "check a new connection string, client certificate and key, or CA "
                          "bundle with the files in place and install it; the credential "
                          "watcher then restarts the uplink")
    rotate_command.add_arguments(rotate)

    summary = "print a SAS token minted from a device connection string"
    sas = commands.add_parser("sas", help=summary, description=summary, epilog=EXIT_CODES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sas_command.add_arguments(sas)
    sas.set_defaults(handler=sas_command.sas)

    summary = ("print the device key that a DPS symmetric-key group enrollment expects from "
               "a registration id")
    derive = commands.add_parser("derive-key", help=summary, description=summary,
                                 epilog=EXIT_CODES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    derive_key_command.add_arguments(derive)
    derive.set_defaults(handler=derive_key_command.derive_key)

    # read takes --config as an option, because an ad-hoc tag needs no configuration.
    summary = ("read tags once and print the requests, raw registers, decoded values and "
               "quality; --config FILE [--tag NAME ...], or one ad-hoc tag")
    read = commands.add_parser("read", help=summary, description=summary, epilog=EXIT_CODES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    read_command.add_arguments(read)
    read.set_defaults(handler=read_command.read)

    confirm = _add_command(commands, "confirm-identity", identity_command.confirm_identity,
                           "store the PLC's serial-number id after a PLC swap, so that the "
                           "reader sends samples again")
    identity_command.add_arguments(confirm)

    provision = _add_command(commands, "provision", provision_command.provision,
                             "register with Azure DPS and write the connection string file "
                             "named by credentials.connection_string_file")
    provision_command.add_arguments(provision)

    summary = ("run the on-site HTTPS server that issues short-lived SAS tokens to the "
               "gateways on its allow-list")
    server = commands.add_parser("token-server", help=summary, description=summary,
                                 epilog=EXIT_CODES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    token_server_command.add_arguments(server)
    server.set_defaults(handler=token_server_command.token_server)

    ctl = _add_command(commands, "ctl", launch.ctl,
                       "run supervisorctl against the gateway's supervisord, e.g. "
                       "`ctl --config FILE restart plcbridge:uplink`")
    _add_supervisord_conf(ctl)
    ctl.add_argument("supervisorctl_args", nargs=argparse.REMAINDER, metavar="ARGS",
                     help="supervisorctl command and arguments; none starts its shell")
    return parser


def _add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: object,
    summary: str,
) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=summary, description=summary, epilog=EXIT_CODES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_argument("--config", required=True, metavar="FILE",
                         help="the gateway's TOML configuration file")
    command.set_defaults(handler=handler)
    return command


def _add_supervisord_conf(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--supervisord-conf", metavar="PATH",
        help=f"supervisord configuration; default: {launch.DEFAULT_SUPERVISORD_CONF}",
    )


def _process_name(text: str) -> str:
    if text not in wire.PROCESS_NAMES:
        raise argparse.ArgumentTypeError(
            f"unknown process {text!r}; expected one of {', '.join(wire.PROCESS_NAMES)}"
        )
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    # The negated comparison also rejects nan.
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run one plcbridge command and return its exit code."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except (ConfigError, CredentialError) as exc:
        # A connection string pasted where a path belongs would otherwise reach the screen.
        print(redact(f"plcbridge {args.command}: {exc}"), file=sys.stderr)
        return EXIT_INVALID
    except PlcBridgeError as exc:
        print(redact(f"plcbridge {args.command}: {exc}"), file=sys.stderr)
        return EXIT_FAILURE
    return code


if __name__ == "__main__":
    sys.exit(main())
