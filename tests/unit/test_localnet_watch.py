"""macOS's Local Network denial, seen through zeroconf's logger: the way zeroconf reports a
failed multicast send (a warning with the OSError attached) sets the flag that `exoctl status`
shows, once, and only for the error macOS gives."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator

import pytest

from exod.service import localnet
from exod.service.localnet import LocalNetwork

ZEROCONF = logging.getLogger(localnet.ZEROCONF_LOGGER)


@pytest.fixture
def watched() -> Iterator[tuple[LocalNetwork, list[logging.LogRecord]]]:
    """A LocalNetwork watching zeroconf's logger as on macOS, and the records that got through."""
    net = LocalNetwork()
    watcher = localnet.watch_mdns_sends(net, platform="darwin")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    ZEROCONF.addHandler(keep)
    try:
        yield net, seen
    finally:
        ZEROCONF.removeHandler(keep)
        ZEROCONF.removeFilter(watcher)


def send_fails(code: int) -> None:
    """What zeroconf's listener does when asyncio hands it a send error."""
    exc = OSError(code, "No route to host")
    ZEROCONF.warning("Error with socket 5 (('0.0.0.0', 5353))): %s", exc, exc_info=exc)


def test_no_route_to_host_on_a_multicast_send_is_the_denial(
    watched: tuple[LocalNetwork, list[logging.LogRecord]], caplog: pytest.LogCaptureFixture
) -> None:
    net, seen = watched
    with caplog.at_level(logging.ERROR, logger="exod.localnet"):
        send_fails(errno.EHOSTUNREACH)
        send_fails(errno.EHOSTUNREACH)
    assert net.denied
    assert [r.getMessage() for r in caplog.records] == [localnet.log_line()]  # once
    assert len(seen) == 2  # zeroconf's own records still go on


def test_other_errors_are_not_the_denial(
    watched: tuple[LocalNetwork, list[logging.LogRecord]],
) -> None:
    net, _ = watched
    send_fails(errno.ENETDOWN)
    ZEROCONF.warning("no exception attached")
    assert not net.denied


def test_off_macos_the_same_error_is_not_a_denial() -> None:
    net = LocalNetwork()
    watcher = localnet.watch_mdns_sends(net, platform="linux")
    try:
        send_fails(errno.EHOSTUNREACH)
    finally:
        ZEROCONF.removeFilter(watcher)
    assert not net.denied
