"""macOS's Application Firewall, read with socketfilterfw, as it stands between peers and exod.

With the firewall on, an incoming connection to an app it does not list as allowed is held while
macOS asks the person at the screen (a dialog that a Mac on a desk with no one at it never
answers), and refused outright for an app set to block, or for every app when "Block all
incoming connections" is on. exod is an unsigned Python process, so it is in that case as soon
as it listens on its peer port: peers then see this node as unreachable, with nothing to say
why. What the firewall says is read here (`socketfilterfw`, no root needed) and shown as a
`warnings` entry by `exoctl status`, with what to do.

The texts differ between macOS versions; each parser knows the ones seen so far and answers
None for anything else, and None anywhere means "cannot tell": no warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

log = logging.getLogger("exod.firewall")

SOCKETFILTERFW = "/usr/libexec/ApplicationFirewall/socketfilterfw"
CONDITION = "firewall_blocks_peers"
TIMEOUT_S = 5.0  # one socketfilterfw call
PERIOD_S = 60.0  # the firewall is read at most this often
# How long `exoctl status` waits for the first reading (a later one refreshes behind it).
FIRST_WAIT_S = 1.0

_STATE = re.compile(r"\(State = (\d+)\)")
_APP = re.compile(r"^\s*\d+\s*:\s*(\S.*?)\s*$")
_VERDICT = re.compile(r"^\s*\(\s*(Allow|Block) incoming connections\s*\)\s*$", re.IGNORECASE)


def parse_global_state(text: str) -> int | None:
    """`--getglobalstate`: 0 off, 1 on, 2 on and blocking all but essential services.

    "Firewall is enabled. (State = 1)", "Firewall is disabled. (State = 0)", "Firewall is
    blocking all non-essential incoming connections. (State = 2)".
    """
    match = _STATE.search(text)
    return int(match.group(1)) if match else None


def parse_block_all(text: str) -> bool | None:
    """`--getblockall`: "Firewall has block all state set to enabled." (macOS 13 and later) or
    "Block all ENABLED!" (earlier); "disabled" and "DISABLED!" likewise."""
    low = " ".join(text.lower().split())
    for on, off in (
        ("block all state set to enabled", "block all state set to disabled"),
        ("block all enabled", "block all disabled"),
    ):
        if on in low:
            return True
        if off in low:
            return False
    return None


def parse_app_blocked(text: str) -> bool | None:
    """`--getappblocked PATH`: whether the firewall blocks that app; None when it does not know
    it or the text is new. "Application at path ( P ) is blocked from accepting incoming
    connections." / "... is not blocked ..." (recent macOS); "Incoming connection to P is
    blocked" / "... is permitted" (earlier); "The application is not part of the firewall".

    Some versions answer "permitted" for an app they have never heard of, which is why the
    list of apps (`--listapps`) decides whether exod's Python is allowed, and this only adds a
    block that the list does not show.
    """
    low = " ".join(text.lower().split())
    if "not part of the firewall" in low:
        return None
    if "is not blocked" in low or "is permitted" in low:
        return False
    if "is blocked" in low:
        return True
    return None


def parse_listapps(text: str) -> dict[str, bool] | None:
    """`--listapps`: each app the firewall lists, and whether it allows incoming connections.

        ALF: total number of apps = 2

        1 :  /Applications/Foo.app
             ( Allow incoming connections )

        2 :  /opt/homebrew/Cellar/python@3.12/.../Python.app/Contents/MacOS/Python
             ( Block incoming connections )

    None when the header is missing (not a list this parser knows). Paths come as listed, some
    percent-encoded (`Problem%20Reporter.app`), decoded here.
    """
    lines = text.splitlines()
    if not any(line.strip().startswith("ALF: total number of apps") for line in lines):
        return None
    apps: dict[str, bool] = {}
    path: str | None = None
    for line in lines:
        app = _APP.match(line)
        if app is not None:
            path = unquote(app.group(1))
            continue
        verdict = _VERDICT.match(line)
        if verdict is not None and path is not None:
            apps[path] = verdict.group(1).lower() == "allow"
            path = None
    return apps


@dataclass(frozen=True)
class Reading:
    """What socketfilterfw said; None where it said nothing this code understands."""

    state: int | None
    block_all: bool | None = None
    apps: Mapping[str, bool] | None = None  # keys as `executable` is given: resolved paths
    app_blocked: bool | None = None


def allow_command(executable: str) -> str:
    quoted = shlex.quote(executable)
    return f"sudo {SOCKETFILTERFW} --add {quoted} --unblockapp {quoted}"


def finding(reading: Reading, executable: str) -> str | None:
    """The warning's message, or None when the firewall lets peers reach exod (pure).

    Warns when the firewall is on and either blocks all incoming connections, or does not list
    `executable` (the Python exod runs as, resolved) as allowed.
    """
    if reading.state not in (1, 2):
        return None  # off, or not known
    see = "see docs/troubleshooting.md"
    if reading.state == 2 or reading.block_all:
        return (
            "macOS's Application Firewall blocks all incoming connections, so this node's "
            "peers cannot reach it: in System Settings > Network > Firewall > Options, turn off "
            f"'Block all incoming connections' and allow {executable}, then restart exod; {see}"
        )
    allowed = reading.apps.get(executable) if reading.apps is not None else None
    if reading.app_blocked or allowed is False:
        why = "blocks incoming connections to"
    elif reading.apps is not None and allowed is None:
        why = "does not list as allowed"
    else:
        return None
    return (
        f"macOS's Application Firewall {why} {executable} (the Python exod runs as), so this "
        "node's peers cannot reach it: allow it in System Settings > Network > Firewall > "
        f"Options, or run `{allow_command(executable)}`, then restart exod; {see}"
    )


Tool = Callable[[Sequence[str]], str]


def socketfilterfw(args: Sequence[str]) -> str:
    """socketfilterfw's output; raises OSError or subprocess.SubprocessError on failure."""
    return subprocess.run(  # a fixed program, arguments exod chose
        [SOCKETFILTERFW, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,  # its exit status is not documented; the text is what it says
    ).stdout


def read_firewall(executable: str, tool: Tool = socketfilterfw) -> Reading:
    """Ask socketfilterfw (blocking: call it from a thread). The rest is not asked once the
    firewall is known off. Raises what `tool` raises."""
    state = parse_global_state(tool(["--getglobalstate"]))
    if state not in (1, 2):
        return Reading(state)
    listed = parse_listapps(tool(["--listapps"]))
    apps = None if listed is None else {os.path.realpath(p): ok for p, ok in listed.items()}
    return Reading(
        state,
        block_all=parse_block_all(tool(["--getblockall"])),
        apps=apps,
        app_blocked=parse_app_blocked(tool(["--getappblocked", executable])),
    )


def running_executable() -> str:
    """The binary this process runs, as the firewall judges it: a venv's `python` is a link,
    and a framework build's `bin/python3` starts `Python.app/Contents/MacOS/Python`."""
    import psutil  # only here: the rest of this module stays importable without it

    try:
        return os.path.realpath(psutil.Process().exe())
    except (psutil.Error, OSError):
        return os.path.realpath(sys.executable)


class Firewall:
    """The daemon's view, for `exoctl status`: read only on macOS and only while the node is in
    a cluster (the peer port listens), at most once a PERIOD_S, in a thread. Any failure means
    no warning (logged at debug)."""

    def __init__(
        self,
        platform: str = sys.platform,
        tool: Tool = socketfilterfw,
        executable: Callable[[], str] = running_executable,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._platform = platform
        self._tool = tool
        self._executable = executable
        self._clock = clock
        self._message: str | None = None
        self._read_at: float | None = None
        self._reading: asyncio.Task[None] | None = None

    async def warning(self, in_cluster: bool) -> str | None:
        """The message of the `firewall_blocks_peers` warning, or None."""
        if self._platform != "darwin" or not in_cluster:
            return None
        now = self._clock()
        first = self._read_at is None
        stale = self._read_at is None or now - self._read_at >= PERIOD_S
        if self._reading is None and stale:
            self._read_at = now
            self._reading = asyncio.create_task(self._refresh())
        if first and self._reading is not None:
            # Shielded: a status that stops waiting leaves the reading to finish for the next.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reading), FIRST_WAIT_S)
        return self._message

    async def _refresh(self) -> None:
        try:
            self._message = await asyncio.to_thread(self._check)
        finally:
            self._reading = None

    def _check(self) -> str | None:
        try:
            executable = self._executable()
            return finding(read_firewall(executable, self._tool), executable)
        except (OSError, subprocess.SubprocessError) as e:
            log.debug("could not read the Application Firewall: %s", e)
            return None
