"""The service files and plans, rendered from data: every key the platforms need, quoting that
survives odd paths, and the packagers' templates kept in step with the code."""

from __future__ import annotations

import errno
import plistlib
from pathlib import Path

import pytest

from exod.service import launchd, localnet, plan, systemd, templates
from exod.service.paths import LABEL, LinuxPaths, MacPaths
from exod.service.state import from_launchctl_print, from_systemctl_show

ROOT = Path(__file__).resolve().parents[2]
EXOD = Path("/opt/exod/bin/exod")
MAC = MacPaths.of({"HOME": "/Users/ada"})
LINUX = LinuxPaths.of({"HOME": "/home/ada"})


# --- macOS ----------------------------------------------------------------------------------------


def test_info_plist_carries_the_local_network_keys_and_no_dock_icon() -> None:
    info = plistlib.loads(launchd.bundle_files("1.2.3")["Contents/Info.plist"][0])
    assert info["NSLocalNetworkUsageDescription"]
    assert info["NSBonjourServices"] == ["_exod._tcp"]
    assert info["CFBundleIdentifier"] == LABEL
    assert info["CFBundleExecutable"] == "exod-launcher"
    assert info["CFBundlePackageType"] == "APPL"
    assert info["CFBundleVersion"] == "1.2.3"
    assert info["LSUIElement"] is True


def test_the_launcher_is_an_executable_shell_script_that_does_not_exec() -> None:
    content, mode = launchd.bundle_files("1")["Contents/MacOS/exod-launcher"]
    assert mode == 0o755
    script = content.decode()
    assert script.startswith("#!/bin/sh\n")
    code = [line.strip() for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert 'exod "$@" &' in code
    assert not [line for line in code if line.startswith("exec")]


def test_agent_plist_starts_the_bundle_and_restarts_on_failure() -> None:
    install = plan.macos_install(MAC, plan.Service(EXOD, {"EXOD_HOME": "/d"}), "1", uid=501)
    (agent_write,) = [s for s in install.files if isinstance(s, plan.Write) and s.path == MAC.agent]
    agent = plistlib.loads(agent_write.content)
    assert agent["Label"] == LABEL
    assert agent["ProgramArguments"] == [
        "/Users/ada/Applications/exod.app/Contents/MacOS/exod-launcher"
    ]
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["ThrottleInterval"] > 0
    assert agent["ProcessType"] == "Interactive"
    assert agent["LimitLoadToSessionType"] == "Aqua"
    assert agent["StandardOutPath"] == agent["StandardErrorPath"] == str(MAC.log)
    assert agent["EnvironmentVariables"] == {
        "PATH": "/opt/exod/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "EXOD_HOME": "/d",
    }
    assert agent["AssociatedBundleIdentifiers"] == [LABEL]
    # The program launchd starts is a file this plan writes, executable.
    (launcher,) = [s for s in install.files if isinstance(s, plan.Write) and s.mode == 0o755]
    assert str(launcher.path) == agent["ProgramArguments"][0]


def test_macos_plans_bootstrap_and_bootout_the_gui_domain() -> None:
    install = plan.macos_install(MAC, plan.Service(EXOD), "1", uid=501)
    assert [str(c) for c in install.after] == [
        "launchctl enable gui/501/org.exod.daemon",
        "launchctl bootstrap gui/501 /Users/ada/Library/LaunchAgents/org.exod.daemon.plist",
    ]
    assert plan.MakeDir(MAC.log.parent) in install.files  # launchd does not make it
    remove = plan.macos_uninstall(MAC, uid=501)
    assert [str(c) for c in remove.before] == ["launchctl bootout gui/501/org.exod.daemon"]
    assert remove.files == (plan.Remove(MAC.agent), plan.Remove(MAC.bundle))


def test_plist_values_are_escaped() -> None:
    agent = launchd.agent_plist("/a & <b>/x", "/l", {"EXOD_HOME": "</string>"})
    assert plistlib.loads(launchd.dumps(agent))["EnvironmentVariables"]["EXOD_HOME"] == "</string>"


# --- Linux ----------------------------------------------------------------------------------------


def unit_settings(text: str) -> list[tuple[str, str]]:
    return [
        (k, v)
        for k, _, v in (line.partition("=") for line in text.splitlines())
        if v and not k.startswith("#")
    ]


def test_unit_has_every_setting_the_issue_asks_for() -> None:
    text = systemd.unit([str(EXOD)], {"EXOD_HOME": "/d"})
    settings = unit_settings(text)
    for expected in [
        ("Type", "notify"),
        ("ExecStart", "/opt/exod/bin/exod"),
        ("Environment", '"EXOD_HOME=/d"'),
        ("WatchdogSec", "20"),
        ("Restart", "on-failure"),
        ("RestartSec", "2"),
        ("RestartPreventExitStatus", "78"),
        ("KillMode", "mixed"),
        ("TimeoutStopSec", "30"),
        ("WantedBy", "default.target"),
    ]:
        assert expected in settings, expected
    assert text.index("[Service]") < text.index("Type=") < text.index("[Install]")


@pytest.mark.parametrize(
    ("arg", "quoted"),
    [
        ("/usr/bin/exod", "/usr/bin/exod"),
        ("/Users/a b/exod", '"/Users/a b/exod"'),
        ("/x/100%/exod", '"/x/100%%/exod"'),
        ("/x/$HOME/exod", '"/x/$$HOME/exod"'),
        ('/x/"q"\\', '"/x/\\"q\\"\\\\"'),
    ],
)
def test_exec_start_words_are_quoted_when_needed(arg: str, quoted: str) -> None:
    assert systemd.exec_arg(arg) == quoted


def test_environment_values_escape_specifiers_and_quotes() -> None:
    line = systemd.environment_line("EXOD_HOME", '/d 100% "x"')
    assert line == 'Environment="EXOD_HOME=/d 100%% \\"x\\""'


def test_linux_plans_enable_now_and_disable_now() -> None:
    install = plan.linux_install(LINUX, plan.Service(EXOD))
    assert install.files[0].path == Path("/home/ada/.config/systemd/user/exod.service")
    assert [str(c) for c in install.after] == [
        "systemctl --user daemon-reload",
        "systemctl --user enable --now exod.service",
    ]
    assert any("loginctl enable-linger" in note for note in install.notes)
    remove = plan.linux_uninstall(LINUX)
    assert [str(c) for c in remove.before] == ["systemctl --user disable --now exod.service"]
    assert remove.files == (plan.Remove(LINUX.unit),)


def test_the_unit_goes_to_xdg_config_home_when_set() -> None:
    paths = LinuxPaths.of({"HOME": "/home/ada", "XDG_CONFIG_HOME": "/cfg"})
    assert paths.unit == Path("/cfg/systemd/user/exod.service")


# --- what the service runs ------------------------------------------------------------------------


def test_the_service_keeps_the_exod_settings_of_the_installing_shell() -> None:
    environ = {"EXOD_HOME": "/d", "EXOD_LOG_LEVEL": "debug", "PATH": "/bin", "HOME": "/h"}
    service = plan.service_for(EXOD, environ, source=None)
    assert service.environment == {"EXOD_HOME": "/d", "EXOD_LOG_LEVEL": "debug"}


def test_from_source_puts_the_checkout_first_on_the_import_path() -> None:
    service = plan.service_for(EXOD, {}, source=Path("/src/exod"))
    assert service.environment == {"PYTHONPATH": "/src/exod"}


def test_describe_shows_each_file_with_its_content_and_each_command() -> None:
    lines = plan.describe(plan.linux_install(LINUX, plan.Service(EXOD)))
    assert lines[0].startswith("check  systemctl --user show-environment")
    assert "write  /home/ada/.config/systemd/user/exod.service (mode 644):" in lines
    assert "       Type=notify" in lines
    assert lines[-1] == "run    systemctl --user enable --now exod.service"


# --- what the managers say ------------------------------------------------------------------------


def test_systemctl_show_is_parsed() -> None:
    running = from_systemctl_show(
        "LoadState=loaded\nActiveState=active\nSubState=running\nMainPID=42\nExecMainStatus=0\n"
    )
    assert (running.loaded, running.running, running.pid) == (True, True, 42)
    failed = from_systemctl_show(
        "LoadState=loaded\nActiveState=failed\nSubState=failed\nMainPID=0\nExecMainStatus=78\n"
    )
    assert (failed.running, failed.pid) == (False, None)
    assert failed.detail == "failed (failed), last exit status 78"
    assert not from_systemctl_show("LoadState=not-found\nActiveState=inactive\n").loaded


LAUNCHCTL_PRINT = """\
gui/501/org.exod.daemon = {
\tactive count = 1
\tpath = /Users/ada/Library/LaunchAgents/org.exod.daemon.plist
\ttype = LaunchAgent
\tstate = running

\tprogram = /Users/ada/Applications/exod.app/Contents/MacOS/exod-launcher
\tenvironment = {
\t\tPATH => /opt/exod/bin:/usr/bin:/bin:/usr/sbin:/sbin
\t}
\tpid = 812
\tlast exit code = (never exited)
}
"""


def test_launchctl_print_is_parsed() -> None:
    state = from_launchctl_print(LAUNCHCTL_PRINT)
    assert (state.loaded, state.running, state.pid) == (True, True, 812)
    assert state.detail == "running, last exit code (never exited)"


# --- Local Network --------------------------------------------------------------------------------


def unreachable() -> OSError:
    return OSError(errno.EHOSTUNREACH, "No route to host")


def test_a_multicast_send_refused_on_macos_is_a_local_network_denial() -> None:
    assert localnet.is_denial(unreachable(), "224.0.0.251", "darwin")
    assert localnet.is_denial(unreachable(), "ff02::fb%en0", "darwin")


@pytest.mark.parametrize(
    ("err", "destination", "platform"),
    [
        (unreachable(), "224.0.0.251", "linux"),  # only macOS has the permission
        (unreachable(), "192.168.1.20", "darwin"),  # unicast: a real routing problem
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "224.0.0.251", "darwin"),
        (unreachable(), "not an address", "darwin"),
    ],
)
def test_other_failures_are_not(err: OSError, destination: str, platform: str) -> None:
    assert not localnet.is_denial(err, destination, platform)


def test_the_daemon_logs_a_denial_once_with_the_way_to_grant_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    network = localnet.LocalNetwork()
    network.send_failed(unreachable(), "224.0.0.251", "darwin")
    network.send_failed(unreachable(), "224.0.0.251", "darwin")
    assert network.denied
    (record,) = caplog.records
    assert record.message.startswith("local_network_denied: ")
    assert "Privacy & Security" in record.message
    assert localnet.in_log([record.message])
    network.send_succeeded()
    assert not network.denied


# --- the packagers' templates ---------------------------------------------------------------------


def test_checked_in_templates_are_what_the_code_renders() -> None:
    for name, (content, mode) in templates.files().items():
        path = ROOT / name
        assert path.read_bytes() == content, f"{name} is stale: python tools/gen_service_files.py"
        assert bool(path.stat().st_mode & 0o111) == bool(mode & 0o111), name
