"""The cgroup v2 hard limit, on a directory tree shaped like cgroupfs (pure file logic).

No machine we test on delegates a cgroup v2 (this kind is cgroup v1 + a bare unified mount), so
the kernel's side cannot be exercised here; what exod decides and writes can.
"""

from __future__ import annotations

import os
from pathlib import Path

from exod.runners.cgroup import MemoryCgroups, own_cgroup


def fake_cgroupfs(tmp_path: Path, *, controllers: str = "cpu memory pids") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    base = root / "user.slice" / "exod.service"
    base.mkdir(parents=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (base / "cgroup.controllers").write_text(controllers + "\n")
    (base / "cgroup.subtree_control").write_text("")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("0::/user.slice/exod.service\n")
    return root, proc


def test_own_cgroup_reads_the_unified_line_only() -> None:
    assert own_cgroup("0::/user.slice/exod.service\n") == "/user.slice/exod.service"
    assert own_cgroup("4:memory:/x\n1:cpu:/\n") is None
    assert own_cgroup("4:memory:/x\n0::/\n") == "/"


def test_delegated_cgroup_moves_exod_to_a_leaf_and_caps_each_runner(tmp_path: Path) -> None:
    root, proc = fake_cgroupfs(tmp_path)
    cgroups = MemoryCgroups.setup(root, proc)
    base = root / "user.slice" / "exod.service"
    assert cgroups.base == base
    assert (base / "exod" / "cgroup.procs").read_text() == f"{os.getpid()}\n"
    assert (base / "cgroup.subtree_control").read_text() == "+memory\n"
    group = cgroups.limit("r-1", [4242], 300 << 20)
    assert group == base / "runner-r-1"
    assert (group / "memory.max").read_text() == f"{300 << 20}\n"
    assert (group / "cgroup.procs").read_text() == "4242\n"
    assert not cgroups.oom_killed(group)
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cgroups.oom_killed(group)


def test_without_cgroup_v2_or_delegation_everything_is_inert(tmp_path: Path) -> None:
    root, proc = fake_cgroupfs(tmp_path)
    proc.write_text("4:memory:/docker/x\n1:cpu:/\n")  # cgroup v1 only
    assert MemoryCgroups.setup(root, proc).base is None
    root2, proc2 = fake_cgroupfs(tmp_path / "b", controllers="cpu pids")  # no memory controller
    assert MemoryCgroups.setup(root2, proc2).base is None
    root3, proc3 = fake_cgroupfs(tmp_path / "c")
    (root3 / "cgroup.controllers").unlink()  # not a cgroup v2 mount
    assert MemoryCgroups.setup(root3, proc3).base is None
    root4, proc4 = fake_cgroupfs(tmp_path / "d")
    proc4.write_text("0::/\n")  # the root cgroup is the machine's, not ours
    assert MemoryCgroups.setup(root4, proc4).base is None
    assert not (root4 / "exod").exists()
    inert = MemoryCgroups(None)
    assert inert.limit("r-1", [1], 1) is None
    assert not inert.oom_killed(None)
    inert.remove(None)


def test_a_failing_write_leaves_the_runner_unlimited_not_broken(tmp_path: Path) -> None:
    root, proc = fake_cgroupfs(tmp_path)
    cgroups = MemoryCgroups.setup(root, proc)
    assert cgroups.base is not None
    (cgroups.base / "runner-r-2").write_text("a file where a directory must go")
    assert cgroups.limit("r-2", [1], 1) is None
