"""`plcbridge rotate`: check new credential files against the ones in place and install them.

The command copies the operator's new file over the configured one only when the whole set
is valid with it (see common/credential_install.py), prints what was installed without a
secret, and leaves an outcome record that the credential watcher publishes on its tap. The
watcher then restarts the uplink with the new set, as for any change of the files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common.config import Config, load_config
from common.credential_install import (
    FROM_CLI,
    KINDS,
    Candidate,
    InstallResult,
    install_credentials,
)
from common.credentials import read_credential_bytes
from common.errors import CredentialError
from common.logs import redact
from common.rotation_outcomes import record_outcome

EXIT_OK = 0

# Each option and the kind of credential file it brings.
OPTIONS = (
    ("connection_string_file", "connection_string"),
    ("client_cert_file", "client_cert"),
    ("client_key_file", "client_key"),
    ("ca_bundle_file", "ca_bundle"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    new = parser.add_mutually_exclusive_group(required=True)
    new.add_argument("--connection-string-file", metavar="NEW",
                     help="a new connection string, for credentials.connection_string_file")
    new.add_argument("--client-cert-file", metavar="NEW",
                     help="a new client certificate, checked against the key in place or "
                          "the one given with --client-key-file")
    new.add_argument("--ca-bundle-file", metavar="NEW",
                     help="a new CA bundle, for credentials.ca_file")
    parser.add_argument("--client-key-file", metavar="NEW",
                        help="the new certificate's private key; only with --client-cert-file")


def rotate(args: argparse.Namespace) -> int:
    """Install the new file, or exit 2 naming the file and the reason, changing nothing."""
    if args.client_key_file is not None and args.client_cert_file is None:
        raise CredentialError(
            f"{args.client_key_file}: --client-key-file goes with --client-cert-file; give the "
            "certificate that belongs to the key too"
        )
    config = load_config(args.config)

    try:
        candidates = [_read_candidate(kind, Path(getattr(args, option)))
                      for option, kind in OPTIONS if getattr(args, option) is not None]
        result = install_credentials(config.credentials, candidates, FROM_CLI)
    except CredentialError as exc:
        _record(config, {"source": FROM_CLI, "status": "rejected", "files": [],
                         "reason": str(exc)})
        raise

    _record(config, {"source": FROM_CLI, "status": "ok",
                     "files": [str(path) for path in result.changed], "reason": ""})
    _print_result(config, result)
    return EXIT_OK


def _read_candidate(kind: str, path: Path) -> Candidate:
    return Candidate(kind, str(path), read_credential_bytes(path, f"new {KINDS[kind].label} file"))


def _print_result(config: Config, result: InstallResult) -> None:
    for path in result.changed:
        print(f"installed {path}")
    for path in result.unchanged:
        print(f"unchanged {path}: it already has this content")
    print("credentials: " + ", ".join(f"{key} {value}" for key, value in result.details.items()))

    if result.changed:
        print(f"the credential watcher restarts the uplink with them within about "
              f"{2 * config.credentials.check_interval_s:g} s; follow it with "
              f"plcbridge tap --config {config.path} credential_watcher uplink")
    else:
        print("nothing changed, so the uplink is not restarted")


def _record(config: Config, outcome: dict[str, Any]) -> None:
    """Leave the outcome for the watcher's tap; a failure only costs that tap event."""
    try:
        record_outcome(config.gateway.state_dir, outcome)
    except OSError as exc:
        print(redact(f"plcbridge rotate: warning: cannot record the outcome for the tap in "
                     f"{config.gateway.state_dir}: {exc.strerror or exc}"), file=sys.stderr)
