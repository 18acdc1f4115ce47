"""The wheel, as a packager builds it with `python -m build`: both commands, and the files that
`exoctl service install` needs at run time (the launcher of exod.app is package data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_installs_both_commands_and_can_install_the_service(tmp_path: Path) -> None:
    # Built from a copy, so that the build's own files stay out of the checkout.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for package in ("exod", "exoctl"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    # --no-isolation: the build backend is already in this environment (the network may not be).
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", "dist", "src"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("exod-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = z.read(entry_points).decode()
    assert "exod = exod.__main__:main" in scripts
    assert "exoctl = exoctl.__main__:main" in scripts
    assert "exod/service/exod-launcher.sh" in names

    # Installed on its own (its dependencies are this environment's), the commands run from it.
    target = tmp_path / "target"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"),
            *("--target", str(target), str(wheel)),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "HOME": str(tmp_path / "home")}
    # install checks the socket it would bake in: the default one under this long HOME's
    # ~/Library/Application Support would not fit in a Unix socket's 103 bytes.
    env["EXOD_SOCKET"] = "/tmp/exod-wheel-test.sock"  # never created: a dry run
    for command in ("exod", "exoctl"):
        shown = subprocess.run(
            [str(target / "bin" / command), "--version"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        assert shown.stdout.startswith(f"{command} ")
    dry_run = subprocess.run(
        [str(target / "bin" / "exoctl"), "service", "install", "--dry-run", "--platform", "macos"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "       #!/bin/sh" in dry_run.stdout.splitlines()
    where = subprocess.run(
        [sys.executable, "-c", "import exod.service; print(exod.service.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(target))  # it was the wheel's code that ran
