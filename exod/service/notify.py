"""The systemd notify protocol (sd_notify(3)) in plain Python: datagrams to $NOTIFY_SOCKET.

systemd starts a `Type=notify` service with NOTIFY_SOCKET (and, with `WatchdogSec=`,
WATCHDOG_USEC) in its environment and waits for `READY=1` before it calls the service started.
Outside systemd none of these are set and every method here does nothing, so the daemon calls
them unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

log = logging.getLogger("exod.notify")

# The variables systemd gives a notify service; removed from our environment once read so that
# runner subprocesses cannot speak for exod (systemd would ignore them, NotifyAccess=main, but a
# runner has no business seeing them).
VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(text: str) -> str | bytes | None:
    """The address to send to for a NOTIFY_SOCKET value; None when it is not one we can use.

    A leading `@` names a socket in Linux's abstract namespace, which Python spells with a NUL.
    """
    if text.startswith("@") and len(text) > 1:
        return b"\0" + text[1:].encode()
    if text.startswith("/"):
        return text
    return None  # empty, relative, or vsock: ("vsock:..."), which a user unit never gets


def watchdog_period(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.

    None when the watchdog is off, the value is not a positive integer, or WATCHDOG_PID names
    another process (the watchdog was meant for whoever started us, not for us).
    """
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and owner != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


def message(**fields: str) -> bytes:
    """`KEY=value` lines as one datagram; newlines in a value would start a new field."""
    return "\n".join(f"{k}={' '.join(v.split())}" for k, v in fields.items()).encode()


@dataclass
class Notifier:
    """Sends notifications to the service manager; a no-op when none asked for them."""

    address: str | bytes | None = None
    watchdog: float | None = None  # seconds between pings, when the watchdog is on

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> Notifier:
        """Read (and remove) systemd's variables; see VARIABLES for why they are removed."""
        address = socket_address(environ.get("NOTIFY_SOCKET", ""))
        period = watchdog_period(environ, os.getpid())
        for name in VARIABLES:
            environ.pop(name, None)
        return cls(address, period if address is not None else None)

    def send(self, **fields: str) -> None:
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message(**fields), self.address)
        except OSError as e:
            # The manager went away or the socket is full: nothing exod does depends on it.
            log.warning("cannot notify the service manager at %r: %s", self.address, e)

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def ping(self) -> None:
        self.send(WATCHDOG="1")

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=status)
