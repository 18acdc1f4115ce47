"""macOS's Application Firewall as socketfilterfw tells it: the parsers on the texts macOS
versions print, the decision, and the reading that `exoctl status` shows (macOS only, in a
cluster only, once a minute, any failure meaning no warning)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Sequence

import pytest

from exod.service import firewall
from exod.service.firewall import Firewall, Reading

PYTHON = "/opt/homebrew/Cellar/python@3.12/3.12.7/Frameworks/Python.framework/Versions/3.12/Resources/Python.app/Contents/MacOS/Python"  # noqa: E501  # a real path is this long

ON = "Firewall is enabled. (State = 1)\n"
OFF = "Firewall is disabled. (State = 0)\n"
ESSENTIAL_ONLY = "Firewall is blocking all non-essential incoming connections. (State = 2)\n"
BLOCK_ALL_ON = "Firewall has block all state set to enabled.\n"
BLOCK_ALL_OFF = "Firewall has block all state set to disabled.\n"
LISTAPPS = (
    "ALF: total number of apps = 3 \n"
    "\n"
    "1 :  /usr/libexec/bootpd \n"
    " \t ( Allow incoming connections ) \n"
    "\n"
    f"2 :  {PYTHON} \n"
    " \t ( Block incoming connections ) \n"
    "\n"
    "3 :  /System/Library/CoreServices/Problem%20Reporter.app \n"
    " \t ( Allow incoming connections ) \n"
)
NOT_PART = "The application is not part of the firewall \n"


def listing(*apps: tuple[str, bool]) -> str:
    lines = [f"ALF: total number of apps = {len(apps)} ", ""]
    for i, (path, allow) in enumerate(apps, 1):
        verdict = "Allow" if allow else "Block"
        lines += [f"{i} :  {path} ", f" \t ( {verdict} incoming connections ) ", ""]
    return "\n".join(lines)


# --- parsers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "state"), [(ON, 1), (OFF, 0), (ESSENTIAL_ONLY, 2), ("", None)])
def test_global_state(text: str, state: int | None) -> None:
    assert firewall.parse_global_state(text) == state


@pytest.mark.parametrize(
    ("text", "on"),
    [
        (BLOCK_ALL_ON, True),
        (BLOCK_ALL_OFF, False),
        ("Block all ENABLED! \n", True),  # macOS 12 and earlier
        ("Block all DISABLED! \n", False),
        (
            "Firewall settings cannot be modified from command line on managed Mac computers.\n",
            None,
        ),
    ],
)
def test_block_all(text: str, on: bool | None) -> None:
    assert firewall.parse_block_all(text) is on


@pytest.mark.parametrize(
    ("text", "blocked"),
    [
        (f"Incoming connection to {PYTHON} is blocked \n", True),
        (f"Incoming connection to {PYTHON} is permitted \n", False),
        (
            f"Application at path ( {PYTHON} ) is blocked from accepting incoming connections.",
            True,
        ),
        (
            f"Application at path ( {PYTHON} ) is not blocked from accepting incoming connections.",
            False,
        ),
        (NOT_PART, None),
        ("", None),
    ],
)
def test_app_blocked(text: str, blocked: bool | None) -> None:
    assert firewall.parse_app_blocked(text) is blocked


def test_listapps() -> None:
    assert firewall.parse_listapps(LISTAPPS) == {
        "/usr/libexec/bootpd": True,
        PYTHON: False,
        "/System/Library/CoreServices/Problem Reporter.app": True,  # listed percent-encoded
    }
    assert firewall.parse_listapps("ALF: total number of apps = 0 \n") == {}
    assert firewall.parse_listapps("usage: socketfilterfw [-h] ...") is None


# --- the decision -----------------------------------------------------------------------------


def test_off_or_unknown_is_no_warning() -> None:
    assert firewall.finding(Reading(0), PYTHON) is None
    assert firewall.finding(Reading(None), PYTHON) is None


def test_on_and_allowed_is_no_warning() -> None:
    reading = Reading(1, block_all=False, apps={PYTHON: True}, app_blocked=False)
    assert firewall.finding(reading, PYTHON) is None


def test_blocking_everything_says_how_to_stop_it() -> None:
    for reading in (
        Reading(1, block_all=True, apps={PYTHON: True}),
        Reading(2, block_all=None, apps=None),
    ):
        assert firewall.finding(reading, PYTHON) == (
            "macOS's Application Firewall blocks all incoming connections, so this node's peers "
            "cannot reach it: in System Settings > Network > Firewall > Options, turn off 'Block "
            f"all incoming connections' and allow {PYTHON}, then restart exod; see "
            "docs/troubleshooting.md"
        )


def test_not_listed_says_the_command_with_the_real_path() -> None:
    message = firewall.finding(Reading(1, block_all=False, apps={}), PYTHON)
    assert message == (
        f"macOS's Application Firewall does not list as allowed {PYTHON} (the Python exod runs "
        "as), so this node's peers cannot reach it: allow it in System Settings > Network > "
        "Firewall > Options, or run `sudo /usr/libexec/ApplicationFirewall/socketfilterfw --add "
        f"{PYTHON} --unblockapp {PYTHON}`, then restart exod; see docs/troubleshooting.md"
    )
    assert "\n" not in message


def test_blocked_by_the_list_or_by_getappblocked() -> None:
    for reading in (
        Reading(1, block_all=False, apps={PYTHON: False}),
        Reading(1, block_all=False, apps={PYTHON: True}, app_blocked=True),
        Reading(1, block_all=False, apps=None, app_blocked=True),
    ):
        message = firewall.finding(reading, PYTHON)
        assert message is not None
        assert message.startswith(
            f"macOS's Application Firewall blocks incoming connections to {PYTHON} "
        )


def test_a_path_with_spaces_is_quoted_in_the_command() -> None:
    exe = "/Users/me/Library/Application Support/exod/venv/bin/python3.12"
    message = firewall.finding(Reading(1, block_all=False, apps={}), exe)
    assert message is not None
    assert f"--add '{exe}' --unblockapp '{exe}'`" in message


def test_an_unreadable_list_alone_is_no_warning() -> None:
    # getappblocked answers "permitted" even for an app the firewall never heard of: only the
    # list can say "not listed", so without it nothing is claimed.
    assert (
        firewall.finding(Reading(1, block_all=False, apps=None, app_blocked=False), PYTHON) is None
    )


# --- reading socketfilterfw -------------------------------------------------------------------


class Tool:
    """socketfilterfw as it answers on a Mac, and the calls it got."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, args: Sequence[str]) -> str:
        self.calls.append(list(args))
        answer = self.answers[args[0]]
        if answer == "timeout":
            raise subprocess.TimeoutExpired([firewall.SOCKETFILTERFW, *args], firewall.TIMEOUT_S)
        return answer


def mac(listed: str = LISTAPPS, state: str = ON) -> Tool:
    return Tool(
        {
            "--getglobalstate": state,
            "--getblockall": BLOCK_ALL_OFF,
            "--listapps": listed,
            "--getappblocked": f"Incoming connection to {PYTHON} is blocked \n",
        }
    )


def test_reading_a_mac_whose_firewall_blocks_exods_python() -> None:
    tool = mac()
    reading = firewall.read_firewall(PYTHON, tool)
    assert reading.state == 1 and reading.block_all is False and reading.app_blocked is True
    assert reading.apps is not None and reading.apps[PYTHON] is False
    assert ["--getappblocked", PYTHON] in tool.calls


def test_a_firewall_that_is_off_is_asked_nothing_more() -> None:
    tool = mac(state=OFF)
    assert firewall.read_firewall(PYTHON, tool) == Reading(0)
    assert tool.calls == [["--getglobalstate"]]


def test_the_real_tool_is_absent_here_and_that_raises() -> None:
    with pytest.raises(OSError):
        firewall.socketfilterfw(["--getglobalstate"])


# --- the daemon's view ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch(tool: Tool, platform: str = "darwin", clock: Clock | None = None) -> Firewall:
    return Firewall(platform, tool, lambda: PYTHON, clock or Clock())


def test_status_shows_it_from_the_first_call_in_a_cluster_on_macos() -> None:
    tool = mac(listed=listing(("/usr/libexec/bootpd", True)))
    tool.answers["--getappblocked"] = NOT_PART
    message = asyncio.run(watch(tool).warning(in_cluster=True))
    assert message is not None and "does not list as allowed" in message


def test_outside_a_cluster_or_off_macos_nothing_is_run() -> None:
    tool = mac()
    assert asyncio.run(watch(tool).warning(in_cluster=False)) is None
    assert asyncio.run(watch(tool, platform="linux").warning(in_cluster=True)) is None
    assert tool.calls == []


def test_read_at_most_once_a_minute() -> None:
    async def scenario() -> None:
        clock = Clock()
        tool = mac()
        fw = watch(tool, clock=clock)
        assert await fw.warning(True) is not None
        calls = len(tool.calls)
        clock.now += 30
        assert await fw.warning(True) is not None
        assert len(tool.calls) == calls  # the cached answer
        # Allowed meanwhile: the next reading, a minute later, runs behind the status that
        # started it, and the one after that sees it.
        tool.answers["--listapps"] = listing((PYTHON, True))
        tool.answers["--getappblocked"] = f"Incoming connection to {PYTHON} is permitted \n"
        clock.now += 31
        await fw.warning(True)
        await asyncio.sleep(0.2)
        assert len(tool.calls) == 2 * calls
        assert await fw.warning(True) is None

    asyncio.run(scenario())


def test_a_failure_is_no_warning_and_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    tool = mac()
    tool.answers["--listapps"] = "timeout"
    with caplog.at_level(logging.DEBUG, logger="exod.firewall"):
        assert asyncio.run(watch(tool).warning(in_cluster=True)) is None
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert caplog.records[0].getMessage().startswith("could not read the Application Firewall:")
