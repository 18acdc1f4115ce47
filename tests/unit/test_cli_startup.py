"""`exoctl status` imports grpc, the stubs and click, and little else; the commands of their own
module (`models`, `service`) are imported when named, and still listed and suggested."""

from __future__ import annotations

import subprocess
import sys

# What `exoctl status` must not pay for (its start-up is measured in bench/bench_cli.py).
HEAVY = [
    "exod.config",
    "exoctl.service",
    "exoctl.models",
    "exoctl.run",
    "exod.service.plan",
    "google.protobuf.json_format",
    "mlx",
]


def exoctl_in_fresh_python(*args: str) -> tuple[int, str, set[str]]:
    """Exit code, stderr and the modules loaded by `exoctl ARGS` in a new interpreter."""
    code = (
        "import sys; from exoctl.cli import cli; "
        f"rc = cli.main({list(args)!r}, standalone_mode=False); "
        "print('MODULES', ' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    modules = out.stdout.rsplit("MODULES", 1)[-1].split()
    return out.returncode, out.stderr, set(modules)


def test_status_imports_nothing_heavy() -> None:
    code, stderr, loaded = exoctl_in_fresh_python("status", "--help")
    assert code == 0, stderr
    assert "grpc" in loaded
    assert "exod.proto.exo.v1.control_pb2_grpc" in loaded
    assert [m for m in HEAVY if m in loaded] == []


def test_a_lazy_command_is_listed_and_suggested() -> None:
    help_ = subprocess.run(
        [sys.executable, "-m", "exoctl", "--help"], capture_output=True, text=True, check=False
    )
    assert help_.returncode == 0, help_.stderr
    listed = [line.split()[0] for line in help_.stdout.split("Commands:")[1].splitlines() if line]
    assert listed == ["cluster", "events", "kill", "models", "place", "run", "service", "status"]
    typo = subprocess.run(
        [sys.executable, "-m", "exoctl", "modles"], capture_output=True, text=True, check=False
    )
    assert (typo.returncode, typo.stderr) == (
        64,
        "exoctl: No such command 'modles'. Did you mean 'models'? see `exoctl --help`\n",
    )


def test_a_lazy_command_runs_when_named() -> None:
    code, stderr, loaded = exoctl_in_fresh_python("models", "list", "--help")
    assert code == 0, stderr
    assert "exoctl.models" in loaded
    assert "exoctl.service" not in loaded
