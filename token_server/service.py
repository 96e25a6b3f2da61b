"""Start, run and stop the token server: `plcbridge token-server --config FILE`."""

from __future__ import annotations

import signal
import threading

from common.lifecycle import gateway_version
from common.logs import fields, setup_logging
from token_server.audit import AuditLog
from token_server.config import load_server_config
from token_server.keys import KeyStore
from token_server.server import TokenServer

PROCESS = "token_server"


def run(config_path: str) -> int:
    """Serve until SIGTERM or SIGINT; raise ConfigError for an unusable configuration."""
    config = load_server_config(config_path)
    logger = setup_logging(PROCESS, config.log_level)
    keys = KeyStore(config)
    audit = AuditLog(config.audit_log_file)
    try:
        server = TokenServer(config, keys, audit, logger)
    except BaseException:
        audit.close()
        raise

    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        # Only a flag here; the main thread shuts the server down.
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    serving = threading.Thread(target=server.serve_forever, name="https-server", daemon=True)
    serving.start()
    logger.info("token_server_ready %s", fields(
        version=gateway_version(), host=config.listen.host, port=server.port,
        devices=len(config.devices), ttl_s=config.tokens.ttl_s,
        client_certificates="on" if config.listen.client_ca_file else "off",
        audit_log=config.audit_log_file))
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        audit.close()
        logger.info("token_server_stopped %s", fields(version=gateway_version()))
    return 0


