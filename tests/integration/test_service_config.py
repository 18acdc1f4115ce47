"""A configuration mistake ends exod with 78 and one line, so that no service manager
restart-loops on it (the unit's RestartPreventExitStatus=78; the launcher's exit 0)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exod.service import systemd


def run_exod(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exod", *args],
        env={"PATH": "/usr/bin:/bin", "EXOD_HOME": str(tmp_path / "home"), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        ((), {"EXOD_KILL_GRACE": "-1"}, "EXOD_KILL_GRACE"),  # a negative timeout
        (("--idle-ttl=-5",), {}, "--idle-ttl '-5'"),
        ((), {"EXOD_QUEUE_DEPTH": "many"}, "EXOD_QUEUE_DEPTH"),
        (("--no-such-flag",), {}, "--no-such-flag"),
    ],
)
def test_invalid_configuration_exits_78_with_one_line(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], named: str
) -> None:
    result = run_exod(tmp_path, *args, **env)
    assert result.returncode == systemd.EX_CONFIG == 78, result
    (line,) = result.stderr.splitlines()
    assert line.startswith("exod: ")
    assert named in line
    assert not (tmp_path / "home" / "exod.db").exists()  # refused before touching anything
