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
# A lowercase text without any of these contains no match of _SECRET_PATTERNS.
_SECRET_MARKERS = ("sig=", "sharedaccesskey=", "password")


def redact(text: str) -> str:
    """Replace every SAS signature, shared access key and password in text."""
    # The taps redact every data copy, and the three case-insensitive scans were most of
    # the cost of a copy. In ASCII text a lowercase substring test finds every place where
    # a pattern could match, so text without one is returned at once. Non-ASCII text always
    # gets the scans, because case-insensitive matching there also pairs some non-ASCII
    # letters with ASCII ones, such as the long s with s.
    if text.isascii():
        lowered = text.lower()
        if not any(marker in lowered for marker in _SECRET_MARKERS):
            return text
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


# Escapes for characters that would break a log line or hide in it. Every other character
# that str.isprintable() rejects is written as \xNN, \uNNNN or \UNNNNNNNN.
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def fields(**values: object) -> str:
    """Format values as key=value pairs, quoting those with spaces, quotes or control characters.

    A quoted value has its backslashes, quotes and non-printable characters escaped, so a
    value from a client (a newline in an MQTT client id, say) can never start a new line.
    """
    parts = []
    for key, value in values.items():
        text = str(value)
        if not text or '"' in text or not all(ch.isprintable() and not ch.isspace()
                                               for ch in text):
            text = '"' + "".join(_escape(ch) for ch in text) + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _escape(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    if ch.isprintable():
        return ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
