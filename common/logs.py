"""Logging for every process: one logger each, `event key=value` lines, secrets redacted."""

from __future__ import annotations

import logging
import re
import sys

# Values that must never reach a log: SAS signatures, device keys, whole tokens, passwords.
_SECRET_PATTERNS = (
    (re.compile(r"(sig=)[^&;\s'\"]+", re.IGNORECASE), r"\1<redacted>"),
    (re.compile(r"(SharedAccessKey=)[^;:\s'\"]+", re.IGNORECASE), r"\1<redacted>"),
    (re.compile(r"(password[=:]\s*)[^\s,;'\"]+", re.IGNORECASE), r"\1<redacted>"),
)


def redact(text: str) -> str:
    """Replace every SAS signature, shared access key and password in text."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(logging.Formatter):
    """Formats a record, then redacts it, so a secret in an argument or traceback is caught."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(process: str, level: str) -> logging.Logger:
    """Send the process's log to stdout, where supervisord captures it, and return its logger."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        RedactingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

    # pymodbus logs every failed connect at ERROR; the reader logs those itself, once per change.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    return logging.getLogger(f"plcbridge.{process}")


def fields(**values: object) -> str:
    """Format values as key=value pairs, quoting those that contain spaces."""
    parts = []
    for key, value in values.items():
        text = str(value)
        if not text or any(ch.isspace() for ch in text) or '"' in text:
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)
