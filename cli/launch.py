"""`plcbridge run` and `plcbridge ctl`: supervisord and supervisorctl with the gateway's settings.

supervisord.conf takes its folders and the configuration path from PLCBRIDGE_* environment
variables, which both commands set from the configuration file. `run` rejects an invalid
file and saves a valid one as the last good copy. `ctl` runs on that copy when the file is
invalid, so that the operator can still see and control a running gateway.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import NoReturn

from common.config import Config, load_config
from common.credential_files import validate_credential_files
from common.errors import CredentialError, PlcBridgeError
from common.last_good import last_good_path, load_config_or_last_good, save_last_good
from common.lifecycle import SUPERVISORD_PID_VARIABLE
from common.logs import redact

# The repository root, where supervisord.conf lives next to the cli package.
DEFAULT_SUPERVISORD_CONF = Path(__file__).resolve().parent.parent / "supervisord.conf"

# supervisorctl's own exit code when it cannot reach supervisord.
EXIT_NOT_RUNNING = 4


class LaunchError(PlcBridgeError):
    """The gateway could not be started: a missing tool, file or folder."""


def run(args: argparse.Namespace) -> int:
    """Prepare the gateway's folders and replace this process with supervisord."""
    config = load_config(args.config)
    conf = _supervisord_conf(args.supervisord_conf)
    supervisord = find_tool("supervisord")
    _reject_running_supervisord(config)
    _prepare_folders(config)
    _warn_if_credentials_invalid(config)
    _save_last_good(config)

    command = [supervisord, "-n", "-c", str(conf)]
    print(f"plcbridge run: starting {' '.join(command)}", file=sys.stderr, flush=True)

    # execve keeps the pid, so this is supervisord's pid. A program whose parent differs
    # from it at start concludes that supervisord exited before the program could request
    # a signal on its parent's exit (see common/lifecycle.py).
    environment = gateway_environment(config)
    environment[SUPERVISORD_PID_VARIABLE] = str(os.getpid())
    _exec(command, environment)


def ctl(args: argparse.Namespace) -> int:
    """Replace this process with supervisorctl, connected to the gateway's supervisord socket."""
    config = load_config_for_operator(args.config, "ctl")
    conf = _supervisord_conf(args.supervisord_conf)
    supervisorctl = find_tool("supervisorctl")
    if not config.supervisor_socket.exists():
        print(f"plcbridge ctl: supervisord is not running: no control socket at "
              f"{config.supervisor_socket}; start the gateway with "
              f"`plcbridge run --config {config.path}`", file=sys.stderr)
        return EXIT_NOT_RUNNING

    # Without -c, supervisorctl reads the first supervisord.conf it finds from the current
    # folder, so name ours explicitly with the environment its %(ENV_...)s values need.
    command = [supervisorctl, "-c", str(conf), "-s", f"unix://{config.supervisor_socket}",
               *args.supervisorctl_args]
    _exec(command, gateway_environment(config))


def load_config_for_operator(path: str, command: str) -> Config:
    """Load the configuration, or its last good copy after printing why the file was rejected.

    For commands that watch or control a running gateway: a mistake in the file must not
    keep the operator from seeing or stopping the gateway.
    """
    config, rejected = load_config_or_last_good(path)
    if rejected is not None:
        print(redact(f"plcbridge {command}: {rejected}"), file=sys.stderr)
        print(f"plcbridge {command}: warning: using the last good configuration "
              f"{last_good_path(config.path)} instead; fix the file and check it with "
              f"`plcbridge check-config --config {config.path}`", file=sys.stderr, flush=True)
    return config


def _exec(command: list[str], environment: dict[str, str]) -> NoReturn:
    try:
        os.execve(command[0], command, environment)
    except OSError as exc:
        raise LaunchError(f"cannot execute {command[0]}: {exc.strerror}") from exc


def gateway_environment(config: Config) -> dict[str, str]:
    """Return this process's environment plus the PLCBRIDGE_* values supervisord.conf reads."""
    environment = dict(os.environ)
    environment.update(
        PLCBRIDGE_CONFIG=str(config.path),
        PLCBRIDGE_RUNTIME_DIR=str(config.gateway.runtime_dir),
        PLCBRIDGE_LOG_DIR=str(config.gateway.log_dir),
        PLCBRIDGE_PYTHON=sys.executable,
    )
    return environment


def find_tool(name: str) -> str:
    """Find a supervisor script in this Python's bin folder first, then on PATH."""
    beside_python = Path(sys.executable).parent / name
    if os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise LaunchError(
            f"{name} not found in {beside_python.parent} or on PATH; "
            "install the supervisor package in this Python environment"
        )
    return found


def _supervisord_conf(option: str | None) -> Path:
    conf = Path(option).resolve() if option else DEFAULT_SUPERVISORD_CONF
    if not conf.is_file():
        raise LaunchError(
            f"{conf}: supervisord configuration not found; pass --supervisord-conf PATH"
        )
    return conf


def _reject_running_supervisord(config: Config) -> None:
    # supervisord would fail to start too, but with a message that names no socket.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(config.supervisor_socket))
    except OSError:
        return  # no socket, or a stale one that supervisord removes at start
    finally:
        probe.close()
    raise LaunchError(
        f"a supervisord is already running on {config.supervisor_socket}; check it with "
        f"`plcbridge ctl --config {config.path} status` or stop it with `... shutdown`"
    )


def _prepare_folders(config: Config) -> None:
    gateway = config.gateway
    for folder in (gateway.state_dir, gateway.log_dir, gateway.runtime_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LaunchError(f"{folder}: cannot create folder: {exc.strerror}") from exc

    # The runtime folder contains supervisord's control socket and the ipc:// sockets, which
    # anyone who can reach them can use, so only the gateway's user may enter it.
    try:
        os.chmod(gateway.runtime_dir, 0o700)
    except OSError as exc:
        raise LaunchError(
            f"{gateway.runtime_dir}: cannot set mode 0700 on the runtime folder: {exc.strerror}"
        ) from exc


def _save_last_good(config: Config) -> None:
    try:
        save_last_good(config)
    except PlcBridgeError as exc:
        print(f"plcbridge run: warning: {exc}; if the file is later saved with a mistake, a "
              "restarted program exits instead of running on this configuration",
              file=sys.stderr)


def _warn_if_credentials_invalid(config: Config) -> None:
    # The gateway still starts: the reader and the buffer keep storing data, and the
    # credential watcher restarts the uplink once the files are fixed.
    try:
        validate_credential_files(config.credentials)
    except CredentialError as exc:
        print(
            f"plcbridge run: warning: {exc}; the gateway buffers data but the uplink cannot "
            "connect until this is fixed",
            file=sys.stderr,
        )
