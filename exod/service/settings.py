"""The settings the service runs with: baked into its unit or agent at install time, checked with
exod's own parser first, and read back from the installed files by `status`, `logs` and
`uninstall`.

A service does not run in the shell that installed it: systemd starts a user unit in the home
directory, launchd in /, each with an environment of its own. So every setting is baked in as
exod would read it in the installing shell: relative paths made absolute, and EXOD_HOME always
written out, so that the service keeps the state dir that this shell's exoctl looks in.
"""

from __future__ import annotations

import plistlib
from collections.abc import Mapping
from pathlib import Path

from exod import config
from exod.home import default_home
from exod.service import systemd
from exod.service.paths import LinuxPaths, MacPaths, Platform, user_home
from exod.service.plan import carried_environment


def _sys_platform(platform: Platform) -> str:
    return "darwin" if platform == "macos" else "linux"


def service_home(environ: Mapping[str, str], platform: Platform) -> Path:
    """The state dir of an exod started with `environ` on `platform`, as exod would choose it,
    without checking any other setting."""
    home = environ.get("EXOD_HOME")
    if home:
        return Path(home).expanduser().absolute()
    return default_home(environ, _sys_platform(platform))


def service_socket(environ: Mapping[str, str], platform: Platform) -> Path:
    """Its control socket: EXOD_SOCKET, else exod.sock in its home."""
    socket = environ.get("EXOD_SOCKET")
    if socket:
        return Path(socket).expanduser().absolute()
    return service_home(environ, platform) / "exod.sock"


def baked_environment(
    environ: Mapping[str, str],
    platform: Platform,
    flags: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """The EXOD_* settings of `environ`, and exod's flags given to `install` (by setting name,
    as config.load takes them; a flag wins over its variable, as in exod), as the service must
    carry them: as variables. ConfigError, with exod's own words, when exod would refuse them,
    so that nothing is installed that cannot start."""
    flags = flags or {}
    carried = carried_environment(environ)
    carried.update({s.env: v for s in config.SETTINGS if (v := flags.get(s.name)) is not None})
    if "EXOD_HOME" not in carried:
        carried["EXOD_HOME"] = str(service_home(environ, platform))
    # Parsed here, in the installing shell's working directory: exod's parser makes each path
    # absolute, and the absolute path is what the service gets. The flags are passed as flags
    # so that a refusal names the flag that was typed, as exod's would.
    settings = config.load(flags, {**environ, **carried})
    for setting in config.SETTINGS:
        value = getattr(settings, setting.name)
        if carried.get(setting.env) and isinstance(value, Path):
            carried[setting.env] = str(value)
    # And once more on exactly what the service will see: its HOME and these settings.
    config.load({}, {"HOME": str(user_home(environ)), **carried})
    return carried


def installed_environment(platform: Platform, environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment the installed unit or agent gives exod; None when none is installed (or
    it cannot be read)."""
    try:
        if platform == "macos":
            agent = plistlib.loads(MacPaths.of(environ).agent.read_bytes())
            given = agent.get("EnvironmentVariables", {})
            return {str(k): str(v) for k, v in given.items()} if isinstance(given, dict) else {}
        return systemd.environment_of(LinuxPaths.of(environ).unit.read_text())
    except (OSError, ValueError, plistlib.InvalidFileException):
        return None


def where_it_runs(platform: Platform, environ: Mapping[str, str]) -> tuple[Path, Path]:
    """(home, socket): the installed service's when there is one, else those of an exod started
    from this shell."""
    installed = installed_environment(platform, environ)
    given = environ if installed is None else {"HOME": str(user_home(environ)), **installed}
    return service_home(given, platform), service_socket(given, platform)
