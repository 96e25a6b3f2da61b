"""Name resolution of plc.host on a worker thread, so that a hung resolver cannot stall the polls.

getaddrinfo has no timeout of its own. With a DNS server that never responds, glibc waits the
resolv.conf timeout times its attempts, 5 s times 2 by default, so a reader that resolved on
the poll loop stopped for 10 s at every connect attempt. The reader therefore runs every
lookup on a daemon thread and waits at most plc.timeout_s for it. Until a lookup returns, the
last addresses that resolved are used. A lookup that is still running is never started a
second time. An IP literal needs no lookup.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from common.errors import PlcError
from common.logs import fields

# The reasons that bad samples carry while there is no address to connect to.
REASON_RESOLVE = "name resolution failed"
REASON_INVALID_HOST = "invalid host name"

# An address family and a socket address, as getaddrinfo returns them.
Address = tuple[int, tuple[Any, ...]]
Resolve = Callable[[str, int], list[Address]]


class ResolveError(PlcError):
    """No address to connect to, with the short reason that bad samples carry."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def resolve_tcp(host: str, port: int) -> list[Address]:
    """Look up the TCP addresses of host with getaddrinfo, which may block for many seconds."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _type, _proto, _name, sockaddr in infos]


def literal_address(host: str, port: int) -> Address | None:
    """Return the address of an IPv4 or IPv6 literal, or None when host is a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return (family, (host, port))


def host_name_error(host: str) -> str | None:
    """Return why host cannot be looked up, or None when it can.

    getaddrinfo encodes the name with Python's idna codec first, which raises UnicodeError for
    an empty label ("a..b") or one longer than 63 characters.
    """
    if not host:
        return "the name is empty"
    try:
        host.encode("idna")
    except UnicodeError as exc:
        return _bad_label(host) or str(exc)
    return None


def _bad_label(host: str) -> str | None:
    labels = host.split(".")
    # A trailing dot marks a fully qualified name, so its empty last label is allowed.
    if len(labels) > 1 and not labels[-1]:
        labels.pop()
    for label in labels:
        if not label:
            return (
                "the name contains an empty label; every dot-separated label needs "
                "1 to 63 characters"
            )
        if len(label) > 63:
            return f"label {label[:16]}... has {len(label)} characters; at most 63 are allowed"
    return None


def format_address(address: Address) -> str:
    return str(address[1][0])


class _Lookup:
    """One lookup on a daemon thread. A hung one is abandoned, never joined.

    A daemon thread does not keep the process alive, so SIGTERM still stops the reader while
    getaddrinfo waits.
    """

    def __init__(self, resolve: Resolve, host: str, port: int) -> None:
        self.done = threading.Event()
        self.addresses: list[Address] = []
        self.error = "the lookup returned no addresses"
        thread = threading.Thread(
            target=self._run, args=(resolve, host, port), name="plc-host-lookup", daemon=True
        )
        thread.start()

    def _run(self, resolve: Resolve, host: str, port: int) -> None:
        # The finally matters: done must be set even if resolve raises something unexpected,
        # because the poll loop treats a lookup that is not done as still running.
        try:
            self.addresses = resolve(host, port)
            if self.addresses:
                self.error = ""
        except (OSError, UnicodeError, ValueError) as exc:
            self.error = str(exc) or type(exc).__name__
        finally:
            self.done.set()


class HostResolver:
    """The addresses of plc.host, looked up off the poll loop and kept from the last success.

    Failures are logged once per change: a lookup that runs past plc.timeout_s is logged only
    when no failure is already logged, and a failed lookup only when its error text changed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        timeout_s: float,
        logger: logging.Logger,
        resolve: Resolve = resolve_tcp,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._logger = logger
        self._resolve = resolve
        self._literal = literal_address(host, port)
        self._lookup: _Lookup | None = None
        self._last_good: list[Address] = []
        self._failing = False
        self._last_error = ""

        self.invalid_host = None if self._literal else host_name_error(host)
        if self.invalid_host is not None:
            self._logger.error(
                "plc_host_invalid %s",
                fields(
                    key="plc.host",
                    value=repr(host),
                    error=self.invalid_host,
                    consequence="every tag reads as bad; correct plc.host in the "
                    "configuration file and restart the reader",
                ),
            )

    def addresses(self) -> list[Address]:
        """Return the addresses to connect to, or raise ResolveError when there are none.

        Blocks for at most plc.timeout_s, and only when this call starts a new lookup.
        """
        if self._literal is not None:
            return [self._literal]
        if self.invalid_host is not None:
            raise ResolveError(
                f"plc.host {self.host!r} is not a valid host name: {self.invalid_host}",
                REASON_INVALID_HOST,
            )

        lookup = self._lookup
        if lookup is None:
            lookup = self._lookup = _Lookup(self._resolve, self.host, self.port)
            lookup.done.wait(self.timeout_s)
        if not lookup.done.is_set():
            return self._fallback(f"timed out after {self.timeout_s:g} s", timed_out=True)

        self._lookup = None
        if lookup.error:
            return self._fallback(lookup.error, timed_out=False)
        self._on_success(lookup.addresses)
        return lookup.addresses

    def _fallback(self, error: str, timed_out: bool) -> list[Address]:
        self._log_failure(error, timed_out)
        if self._last_good:
            return self._last_good
        raise ResolveError(f"resolving plc.host {self.host!r} failed: {error}", REASON_RESOLVE)

    def _log_failure(self, error: str, timed_out: bool) -> None:
        # Without these checks a resolver that alternately times out and then fails would
        # log two lines at every reconnect attempt.
        if timed_out and self._failing:
            return
        if not timed_out and error == self._last_error:
            return
        self._failing = True
        if not timed_out:
            self._last_error = error

        if self._last_good:
            fallback = format_address(self._last_good[0])
            consequence = f"the reader connects to the last resolved address {fallback}"
        else:
            fallback = "none"
            consequence = "every tag reads as bad until the name resolves"
        self._logger.warning(
            "name_resolution_failed %s",
            fields(host=self.host, error=error, fallback=fallback, consequence=consequence),
        )

    def _on_success(self, addresses: list[Address]) -> None:
        self._last_good = addresses
        if self._failing:
            self._logger.info(
                "name_resolution_recovered %s",
                fields(host=self.host, address=format_address(addresses[0])),
            )
        self._failing = False
        self._last_error = ""
