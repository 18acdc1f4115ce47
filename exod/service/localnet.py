"""macOS's Local Network permission, detected from the failure it causes.

A process that macOS does not allow on the local network sees its multicast sends fail with
EHOSTUNREACH ("No route to host"); nothing else says so. zeroconf reports a failed send only
through its logger (asyncio hands the error to its protocol's `error_received`, which logs it with
the exception attached), so `watch_mdns_sends` filters that logger and reports each failure here;
the first that looks like a denial is logged with the way to grant the permission, and the flag
is kept for `exoctl status` to show.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import sys
from dataclasses import dataclass

log = logging.getLogger("exod.localnet")

# zeroconf's own logger, and where its sends go: its queries and announcements are multicast,
# and the error it logs does not say where a failed datagram was going.
ZEROCONF_LOGGER = "zeroconf"
MDNS_GROUP = "224.0.0.251"

CONDITION = "local_network_denied"
ADVICE = (
    "macOS does not allow exod on the local network, so it cannot find its peers: open System "
    "Settings, Privacy & Security, Local Network, switch exod on, then restart the service "
    "(`exoctl service install` again); see docs/troubleshooting.md"
)


def is_denial(err: OSError, destination: str, platform: str = sys.platform) -> bool:
    """Whether a failed send to `destination` is macOS refusing the Local Network permission."""
    if platform != "darwin" or err.errno != errno.EHOSTUNREACH:
        return False
    try:
        return ipaddress.ip_address(destination.split("%", 1)[0]).is_multicast
    except ValueError:
        return False


def log_line() -> str:
    """What exod logs; `exoctl service status` looks for CONDITION in the log."""
    return f"{CONDITION}: multicast sends fail with No route to host. {ADVICE}"


def in_log(lines: list[str]) -> bool:
    return any(CONDITION in line for line in lines)


@dataclass
class LocalNetwork:
    """The daemon's view: denied once a send looked like a denial, until one succeeds."""

    denied: bool = False

    def send_failed(self, err: OSError, destination: str, platform: str = sys.platform) -> None:
        if is_denial(err, destination, platform) and not self.denied:
            self.denied = True
            log.error(log_line())

    def send_succeeded(self) -> None:
        if self.denied:
            self.denied = False
            log.warning("multicast sends work again: the Local Network permission was granted")


class _SendFailures(logging.Filter):
    """Passes every record on; reports those that carry an OSError to the LocalNetwork."""

    def __init__(self, localnet: LocalNetwork, platform: str) -> None:
        super().__init__()
        self._localnet = localnet
        self._platform = platform

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError):
            self._localnet.send_failed(exc, MDNS_GROUP, self._platform)
        return True


def watch_mdns_sends(localnet: LocalNetwork, platform: str = sys.platform) -> logging.Filter:
    """Report zeroconf's failed sends to `localnet` (returns the filter, to remove it)."""
    watcher = _SendFailures(localnet, platform)
    logging.getLogger(ZEROCONF_LOGGER).addFilter(watcher)
    return watcher
